"""Causal 3D convolution with an explicit time-padding rule and a carried frame cache.

Padding rule (CogVideoX, as in diffusers' ``CogVideoXCausalConv3d``):

- time: ``k_t - 1`` frames are put on the left of the input. At the start of a video they are
  copies of the first frame; afterwards they are the last ``k_t - 1`` frames of the previous
  frame batch's padded input (the *cache*). Output frame t therefore sees input frames
  t - k_t + 1 .. t and nothing later, and running a video in frame batches with the cache
  carried between them gives exactly the whole-sequence result. (Without autograd, large frames
  carry the equivalent running sums of the next output frames instead: ``CausalConv3d._taps``.)
- height/width: ``(k - 1) // 2`` zeros on both sides, done by the convolution itself.

Memory: the convolution input is usually ``act(norm(x))``. Instead of materialising that (and a
time-padded copy of it), the caller passes the frame-wise ``transform`` and it is applied to a few
frames at a time right before each convolution call; outputs are written into one preallocated
tensor. Peak memory of a convolution is then its input, its output and a few frames of
temporaries, instead of four full-size tensors. The input may also be a ``FrameSource`` whose
frames are computed on request (``vae3d.blocks.UpsampledFrames``): then it is never whole at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .parallel import TimeShard

# Bytes of input per convolution call when streaming (no autograd): a call's temporaries are a
# few times this, so large frames go one or two at a time while small ones (tiny models, tiles)
# go all at once and do not pay a Python loop.
SLICE_BYTES = 8 * 2**20


class FrameSource(Protocol):
    """Frames of a (B, C, T, H, W) tensor that is never materialised: computed a few at a time on request."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def frames(self, a: int, b: int) -> torch.Tensor:
        """Frames a..b-1: (B, C, b - a, H, W)."""
        ...


def frame_range(x: torch.Tensor | FrameSource, a: int, b: int) -> torch.Tensor:
    """Frames a..b-1 of x (B, C, T, H, W): a view of a tensor, or computed now by a FrameSource."""
    return x[:, :, a:b] if isinstance(x, torch.Tensor) else x.frames(a, b)


def frames_per_step(x: torch.Tensor | FrameSource) -> int:
    """How many frames of x (B, C, T, H, W) to process per call: about SLICE_BYTES of input."""
    b, c, _, h, w = x.shape
    return max(1, SLICE_BYTES // (b * c * h * w * x.dtype.itemsize))


# transform(x[:, :, a:b], a, b) -> the convolution's input for frames a..b-1; frame-wise.
FrameTransform = Callable[[torch.Tensor, int, int], torch.Tensor]


class ConvCache:
    """State carried from one frame batch to the next.

    ``frames[conv]`` holds the last ``k_t - 1`` frames of that convolution's padded input (the
    autograd path, the no-autograd ``_window`` path, and a first batch of one frame);
    ``partials[conv]`` the running sums of its next ``k_t - 1`` output frames instead (the
    no-autograd ``_taps`` path, taken on large frames);
    ``at_start`` is True while the batch being processed begins the video (its first frame is the
    causal image frame: padded by replication, never pooled with another frame). ``shard`` is set
    when the batch is one rank's time shard (``vae3d.parallel``): the frames before it then come
    from the ranks before it instead of from ``frames``, and norm statistics are the shard's.
    """

    def __init__(self, shard: TimeShard | None = None) -> None:
        self.frames: dict[nn.Module, torch.Tensor] = {}
        self.partials: dict[nn.Module, list[torch.Tensor]] = {}
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
        x: torch.Tensor | FrameSource,
        cache: ConvCache | None = None,
        transform: FrameTransform | None = None,
        overwrite_input: bool = False,
    ) -> torch.Tensor:
        """conv(transform(x)) causally: x (B, C, T, H, W) -> (B, C', T, H, W).

        ``cache`` carries the last frames between batches (None: a whole video in one call).
        ``overwrite_input`` (C == C', no autograd) writes the output into x's storage: output frame t
        only needs input frames <= t, and each path reads an input frame before it writes over it.
        Without autograd, x may be a ``FrameSource`` (its frames computed on request; never overwritten).
        """
        tf = transform or _identity
        p, t = self.time_pad, x.shape[2]
        previous = cache.frames.get(self) if cache is not None else None
        if cache is not None and cache.shard is not None and p > 0:
            # The halo is what a carried cache holds, sent by the ranks before this one (rank 0:
            # the copies of its first frame); a shard is one whole call, nothing to carry on.
            previous = cache.shard.halo(x, tf, p)
            cache = None
        if not isinstance(x, torch.Tensor) and torch.is_grad_enabled():
            raise ValueError("a FrameSource input needs autograd disabled (torch.no_grad or inference_mode)")
        running = cache is not None and self in cache.partials  # earlier batches ran without autograd
        if torch.is_grad_enabled() or p == 0:
            if running and p > 0:
                raise RuntimeError(
                    "this video's earlier frame batches ran without autograd (the cache holds running sums, "
                    "not input frames); run the whole video with autograd either enabled or disabled"
                )
            # Plain path (training, 1x1x1 convs): one padded tensor, one convolution.
            h = tf(frame_range(x, 0, t), 0, t)
            if p > 0:
                head = previous if previous is not None else h[:, :, :1].expand(-1, -1, p, -1, -1)
                h = torch.cat([head, h], dim=2)  # (B, C, p + T, H, W)
                if cache is not None:
                    cache.frames[self] = h[:, :, -p:].clone()  # keeps the graph: gradients cross batches
            return self.conv(h)

        if previous is None and not running and t == 1:
            # A single frame at the start of a video is an image: all time taps see the same
            # replicated frame, so one 2D convolution with the kernel summed over time is exact.
            # The cache keeps the frame (p copies); a next batch turns them into running sums.
            h = tf(frame_range(x, 0, 1), 0, 1)
            if cache is not None:
                cache.frames[self] = h.expand(-1, -1, p, -1, -1).clone()
            y = F.conv2d(h[:, :, 0], self.conv.weight.sum(2), self.conv.bias, 1, self.conv.padding[1:])
            return y.unsqueeze(2)  # (B, C', 1, H, W)
        b, c_in, _, hh, ww = x.shape
        c_out = self.conv.out_channels
        inplace = overwrite_input and isinstance(x, torch.Tensor) and c_in == c_out
        out = x if inplace else torch.empty(b, c_out, t, hh, ww, dtype=x.dtype, device=x.device)
        # Large frames (over half of SLICE_BYTES, so that _window would take them one at a time; at
        # 128 x 128 in fp32 the full-resolution ones) go through _taps -- one tap of one frame at a
        # time, running sums carried -- when those sums (fp32 or wider) take no more memory than the
        # input frames _window would carry: not for a 3 -> 128 channel conv_in, nor at C' == C in
        # fp16/bf16. Otherwise _window: conv3d over a few frames, faster on small frames (one larger
        # matrix product), and with small temporaries there.
        sums_itemsize = torch.promote_types(x.dtype, torch.float32).itemsize
        large = frames_per_step(x) == 1
        if running or (large and c_out * sums_itemsize <= c_in * x.dtype.itemsize):
            self._taps(x, out, cache, tf, previous)
        else:
            self._window(x, out, cache, tf, previous)
        return out

    def _window(
        self, x: torch.Tensor | FrameSource, out: torch.Tensor, cache: ConvCache | None, tf: FrameTransform,
        previous: torch.Tensor | None,
    ) -> None:
        """The no-autograd path for small frames: conv3d over windows of p + n transformed frames, into out.

        The window of a few frames makes one large matrix product of all k_t taps (faster than
        ``_taps`` on small frames); the last p transformed input frames are carried between calls and
        batches. In place (out is x), outputs are produced from the last frame to the first.
        """
        p, t = self.time_pad, x.shape[2]
        overwrite_input = out is x
        step = frames_per_step(x)
        starts = range(0, t, step)
        # The p frames before this batch, already transformed: the cache, or the first frame
        # replicated (computed now, before an in-place run could overwrite it).
        pad = previous if previous is not None else tf(frame_range(x, 0, 1), 0, 1).expand(-1, -1, p, -1, -1)
        # Each frame is transformed once: the p transformed frames a call shares with the next one
        # are carried over (forward: the last p; in place, backward: the first p).
        carry = pad
        if not overwrite_input:
            for t0 in starts:
                t1 = min(t, t0 + step)
                h = torch.cat([carry, tf(frame_range(x, t0, t1), t0, t1)], dim=2)  # (B, C, p + t1 - t0, H, W)
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

    def _taps(
        self, x: torch.Tensor | FrameSource, out: torch.Tensor, cache: ConvCache | None, tf: FrameTransform,
        previous: torch.Tensor | None,
    ) -> None:
        """The no-autograd path for large frames: each time tap a 2D convolution, running sums carried.

        Input frame j contributes tap k (a 2D convolution with the kernel's time slice k) to output
        frame j + p - k: it finishes output frame j, adds to the p - 1 after it, and starts frame
        j + p. Those p unfinished output frames are kept as running sums (bias included, in fp32 or
        the input's wider dtype), also from one frame batch to the next. So no time-padded window of
        input frames is ever built, one tap's output of one frame exists at a time, and what is
        carried between batches is p frames of *output* channels (half the input's for the conv1 of a
        channel-halving block, 3 instead of 128 for the decoder's conv_out). Outputs go into out,
        which may be x itself: input frame j is transformed before output frame j is written.
        """
        p = self.time_pad
        b, _, t, hh, ww = x.shape
        c_out = self.conv.out_channels
        taps = [self.conv.weight[:, :, k].contiguous() for k in range(p + 1)]  # k_t x (C', C, kh, kw)
        padding = self.conv.padding[1:]
        dtype = torch.promote_types(x.dtype, torch.float32)  # the sums accumulate in fp32 (fp64 for fp64)
        bias = self.conv.bias.to(dtype)[:, None, None] if self.conv.bias is not None else None  # (C', 1, 1)

        def conv(frames: torch.Tensor, k: int) -> torch.Tensor:
            return F.conv2d(frames, taps[k], None, 1, padding)

        slots = cache.partials.get(self) if cache is not None else None
        if slots is not None and slots[0].shape != (b, c_out, hh, ww):
            raise ValueError(
                f"frame batch of shape {tuple(x.shape)} does not continue the cached one "
                f"(running sums of shape {tuple(slots[0].shape)}): every batch of a video needs the same B, H, W"
            )
        if slots is None:
            # The p transformed frames before this batch: carried input frames, a time shard's halo
            # or, at the start of a video, the first frame replicated. They only feed the sums; each
            # of their pushes restarts one slot, so whatever the slots held first is discarded.
            slots = [torch.empty(b, c_out, hh, ww, dtype=dtype, device=x.device) for _ in range(p)]
            if previous is None:
                previous = tf(frame_range(x, 0, 1), 0, 1).expand(-1, -1, p, -1, -1)
            for i in range(p):
                _push(lambda k, f=previous[:, :, i]: conv(f, k), slots, bias, None)
        if cache is not None:
            cache.frames.pop(self, None)
        inplace = out is x
        for j in range(t):  # one frame at a time (frames here are large)
            frame = tf(frame_range(x, j, j + 1), j, j + 1)[:, :, 0]  # (B, C, H, W)
            if inplace and frame.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                frame = frame.clone()  # an identity transform's view: output j overwrites it before tap 0
            _push(lambda k: conv(frame, k), slots, bias, out[:, :, j])
        if cache is not None:
            cache.partials[self] = slots


def _push(
    tap: Callable[[int], torch.Tensor], slots: list[torch.Tensor], bias: torch.Tensor | None, out: torch.Tensor | None
) -> None:
    """Add one input frame j to the running sums: ``tap(k)`` is its tap-k output (B, C', H, W).

    Before, ``slots[i]`` holds output frame j + i so far; after, output frame j is written to ``out``
    (None: a frame before the batch, whose output is not wanted and whose last tap is not computed),
    and ``slots[i]`` holds j + 1 + i, the last one started from the bias.
    """
    p = len(slots)
    if out is not None:
        torch.add(slots[0], tap(p), out=out)
    for i in range(1, p):
        slots[i].add_(tap(p - i))
    first = slots.pop(0)
    if bias is not None:
        torch.add(tap(0), bias, out=first)
    else:
        first.copy_(tap(0))
    slots.append(first)
