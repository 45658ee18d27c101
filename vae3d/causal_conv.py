"""Causal 3D convolution with an explicit time-padding rule and a carried frame cache.

Padding rule (one rule, two starts):

- time: ``k_t - 1`` frames are put on the left of the input. At the start of a video they are
  copies of the first frame (``start="replicate"``: CogVideoX, diffusers' ``CogVideoXCausalConv3d``)
  or zeros (``start="zeros"``: Wan, diffusers' ``WanCausalConv3d``); afterwards they are the last
  ``k_t - 1`` frames of the previous frame batch's padded input (the *cache*). Output frame t
  therefore sees input frames t - k_t + 1 .. t and nothing later, and running a video in frame
  batches with the cache carried between them gives exactly the whole-sequence result.
- height/width: ``(k - 1) // 2`` zeros on both sides, done by the convolution itself.

Two parameter layouts share the rule: ``CausalConv3d`` keeps the weights in ``self.conv``
(CogVideoX's state-dict names, ``conv1.conv.weight``), ``FlatCausalConv3d`` is itself the Conv3d
(Wan's, ``conv1.weight``). Both expose the weights as ``conv3d``; everything else (``vae3d.lowmem``,
``vae3d.parallel``) works on either.

``causal_forward`` is that rule and nothing else: the reference path, which training runs.
Without autograd the same call is executed by ``vae3d.lowmem`` (the transform fused a few frames
at a time, time taps with running sums on large frames, inputs computed on request), which gives
the same output in far less memory; tests/test_vae3d.py proves the two equal.

Gradient checkpointing (``checkpointed``): diffusers' ``enable_gradient_checkpointing`` sets
``gradient_checkpointing`` and ``_gradient_checkpointing_func`` on the encoder, decoder and their blocks; a
checkpointed block runs as a pure function of its inputs and the cached frames it reads, so the
recomputation in backward sees the cache as the forward saw it and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import lowmem

if TYPE_CHECKING:
    from .lowmem import FrameSource
    from .parallel import TimeShard

STARTS = ("replicate", "zeros")

# transform(x[:, :, a:b], a, b) -> the convolution's input for frames a..b-1; frame-wise
# (usually act(norm(x)), passed by the caller so that the low-memory path can fuse it).
FrameTransform = Callable[[torch.Tensor, int, int], torch.Tensor]


class ConvCache:
    """What each causal convolution carries from one frame batch of a video to the next.

    ``frames[conv]``: the last ``k_t - 1`` frames of that convolution's padded input. ``partials[conv]``:
    instead, the running sums of its next ``k_t - 1`` output frames (``vae3d.lowmem``'s time taps, taken
    without autograd on large frames); ``frames`` also keeps a Wan time downsampler's one frame. ``at_start``: the batch being processed begins the video (its
    first frame is the causal image frame: padded by the start rule, never pooled with another frame).
    ``shard``: set on a time shard's cache (``vae3d.parallel.ShardCache``), whose frames before the
    chunk come from the ranks before it and whose norm statistics are the shard's.
    """

    shard: TimeShard | None = None

    def __init__(self) -> None:
        self.frames: dict[nn.Module, torch.Tensor] = {}
        self.partials: dict[nn.Module, list[torch.Tensor]] = {}
        self.at_start = True
        # Bytes of a frame from which the low-memory convolution takes time taps (None: its own rule),
        # set by an executor that knows which frames make its peak (vae3d.wan_lowmem).
        self.taps_from: int | None = None

    def carried(self, conv: CausalConv, x: torch.Tensor, tf: FrameTransform | None = None) -> torch.Tensor | None:
        """The ``k_t - 1`` transformed frames before x (B, C, T, H, W), or None at the start of the video."""
        if conv in self.partials:
            raise RuntimeError(
                "this video's earlier frame batches ran without autograd (the cache holds running sums, "
                "not input frames); run the whole video with autograd either enabled or disabled"
            )
        return self.frames.get(conv)

    def carry(self, conv: CausalConv, frames: torch.Tensor) -> None:
        """Keep the last ``k_t - 1`` frames of conv's padded input for the next batch."""
        self.frames[conv] = frames.clone()  # keeps the graph: gradients cross batches


# -- gradient checkpointing -------------------------------------------------------------------------------------


def checkpointing(module: nn.Module) -> bool:
    """Whether ``module`` checkpoints its blocks now: diffusers' flag is set on it and autograd records."""
    return torch.is_grad_enabled() and bool(getattr(module, "gradient_checkpointing", False))


def cache_keys(module: nn.Module) -> list[nn.Module]:
    """The modules under ``module`` (itself included) that keep frames in a ConvCache (``carries_frames``)."""
    return [m for m in module.modules() if getattr(m, "carries_frames", False)]


class _PureCall:
    """``call(*args, cache=...)`` (a block) as a pure function of its inputs, for a gradient-checkpointing function.

    Non-reentrant checkpointing runs the function again in backward, when the streaming loop's cache has
    moved on (later frame batches have carried their frames) and its flags have changed (``at_start``). So
    the frames the call reads come in as inputs (one per module of ``keys``, None where nothing is cached
    yet), the frames it carries go out as outputs, and each run works on a fresh ConvCache made from them
    and the flags as they were when the call was made: the recomputation sees what the forward saw and
    writes nowhere. The caller copies the outputs into the live cache once, in the forward.
    """

    def __init__(self, call: Callable, nargs: int, keys: list[nn.Module], cache: ConvCache | None) -> None:
        self.call, self.nargs, self.keys, self.cached = call, nargs, keys, cache is not None
        self.at_start, self.taps_from = (cache.at_start, cache.taps_from) if cache is not None else (True, None)

    def __call__(self, *inputs):
        if not torch.is_grad_enabled():  # made under autograd (``checkpointing``), run without: a reentrant function
            raise ValueError(
                "the gradient-checkpointing function ran the block without autograd (use_reentrant=True?): without "
                "autograd this VAE runs its low-memory inference path (vae3d.lowmem), not the one the backward "
                "recomputes, and the gradients would be wrong; call enable_gradient_checkpointing() without an "
                "argument (diffusers' default: torch.utils.checkpoint with use_reentrant=False) or pass a "
                "non-reentrant function"
            )
        args, before = inputs[: self.nargs], inputs[self.nargs :]
        if not self.cached:  # a whole video in one call: nothing carried
            return (self.call(*args, cache=None),)
        local = ConvCache()
        local.at_start, local.taps_from = self.at_start, self.taps_from
        local.frames = {k: f for k, f in zip(self.keys, before) if f is not None}
        out = self.call(*args, cache=local)
        return (out, *(local.frames.get(k) for k in self.keys))


def checkpointed(owner: nn.Module, module: nn.Module, *args, cache: ConvCache | None):
    """``module(*args, cache=cache)``; through ``owner``'s gradient-checkpointing function when ``checkpointing(owner)``.

    A time shard's cache exchanges halos with the other ranks on every read: a recomputation would run those
    collectives again inside backward, where nothing keeps the ranks in step. Refused (``CausalAutoencoder``
    says so before any compute).
    """
    if not checkpointing(owner):
        return module(*args, cache=cache)
    if cache is None:
        return owner._gradient_checkpointing_func(_PureCall(module, len(args), [], None), *args)[0]
    if cache.shard is not None:
        raise ValueError("gradient checkpointing and time sharding cannot be combined; call "
                         "disable_gradient_checkpointing() or disable_parallelism()")
    keys = cache_keys(module)
    for k in keys:
        if k in cache.partials:
            cache.carried(k, None)  # raises: earlier batches of this video ran without autograd
    out, *after = owner._gradient_checkpointing_func(
        _PureCall(module, len(args), keys, cache), *args, *(cache.frames.get(k) for k in keys)
    )
    for k, f in zip(keys, after):
        if f is not None:
            cache.frames[k] = f
    return out


def _triple(kernel_size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(k) != 3 or any(n < 1 for n in k):
        raise ValueError(f"kernel_size {kernel_size!r} must be a positive int or three of them (time, height, width)")
    return k  # type: ignore[return-value]


def _rule(module: nn.Module, kernel_time: int, start: str) -> None:
    """Set the padding rule's attributes on a causal convolution module."""
    if start not in STARTS:
        raise ValueError(f"start {start!r}; choose one of {STARTS}")
    module.time_pad = kernel_time - 1  # frames before the first: copies / zeros, or the cache
    module.start = start


def start_frames(conv: CausalConv, h: torch.Tensor) -> torch.Tensor:
    """The ``time_pad`` frames before a video's first frame, for transformed frames h (B, C, T, H, W).

    "replicate": copies of h's first frame (a view; T >= 1). "zeros": zero frames (any T, also 0).
    """
    b, c, _, hh, ww = h.shape
    if conv.start == "zeros":
        return h.new_zeros(b, c, conv.time_pad, hh, ww)
    return h[:, :, :1].expand(-1, -1, conv.time_pad, -1, -1)


def kernel(conv: CausalConv, h: torch.Tensor) -> torch.Tensor:
    """The plain convolution of an already time-padded input h (B, C, p + T, H, W) -> (B, C', T, H, W)."""
    c = conv.conv3d
    return F.conv3d(h, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


def causal_forward(
    self: CausalConv,
    x: torch.Tensor | FrameSource,
    cache: ConvCache | None = None,
    transform: FrameTransform | None = None,
    overwrite_input: bool = False,
) -> torch.Tensor:
    """conv(pad(transform(x))) causally: x (B, C, T, H, W) -> (B, C', T, H, W).

    ``cache`` carries the last frames between batches (None: a whole video in one call). Without
    autograd ``vae3d.lowmem`` runs the call (same output); there x may be a ``FrameSource`` (frames
    computed on request) and ``overwrite_input`` (C == C') lets the output take x's storage. An input
    of no frames gives no frames (a time shard may hold none of a stream), the cache unchanged.
    """
    if lowmem.active():
        return lowmem.causal_conv3d(self, x, cache, transform, overwrite_input)
    if not isinstance(x, torch.Tensor):
        raise ValueError("a FrameSource input needs autograd disabled (torch.no_grad or inference_mode)")
    h = x if transform is None else transform(x, 0, x.shape[2])
    p = self.time_pad
    if p > 0:
        before = cache.carried(self, h) if cache is not None else None
        if before is None:  # the start of a video
            before = start_frames(self, h)
        if h.shape[2] == 0:  # before stays in the graph: a shard's halo exchange has a backward on every rank
            return empty_output(self, h) + before.sum() * 0 if before.requires_grad else empty_output(self, h)
        h = torch.cat([before, h], dim=2)  # (B, C, p + T, H, W)
        if cache is not None:
            cache.carry(self, h[:, :, -p:])
    elif h.shape[2] == 0:
        return empty_output(self, h)
    return kernel(self, h)


def empty_output(conv: CausalConv, x: torch.Tensor | FrameSource) -> torch.Tensor:
    """The output of no input frames: (B, C', 0, H, W)."""
    b, _, _, hh, ww = x.shape
    return torch.empty(b, conv.conv3d.out_channels, 0, hh, ww, dtype=x.dtype, device=x.device)


class CausalConv3d(nn.Module):
    """Conv3d, causal in time (the rule above), zero padded in space; the weights in ``self.conv``.

    CogVideoX's layout: state-dict names equal diffusers' (``...conv1.conv.weight``).
    """

    time_pad: int
    start: str
    halo_tag = ""  # names the time stream a time shard exchanges halos on (vae3d.parallel)

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3,
        start: str = "replicate",
    ) -> None:
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        _rule(self, kt, start)
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), padding=(0, (kh - 1) // 2, (kw - 1) // 2))

    @property
    def conv3d(self) -> nn.Conv3d:
        return self.conv

    @property
    def carries_frames(self) -> bool:
        return self.time_pad > 0

    forward = causal_forward


class FlatCausalConv3d(nn.Conv3d):
    """The same causal convolution with the weights on the module itself (Wan's names: ``conv1.weight``).

    The spatial zero padding is the Conv3d's own; time is padded by the rule (zeros at the start by default).
    """

    time_pad: int
    start: str
    halo_tag = ""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3,
        start: str = "zeros",
    ) -> None:
        kt, kh, kw = _triple(kernel_size)
        super().__init__(in_channels, out_channels, (kt, kh, kw), padding=(0, (kh - 1) // 2, (kw - 1) // 2))
        _rule(self, kt, start)

    @property
    def conv3d(self) -> nn.Conv3d:
        return self

    @property
    def carries_frames(self) -> bool:
        return self.time_pad > 0

    forward = causal_forward


# Either layout: what lowmem, parallel and the caches take.
CausalConv = CausalConv3d | FlatCausalConv3d
