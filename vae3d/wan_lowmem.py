"""Low-memory decode of the Wan VAE without autograd: depth first, a few frames per level at a time.

The reference ``WanDecoder3d.forward`` runs each level on the whole frame batch: one latent frame
becomes 4 frames at full resolution, and every level's activations for all of them exist at once.
Wan has no statistics over frames (its RMS norm is per pixel), and every layer is causal in time
with its state in the ``ConvCache``, so a level may equally run on any split of its frames in order.
This executor does that depth first: each upsampler's output (a ``FrameSource``: its time doubling
done at low resolution, its spatial upsampling computed on request by phase kernels) is handed to the
next level a few frames at a time (``lowmem.frames_per_step``, about ``SLICE_BYTES``; at 256 x 256
one frame at the two upper levels), and each piece runs through all the remaining levels and
``conv_out`` before the next one is computed. What is alive at a time: the caches (2 frames or
running sums per causal convolution), one piece per level, and the batch's small output.

Each frame is computed once (no recomputation: a piece is read by one consumer). Equal to the
reference: tests/test_vae3d_wan.py (streamed and depth-first decode against the autograd path and
against diffusers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import lowmem, wan_tiles
from .causal_conv import ConvCache
from .streaming import release_freed_memory
from .wan_tiles import Span, TilePlan, Window

if TYPE_CHECKING:
    from .wan import DupUp3D
    from .wan_model import WanDecoder3d


class ShortcutSum:
    """A FrameSource: an upsampler's output frames plus Wan 2.2's DupUp3D shortcut of the level's input."""

    def __init__(self, up: lowmem.FrameSource, shortcut: DupUp3D, x: torch.Tensor, first: bool) -> None:
        self.up, self.shortcut, self.x, self.first = up, shortcut, x, first
        self.shape, self.dtype, self.device = up.shape, up.dtype, up.device

    def frames(self, a: int, b: int) -> torch.Tensor:
        y = lowmem.frame_range(self.up, a, b)
        return y.add_(self.shortcut.frames(self.x, self.first, a, b))


def decode(
    dec: WanDecoder3d, z: torch.Tensor, cache: ConvCache | None, image_first: bool, plan: TilePlan | None = None
) -> torch.Tensor:
    """``dec(z, cache)`` without autograd: latents (B, Z, T, h, w) -> frames (B, C, T', H, W), depth first.

    ``plan`` (``vae3d.wan_tiles``): only that output tile (B, C, T', rows, cols), each level on its window.
    """
    if cache is None:  # a whole video in one call: its pieces still carry their state from one to the next
        cache = ConvCache()
    b, _, t, h, w = z.shape
    plan = plan or wan_tiles.whole_frame(dec, (h, w))
    last = plan.levels[-1]  # (rows, cols) of the full-resolution level's window
    # The peak is at full resolution: only its frames take the lean time taps; the smaller levels run
    # the faster conv3d windows, whose temporaries stay under that peak.
    cache.taps_from = b * dec.conv_out.in_channels * last.shape[0] * last.shape[1] * z.dtype.itemsize
    frames = dec.time_factor * t - (dec.time_factor - 1 if image_first else 0)
    out = z.new_empty(b, dec.conv_out.out_channels, frames, *plan.tile.shape)
    written = [0]

    def emit(y: torch.Tensor) -> None:  # y (B, C, n, *last.shape): the next n frames of the batch
        out[:, :, written[0] : written[0] + y.shape[2]] = plan.tile.view(y, last)
        written[0] += y.shape[2]

    x = dec.mid_block(dec.conv_in(z, cache), cache)  # (B, C, T, h, w): the whole frame (its attention is global)
    _level(dec, 0, plan.levels[0].crop(x, Window(Span(0, h), Span(0, w))), cache, image_first, emit, plan)
    assert written[0] == frames, (written, frames)
    return out


def _level(
    dec: WanDecoder3d, i: int, x: torch.Tensor, cache: ConvCache | None, image_first: bool, emit,
    plan: TilePlan,
) -> None:
    """Run up-level i on x (B, C, n, h, w), the next n frames of its window (``plan.levels[i]``), and everything
    after it.

    ``image_first``: x's first frame is the video's first. The caller does not keep x (it is passed
    as an expression), so it is freed after the first residual block unless a shortcut needs it.
    """
    block = dec.up_blocks[i]
    keep = x if block.shortcut is not None else None
    h = x
    del x
    for resnet in block.resnets:
        h = resnet(h, cache)
        if h.device.type == "cpu":
            release_freed_memory()  # the block's temporaries' heap holes (docs/vae3d.md, "Memory")
    if block.up is None:  # the last level: the output convolution
        emit(dec.conv_out(h, cache, dec.norm_out.transform()))
        return
    # What the upsampler needs of the window (all of it untiled); a tile's spoiled edges are cut off here.
    h = plan.keep[i].crop(h, plan.levels[i])
    keep = keep if keep is None else plan.keep[i].crop(keep, plan.levels[i])
    src = block.up.lazy(h, cache, image_first)  # (B, C', n', 2h, 2w), time doubled now, space on request
    del h
    if keep is not None:
        src = ShortcutSum(src, block.shortcut, keep, image_first)
    n, step = src.shape[2], lowmem.frames_per_step(src)
    for a in range(0, n, step):
        _level(dec, i + 1, src.frames(a, min(n, a + step)), cache, image_first and a == 0, emit, plan)
