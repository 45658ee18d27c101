"""Causal 3D convolution with an explicit time-padding rule and a carried frame cache.

Padding rule (CogVideoX, as in diffusers' ``CogVideoXCausalConv3d``):

- time: ``k_t - 1`` frames are put on the left of the input. At the start of a video they are
  copies of the first frame; afterwards they are the last ``k_t - 1`` frames of the previous
  frame batch's padded input (the *cache*). Output frame t therefore sees input frames
  t - k_t + 1 .. t and nothing later, and running a video in frame batches with the cache
  carried between them gives exactly the whole-sequence result.
- height/width: ``(k - 1) // 2`` zeros on both sides, done by the convolution itself.

``CausalConv3d.forward`` is that rule and nothing else: the reference path, which training runs.
Without autograd the same call is executed by ``vae3d.lowmem`` (the transform fused a few frames
at a time, time taps with running sums on large frames, inputs computed on request), which gives
the same output in far less memory; tests/test_vae3d.py proves the two equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import lowmem

if TYPE_CHECKING:
    from .lowmem import FrameSource
    from .parallel import TimeShard

# transform(x[:, :, a:b], a, b) -> the convolution's input for frames a..b-1; frame-wise
# (usually act(norm(x)), passed by the caller so that the low-memory path can fuse it).
FrameTransform = Callable[[torch.Tensor, int, int], torch.Tensor]


class ConvCache:
    """What each causal convolution carries from one frame batch of a video to the next.

    ``frames[conv]``: the last ``k_t - 1`` frames of that convolution's padded input. ``partials[conv]``:
    instead, the running sums of its next ``k_t - 1`` output frames (``vae3d.lowmem``'s time taps, taken
    without autograd on large frames). ``at_start``: the batch being processed begins the video (its
    first frame is the causal image frame: padded by replication, never pooled with another frame).
    ``shard``: set on a time shard's cache (``vae3d.parallel.ShardCache``), whose frames before the
    chunk come from the ranks before it and whose norm statistics are the shard's.
    """

    shard: TimeShard | None = None

    def __init__(self) -> None:
        self.frames: dict[nn.Module, torch.Tensor] = {}
        self.partials: dict[nn.Module, list[torch.Tensor]] = {}
        self.at_start = True

    def carried(self, conv: CausalConv3d, x: torch.Tensor, tf: FrameTransform | None = None) -> torch.Tensor | None:
        """The ``k_t - 1`` transformed frames before x (B, C, T, H, W), or None at the start of the video."""
        if conv in self.partials:
            raise RuntimeError(
                "this video's earlier frame batches ran without autograd (the cache holds running sums, "
                "not input frames); run the whole video with autograd either enabled or disabled"
            )
        return self.frames.get(conv)

    def carry(self, conv: CausalConv3d, frames: torch.Tensor) -> None:
        """Keep the last ``k_t - 1`` frames of conv's padded input for the next batch."""
        self.frames[conv] = frames.clone()  # keeps the graph: gradients cross batches


class CausalConv3d(nn.Module):
    """Conv3d, causal in time (replicate-first-frame left padding), zero padded in space.

    The weights live in ``self.conv`` so that state-dict names equal diffusers'
    (``...conv1.conv.weight``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.time_pad = kernel_size - 1
        p = (kernel_size - 1) // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, p, p))

    def forward(
        self,
        x: torch.Tensor | FrameSource,
        cache: ConvCache | None = None,
        transform: FrameTransform | None = None,
        overwrite_input: bool = False,
    ) -> torch.Tensor:
        """conv(pad(transform(x))) causally: x (B, C, T, H, W) -> (B, C', T, H, W).

        ``cache`` carries the last frames between batches (None: a whole video in one call). Without
        autograd ``vae3d.lowmem`` runs the call (same output); there x may be a ``FrameSource`` (frames
        computed on request) and ``overwrite_input`` (C == C') lets the output take x's storage.
        """
        if lowmem.active():
            return lowmem.causal_conv3d(self, x, cache, transform, overwrite_input)
        if not isinstance(x, torch.Tensor):
            raise ValueError("a FrameSource input needs autograd disabled (torch.no_grad or inference_mode)")
        h = x if transform is None else transform(x, 0, x.shape[2])
        p = self.time_pad
        if p > 0:
            before = cache.carried(self, h) if cache is not None else None
            if before is None:  # the start of a video: copies of its first frame
                before = h[:, :, :1].expand(-1, -1, p, -1, -1)
            h = torch.cat([before, h], dim=2)  # (B, C, p + T, H, W)
            if cache is not None:
                cache.carry(self, h[:, :, -p:])
        return self.conv(h)
