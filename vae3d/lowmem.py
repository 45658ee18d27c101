"""Low-memory execution of the VAE's modules without autograd: their outputs, a fraction of their memory.

The modules' forwards are the reference (what training runs, what a reader checks against the
paper). Without autograd nothing keeps the values that an executor overwrites or never builds, so the
executors run exactly then: ``active()`` is the one switch, read by the forwards that hand their call
here on their first line (``CausalConv3d``, ``Upsample3D``) and by the decoder (``hand_on_lazily``).

- ``causal_conv3d``: ``CausalConv3d`` with its frame-wise transform (a norm + SiLU) applied a few
  frames at a time right before each convolution call, outputs written into one preallocated tensor
  (or into the input's storage), so that neither ``act(norm(x))`` nor its time-padded copy exists at
  full size. Small frames: conv3d over windows of a few frames (``_window``). Large frames: each time
  tap a 2D convolution, the next output frames carried as running sums (``_taps``). A first batch of
  one frame: one 2D convolution with the kernel summed over time (``_image``).
- ``FrameSource``: a (B, C, T, H, W) input that is never whole, its frames computed on request;
  ``UpsampledFrames`` is an upsampler's output as one (the decoder hands the last, largest one on
  this way: ``hand_on_lazily``).
- ``phase_upsample``: conv3x3(nearest 2x) as 4 phase kernels of 2x2 on the original image.
- ``add_frames``: a residual added in frame slices.

Equal to the reference: tests/test_vae3d.py (streamed == plain autograd path == diffusers, at several
slice sizes; causality), tests/test_vae3d_parallel.py (time shards, taps path included).
Measurements: docs/vae3d.md, "Memory".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import causal_conv as rule  # the padding rule (a module import: causal_conv imports this one)

if TYPE_CHECKING:
    from .blocks import Upsample3D
    from .causal_conv import CausalConv, ConvCache, FrameTransform
    from .parallel import TimeShard

# Bytes of input per convolution call: a call's temporaries are a few times this, so large frames
# go one or two at a time while small ones (tiny models, tiles) go all at once and do not pay a
# Python loop.
SLICE_BYTES = 8 * 2**20


def active() -> bool:
    """Whether the low-memory executors run: exactly when autograd is off (nothing keeps what they overwrite)."""
    return not torch.is_grad_enabled()


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


def frame_bytes(x: torch.Tensor | FrameSource) -> int:
    """Bytes of one frame of x (B, C, T, H, W), the whole batch."""
    b, c, _, h, w = x.shape
    return b * c * h * w * x.dtype.itemsize


def frames_per_step(x: torch.Tensor | FrameSource) -> int:
    """How many frames of x (B, C, T, H, W) to process per call: about SLICE_BYTES of input."""
    return max(1, SLICE_BYTES // frame_bytes(x))


def identity(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The FrameTransform that changes nothing."""
    return x


def add_frames(h: torch.Tensor, x: torch.Tensor | FrameSource, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """h += fn(x) in place, a few frames at a time: no full-size temporary of fn(x) (a ResNet shortcut)."""
    step = frames_per_step(x)
    for t0 in range(0, x.shape[2], step):
        h[:, :, t0 : t0 + step] += fn(frame_range(x, t0, min(x.shape[2], t0 + step)))
    return h


# -- the causal convolution ---------------------------------------------------------------------------


def causal_conv3d(
    conv: CausalConv, x: torch.Tensor | FrameSource, cache: ConvCache | None, transform: FrameTransform | None,
    overwrite_input: bool,
) -> torch.Tensor:
    """``conv(x, cache, transform, overwrite_input)`` without autograd: the reference's output, and this
    picks how it is computed.

    ``overwrite_input`` (C == C') writes the output into x's storage: output frame t only needs input
    frames <= t, and each path reads an input frame before it writes over it. x may be a FrameSource
    (never overwritten).
    """
    tf = transform or identity
    p, t = conv.time_pad, x.shape[2]
    if p == 0:  # 1x1x1: nothing to pad or carry
        return rule.kernel(conv, tf(frame_range(x, 0, t), 0, t)) if t else rule.empty_output(conv, x)
    running = cache is not None and conv in cache.partials  # earlier batches ran _taps
    taps_from = cache.taps_from if cache is not None else None
    previous = cache.carried(conv, x, tf) if cache is not None and not running else None
    if cache is not None and cache.shard is not None:
        cache = None  # a time shard is one whole call (its halo came from the ranks before): nothing to carry on
    if t == 0:  # (after the halo exchange, which every rank of a shard takes part in)
        return rule.empty_output(conv, x)
    b, c_in, _, hh, ww = x.shape
    c_out = conv.conv3d.out_channels
    # Large frames (over half of SLICE_BYTES, so that _window would take them one at a time; at
    # 128 x 128 in fp32 the full-resolution ones) go through _taps -- one tap of one frame at a
    # time, running sums carried -- when those sums (fp32 or wider) take no more memory than the
    # input frames _window would carry: not for a 3 -> 128 channel conv_in, nor at C' == C in
    # fp16/bf16. Otherwise _window: conv3d over a few frames, faster (one larger matrix product:
    # 10-40% on this CPU), its temporaries a few frames. An executor that knows where its peak is
    # may raise the size from which frames count as large (``ConvCache.taps_from``: Wan's decoder,
    # its full-resolution frames); the smaller levels then run the faster windows under that peak.
    sums_itemsize = torch.promote_types(x.dtype, torch.float32).itemsize
    large = frames_per_step(x) == 1 and (taps_from is None or frame_bytes(x) >= taps_from)
    taps = running or (large and c_out * sums_itemsize <= c_in * x.dtype.itemsize)
    # The image frame alone: one 2D convolution (_image), unless a zero start begins running sums
    # right away (its p taps of the frame are all that _image and the next batch's start would compute).
    if previous is None and not running and t == 1 and not (taps and conv.start == "zeros"):
        return _image(conv, x, cache, tf)
    inplace = overwrite_input and isinstance(x, torch.Tensor) and c_in == c_out
    out = x if inplace else torch.empty(b, c_out, t, hh, ww, dtype=x.dtype, device=x.device)
    if taps:
        _taps(conv, x, out, cache, tf, previous)
    else:
        _window(conv, x, out, cache, tf, previous)
    return out


def _image(conv: CausalConv, x: torch.Tensor | FrameSource, cache: ConvCache | None, tf: FrameTransform) -> torch.Tensor:
    """A single frame at the start of a video is an image: one 2D convolution is exact. With a replicated
    start all time taps see the same frame (the kernel summed over time); with a zero start only the
    last tap sees anything. The cache keeps the padded input's last p frames; a next batch turns them
    into running sums or windows."""
    h = tf(frame_range(x, 0, 1), 0, 1)
    if cache is not None:  # the padded input's last p frames: p copies of h, or p - 1 zero frames and h
        if conv.start == "replicate":
            cache.frames[conv] = h.expand(-1, -1, conv.time_pad, -1, -1).clone()
        else:
            cache.frames[conv] = torch.cat([rule.start_frames(conv, h)[:, :, 1:], h], dim=2)
    c = conv.conv3d
    w = c.weight.sum(2) if conv.start == "replicate" else c.weight[:, :, -1]
    y = F.conv2d(h[:, :, 0], w, c.bias, 1, c.padding[1:])
    return y.unsqueeze(2)  # (B, C', 1, H, W)


def _window(
    conv: CausalConv, x: torch.Tensor | FrameSource, out: torch.Tensor, cache: ConvCache | None,
    tf: FrameTransform, previous: torch.Tensor | None,
) -> None:
    """Small frames: conv3d over windows of p + n transformed frames, into out.

    The window of a few frames makes one large matrix product of all k_t taps (faster than
    ``_taps`` on small frames); the last p transformed input frames are carried between calls and
    batches. In place (out is x), outputs are produced from the last frame to the first.
    """
    # The p frames before this batch, already transformed: the cache, or the start of the video (the
    # first frame replicated, computed now before an in-place run could overwrite it; or zeros).
    pad = previous if previous is not None else _video_start(conv, x, tf)
    run = _window_backward if out is x else _window_forward
    new_cache = run(conv, x, out, tf, pad)
    if cache is not None:
        if previous is not None and previous.shape == new_cache.shape:
            previous.copy_(new_cache)  # reuse the buffer: long-lived allocations stay put
        else:
            cache.frames[conv] = new_cache.clone()


def _window_forward(
    conv: CausalConv, x: torch.Tensor | FrameSource, out: torch.Tensor, tf: FrameTransform, pad: torch.Tensor
) -> torch.Tensor:
    """Windows from the first frame to the last; each frame is transformed once (the p transformed frames
    a call shares with the next one are carried over). Returns the last p transformed frames."""
    p, t = conv.time_pad, x.shape[2]
    step = frames_per_step(x)
    carry = pad
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        h = torch.cat([carry, tf(frame_range(x, t0, t1), t0, t1)], dim=2)  # (B, C, p + t1 - t0, H, W)
        out[:, :, t0:t1] = rule.kernel(conv, h)
        carry = h[:, :, -p:]
    return carry


def _window_backward(
    conv: CausalConv, x: torch.Tensor, out: torch.Tensor, tf: FrameTransform, pad: torch.Tensor
) -> torch.Tensor:
    """In place (out is x): windows from the last frame to the first, so that no input frame is overwritten
    before its last reader; the first p transformed frames of a window are carried to the one before.
    Returns the last p transformed frames (copied before they are overwritten)."""
    p, t = conv.time_pad, x.shape[2]
    step = frames_per_step(x)
    carry = None
    for t0 in reversed(range(0, t, step)):
        t1 = min(t, t0 + step)
        hi = t1 - p if carry is not None else t1  # frames [t0 - p, hi) still to transform
        parts = [pad[:, :, p + t0 - p : p + min(0, hi)]] if t0 < p else []
        if hi > max(t0 - p, 0):
            parts.append(tf(x[:, :, max(t0 - p, 0) : hi], max(t0 - p, 0), hi))
        if carry is not None:
            parts.append(carry)
        h = torch.cat(parts, dim=2)  # (B, C, p + t1 - t0, H, W)
        if t1 == t:
            last = h[:, :, -p:].clone()  # before x's last frames are overwritten
        carry = h[:, :, :p]
        out[:, :, t0:t1] = rule.kernel(conv, h)
    return last


def _taps(
    conv: CausalConv, x: torch.Tensor | FrameSource, out: torch.Tensor, cache: ConvCache | None,
    tf: FrameTransform, previous: torch.Tensor | None,
) -> None:
    """Large frames: each time tap a 2D convolution, running sums carried.

    Input frame j contributes tap k (a 2D convolution with the kernel's time slice k) to output
    frame j + p - k: it finishes output frame j, adds to the p - 1 after it, and starts frame
    j + p. Those p unfinished output frames are kept as running sums (bias included, in fp32 or
    the input's wider dtype), also from one frame batch to the next. So no time-padded window of
    input frames is ever built, one tap's output of one frame exists at a time, and what is
    carried between batches is p frames of *output* channels (half the input's for the conv1 of a
    channel-halving block, 3 instead of 128 for the decoder's conv_out). Outputs go into out,
    which may be x itself: input frame j is transformed before output frame j is written.
    """
    kernel = _TapKernel(conv, x)
    slots = _initial_sums(conv, x, cache, tf, previous, kernel)
    if cache is not None:
        cache.frames.pop(conv, None)
    inplace = out is x
    for j in range(x.shape[2]):  # one frame at a time (frames here are large)
        frame = tf(frame_range(x, j, j + 1), j, j + 1)[:, :, 0]  # (B, C, H, W)
        if inplace and frame.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            frame = frame.clone()  # an identity transform's view: output j overwrites it before tap 0
        kernel.push(frame, slots, out[:, :, j])
    if cache is not None:
        cache.partials[conv] = slots


class _TapKernel:
    """A causal convolution's time slices as 2D convolutions, and the dtype and bias of its running sums."""

    def __init__(self, conv: CausalConv, x: torch.Tensor | FrameSource) -> None:
        c = conv.conv3d
        # k_t x (C', C, kh, kw): views (a copy costs, a conv does not)
        self.taps = [c.weight[:, :, k] for k in range(conv.time_pad + 1)]
        self.padding = c.padding[1:]
        self.dtype = torch.promote_types(x.dtype, torch.float32)  # the sums accumulate in fp32 (fp64 for fp64)
        self.bias = c.bias.to(self.dtype)[:, None, None] if c.bias is not None else None  # (C', 1, 1)

    def tap(self, frames: torch.Tensor, k: int) -> torch.Tensor:
        """Tap k of frames (B, C, H, W): (B, C', H, W), no bias."""
        return F.conv2d(frames, self.taps[k], None, 1, self.padding)

    def start(self, frames: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Tap 0 of frames plus the bias: a new output frame's sum, in old's storage (the sums stay where
        they are: a new tensor per frame left the heap in holes, +75 MB at the peak of a Wan decode)."""
        y = self.tap(frames, 0)
        return torch.add(y, self.bias, out=old) if self.bias is not None else old.copy_(y)

    def push(self, frame: torch.Tensor, slots: list[torch.Tensor], out: torch.Tensor | None) -> None:
        """Add input frame (B, C, H, W) to the running sums (``_push``), output frame into out (None: not wanted)."""
        _push(lambda k: self.tap(frame, k), lambda old: self.start(frame, old), slots, out)


def _initial_sums(
    conv: CausalConv, x: torch.Tensor | FrameSource, cache: ConvCache | None, tf: FrameTransform,
    previous: torch.Tensor | None, kernel: _TapKernel,
) -> list[torch.Tensor]:
    """The p running sums before x's first frame (each (B, C', H, W)): the cache's from the batch before,
    the bias alone at a zero start, or computed from the p transformed frames before x."""
    p = conv.time_pad
    b, _, _, hh, ww = x.shape
    c_out = conv.conv3d.out_channels
    slots = cache.partials.get(conv) if cache is not None else None
    if slots is not None:
        if slots[0].shape != (b, c_out, hh, ww):
            raise ValueError(
                f"frame batch of shape {tuple(x.shape)} does not continue the cached one "
                f"(running sums of shape {tuple(slots[0].shape)}): every batch of a video needs the same B, H, W"
            )
        return slots
    if previous is None and conv.start == "zeros":
        # zero frames before the video: their taps add nothing, every sum starts from the bias
        bias = kernel.bias
        first = bias if bias is not None else torch.zeros((), dtype=kernel.dtype, device=x.device)
        return [first.expand(b, c_out, hh, ww).contiguous() for _ in range(p)]
    # The p transformed frames before this batch: carried input frames, a time shard's halo or, at
    # the start of a video, the first frame replicated. They only feed the sums; each of their
    # pushes restarts one slot, so whatever the slots held first is discarded.
    slots = [torch.empty(b, c_out, hh, ww, dtype=kernel.dtype, device=x.device) for _ in range(p)]
    if previous is None:
        previous = _video_start(conv, x, tf)
    for i in range(p):
        kernel.push(previous[:, :, i], slots, None)
    return slots


def _video_start(conv: CausalConv, x: torch.Tensor | FrameSource, tf: FrameTransform) -> torch.Tensor:
    """The p transformed frames before a video's first frame (B, C, p, H, W): copies of it, or zeros."""
    if conv.start == "zeros":
        b, c, _, hh, ww = x.shape
        return torch.zeros(b, c, conv.time_pad, hh, ww, dtype=x.dtype, device=x.device)
    return rule.start_frames(conv, tf(frame_range(x, 0, 1), 0, 1))


def _push(
    tap: Callable[[int], torch.Tensor], start: Callable[[torch.Tensor], torch.Tensor], slots: list[torch.Tensor],
    out: torch.Tensor | None,
) -> None:
    """Add one input frame j to the running sums: ``tap(k)`` is its tap-k output (B, C', H, W), ``start(old)``
    its tap 0 plus the bias (in old's storage or a new tensor).

    Before, ``slots[i]`` holds output frame j + i so far; after, output frame j is written to ``out``
    (None: a frame before the batch, whose output is not wanted and whose last tap is not computed),
    and ``slots[i]`` holds j + 1 + i, the last one started from the bias.
    """
    p = len(slots)
    if out is not None:
        torch.add(slots[0], tap(p), out=out)
    for i in range(1, p):
        slots[i].add_(tap(p - i))
    slots.append(start(slots.pop(0)))


# -- upsampling ---------------------------------------------------------------------------------------


def phase_weight(conv: nn.Conv2d) -> torch.Tensor:
    """A 3x3 kernel (C', C, 3, 3) as 4 phase kernels of 2x2, stacked as outputs: (4 C', C, 2, 2), phase 2a + b."""
    # Output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. source rows
    # (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: rows of the 2-row window [i - 1 + a, i + a].
    w = conv.weight
    acc = torch.promote_types(w.dtype, torch.float32)  # the sums in fp32 (fp64 for fp64), rounded once
    fold = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=acc, device=w.device)  # (a, r, k)
    k = torch.einsum("ark,oikl,bsl->aboirs", fold, w.to(acc), fold)  # (2, 2, C', C, 2, 2)
    return k.flatten(0, 2).to(w.dtype)


def phase_upsample(conv: nn.Conv2d, f: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """conv(nearest_2x(f)) of frames f (N, C, h, w) -> (N, C', 2h, 2w), conv a 3x3 padding-1 Conv2d.

    For each of the 4 output pixel phases, a 2x2 convolution of the original with the 3x3 taps summed
    where they fall on the same source pixel (``phase_weight``; pass it as ``weight`` if at hand):
    0.44x the multiply-adds, and the 4x larger interpolated input is never built.
    """
    n, _, h, w = f.shape
    c = conv.out_channels
    y = F.conv2d(F.pad(f, (1, 1, 1, 1)), phase_weight(conv) if weight is None else weight)  # (N, 4 C', h+1, w+1)
    out = f.new_empty(n, c, 2 * h, 2 * w)
    bias = conv.bias[:, None, None] if conv.bias is not None else 0
    for a in (0, 1):
        for b in (0, 1):
            phase = y[:, (2 * a + b) * c : (2 * a + b + 1) * c, a : a + h, b : b + w]  # (N, C', h, w)
            torch.add(phase, bias, out=out[:, :, a::2, b::2])
    return out


def upsample2x(conv: nn.Conv2d, f: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """conv(nearest_2x(f)) of frames f (N, C, h, w) -> (N, C', 2h, 2w): phase kernels without autograd
    (``weight``: ``phase_weight(conv)``, if at hand), else the plain interpolation and convolution."""
    if active():
        return phase_upsample(conv, f, weight)
    return conv(F.interpolate(f, scale_factor=2.0, mode="nearest"))


class UpsampledFrames:
    """conv(nearest_2x(x[:, :, source])) (B, C', T', 2h, 2w) as a FrameSource: computed from x on request.

    An upsampler's output: ``source`` names the input frame of each output frame (a frame repeated in
    time appears twice). CogVideoX's decoder hands its last, largest upsampler output on this way to a
    consumer that reads it frame by frame three times (norm1's statistics, conv1's input, the
    shortcut), so it never exists whole; the price is computing it three times. Wan's decoder reads
    each frame once (``vae3d.wan_lowmem``). A source frame computed alone is kept until the next
    request (its repeat), so reading the frames in order one at a time computes each source frame once
    per pass.
    """

    def __init__(self, conv: nn.Conv2d, x: torch.Tensor, source: list[int]) -> None:
        b, _, _, h, w = x.shape
        self.conv, self.x, self.source = conv, x, source
        self.repeats = len(set(source)) < len(source)
        self.weight = phase_weight(conv) if active() else None
        self.shape = torch.Size((b, conv.out_channels, len(source), 2 * h, 2 * w))
        self.dtype, self.device = x.dtype, x.device
        self._kept: tuple[int, torch.Tensor] | None = None  # (source frame, its output (B, C', 1, 2h, 2w))

    def frames(self, a: int, b: int) -> torch.Tensor:
        """Output frames a..b-1: (B, C', b - a, 2h, 2w); each source frame among them is computed once."""
        wanted = self.source[a:b]
        lo, hi = wanted[0], wanted[-1] + 1
        if self._kept is not None and self._kept[0] == lo and hi == lo + 1:
            y, self._kept = self._kept[1], None  # its repeat was the one request it was kept for
        else:
            f = rearrange(self.x[:, :, lo:hi], "b c n h w -> (b n) c h w")
            y = rearrange(upsample2x(self.conv, f, self.weight), "(b n) c h w -> b c n h w", b=self.shape[0])
            if self.repeats and self.weight is not None and hi == lo + 1:
                self._kept = (lo, y)  # one frame: its repeat is usually the next request
        return y if wanted == list(range(lo, hi)) else y[:, :, [i - lo for i in wanted]]


def upsample(conv: nn.Conv2d, x: torch.Tensor, source: list[int]) -> torch.Tensor:
    """conv(nearest_2x(x[:, :, source])) without autograd: materialised a few source frames at a time (phase
    kernels), each source frame convolved once (and written twice when it is repeated in time)."""
    frames = UpsampledFrames(conv, x, source)
    out = x.new_empty(frames.shape)
    step = max(1, frames_per_step(x) // 4)  # the output is 4x bigger
    starts = [frames.source.index(i) for i in range(x.shape[2])] + [len(frames.source)]  # first output of each
    for i0 in range(0, x.shape[2], step):
        a, b = starts[i0], starts[min(x.shape[2], i0 + step)]
        out[:, :, a:b] = frames.frames(a, b)
    return out


def hand_on_lazily(up: Upsample3D, x: torch.Tensor, image_first: bool, shard: TimeShard | None) -> bool:
    """Whether the decoder hands an upsampler's output on as ``UpsampledFrames``: without autograd,
    unsharded (a time shard's halo slices its input as a tensor), and only when it is big (over 6 x
    SLICE_BYTES, 48 MiB: at 128 x 128 the full-resolution one; at 480 x 720 all three) -- computing it
    three times instead of once pays only where the tensor would dominate the peak."""
    if not active() or shard is not None:
        return False
    b, _, t, h, w = x.shape
    frames = len(up.source_frames(t, image_first))
    return b * up.conv.out_channels * frames * 4 * h * w * x.dtype.itemsize > 6 * SLICE_BYTES
