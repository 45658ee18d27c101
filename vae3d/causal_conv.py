"""Causal 3D convolution with an explicit time-padding rule and a carried frame cache.

Padding rule (CogVideoX, as in diffusers' ``CogVideoXCausalConv3d``):

- time: ``k_t - 1`` frames are put on the left of the input. At the start of a video they are
  copies of the first frame; afterwards they are the last ``k_t - 1`` frames of the previous
  frame batch's padded input (the *cache*). Output frame t therefore sees input frames
  t - k_t + 1 .. t and nothing later, and running a video in frame batches with the cache
  carried between them gives exactly the whole-sequence result.
- height/width: ``(k - 1) // 2`` zeros on both sides, done by the convolution itself.

Memory: the convolution input is usually ``act(norm(x))``. Instead of materialising that (and a
time-padded copy of it), the caller passes the frame-wise ``transform`` and it is applied to a few
frames at a time right before each convolution call; outputs are written into one preallocated
tensor. Peak memory of a convolution is then its input, its output and a few frames of
temporaries, instead of four full-size tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .parallel import TimeShard

# Bytes of input per convolution call when streaming (no autograd): a call's temporaries are a
# few times this, so large frames go one or two at a time while small ones (tiny models, tiles)
# go all at once and do not pay a Python loop.
SLICE_BYTES = 20 * 2**20


def frames_per_step(x: torch.Tensor) -> int:
    """How many frames of x (B, C, T, H, W) to process per call: about SLICE_BYTES of input."""
    b, c, _, h, w = x.shape
    return max(1, SLICE_BYTES // (b * c * h * w * x.element_size()))

# transform(x[:, :, a:b], a, b) -> the convolution's input for frames a..b-1; frame-wise.
FrameTransform = Callable[[torch.Tensor, int, int], torch.Tensor]


class ConvCache:
    """State carried from one frame batch to the next.

    ``frames[conv]`` holds the last ``k_t - 1`` frames of that convolution's padded input;
    ``at_start`` is True while the batch being processed begins the video (its first frame is the
    causal image frame: padded by replication, never pooled with another frame). ``shard`` is set
    when the batch is one rank's time shard (``vae3d.parallel``): the frames before it then come
    from the ranks before it instead of from ``frames``, and norm statistics are the shard's.
    """

    def __init__(self, shard: TimeShard | None = None) -> None:
        self.frames: dict[nn.Module, torch.Tensor] = {}
        self.at_start = True
        self.shard = shard


def _identity(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return x


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
        x: torch.Tensor,
        cache: ConvCache | None = None,
        transform: FrameTransform | None = None,
        overwrite_input: bool = False,
    ) -> torch.Tensor:
        """conv(transform(x)) causally: x (B, C, T, H, W) -> (B, C', T, H, W).

        ``cache`` carries the last frames between batches (None: a whole video in one call).
        ``overwrite_input`` (C == C', no autograd) writes the output into x's storage: frames are
        produced from the last to the first, and output frame t only needs input frames <= t, so
        no input frame is overwritten before its last use.
        """
        tf = transform or _identity
        p, t = self.time_pad, x.shape[2]
        previous = cache.frames.get(self) if cache is not None else None
        if cache is not None and cache.shard is not None and p > 0:
            # The halo is what a carried cache holds, sent by the ranks before this one (rank 0:
            # the copies of its first frame); a shard is one whole call, nothing to carry on.
            previous = cache.shard.halo(x, tf, p)
            cache = None
        if torch.is_grad_enabled() or p == 0:
            # Plain path (training, 1x1x1 convs): one padded tensor, one convolution.
            h = tf(x, 0, t)
            if p > 0:
                head = previous if previous is not None else h[:, :, :1].expand(-1, -1, p, -1, -1)
                h = torch.cat([head, h], dim=2)  # (B, C, p + T, H, W)
                if cache is not None:
                    cache.frames[self] = h[:, :, -p:].clone()  # keeps the graph: gradients cross batches
            return self.conv(h)

        if previous is None and t == 1:
            # A single frame at the start of a video is an image: all time taps see the same
            # replicated frame, so one 2D convolution with the kernel summed over time is exact.
            h = tf(x, 0, 1)
            if cache is not None:
                cache.frames[self] = h.expand(-1, -1, p, -1, -1).clone()
            y = F.conv2d(h[:, :, 0], self.conv.weight.sum(2), self.conv.bias, 1, self.conv.padding[1:])
            return y.unsqueeze(2)  # (B, C', 1, H, W)

        b, _, _, hh, ww = x.shape
        overwrite_input = overwrite_input and x.shape[1] == self.conv.out_channels
        out = x if overwrite_input else x.new_empty(b, self.conv.out_channels, t, hh, ww)
        step = frames_per_step(x)
        starts = range(0, t, step)
        # The p frames before this batch, already transformed: the cache, or the first frame
        # replicated (computed now, before an in-place run could overwrite it).
        pad = previous if previous is not None else tf(x[:, :, :1], 0, 1).expand(-1, -1, p, -1, -1)
        # Each frame is transformed once: the p transformed frames a call shares with the next one
        # are carried over (forward: the last p; in place, backward: the first p).
        carry = pad
        if not overwrite_input:
            for t0 in starts:
                t1 = min(t, t0 + step)
                h = torch.cat([carry, tf(x[:, :, t0:t1], t0, t1)], dim=2)  # (B, C, p + t1 - t0, H, W)
                out[:, :, t0:t1] = self.conv(h)
                carry = h[:, :, -p:]
            new_cache = carry
        else:
            carry = None
            for t0 in reversed(starts):
                t1 = min(t, t0 + step)
                hi = t1 - p if carry is not None else t1  # frames [t0 - p, hi) still to transform
                parts = [pad[:, :, p + t0 - p : p + min(0, hi)]] if t0 < p else []
                if hi > max(t0 - p, 0):
                    parts.append(tf(x[:, :, max(t0 - p, 0) : hi], max(t0 - p, 0), hi))
                if carry is not None:
                    parts.append(carry)
                h = torch.cat(parts, dim=2)  # (B, C, p + t1 - t0, H, W)
                if t1 == t:
                    new_cache = h[:, :, -p:].clone()  # before x's last frames are overwritten
                carry = h[:, :, :p]
                out[:, :, t0:t1] = self.conv(h)
        if cache is not None:
            if previous is not None and previous.shape == new_cache.shape:
                previous.copy_(new_cache)  # reuse the buffer: long-lived allocations stay put
            else:
                cache.frames[self] = new_cache.clone()
        return out
