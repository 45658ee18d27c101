"""Building blocks of the Wan VAE (Wan 2.1 and 2.2; Wan team, "Wan: Open and Advanced Large-Scale Video
Generative Models", 2025): RMS norm, the causal residual block, per-frame attention, time-aware
resampling, and Wan 2.2's space/time-to-channel shortcuts (AvgDown3D, DupUp3D).

Module and parameter names equal diffusers' (``conv1.weight``, ``norm1.gamma``,
``upsamplers.0.resample.1.weight``, ``time_conv.weight``) so that diffusers' ``AutoencoderKLWan``
state dicts load without renaming, and the causal convolutions are ``FlatCausalConv3d`` (the same
padding rule as CogVideoX's, starting from zero frames instead of copies of the first frame).

Unlike CogVideoX's GroupNorm, the RMS norm is per pixel and frame: nothing is computed over time or
space, so frame batches, tiles and time shards change nothing but the carried convolution caches.

The first frame of a video is an image frame, as in CogVideoX: the time downsampler passes it through
alone, the time upsampler does not double it (and its time convolution's stream starts after it),
and DupUp3D drops its extra copies. Forwards are the reference path; without autograd the
convolutions hand their call to ``vae3d.lowmem`` and the decoder to ``vae3d.wan_lowmem``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import lowmem
from .blocks import causal_residual
from .causal_conv import ConvCache, FlatCausalConv3d, FrameTransform, checkpointed
from .lowmem import FrameSource, frame_range, frames_per_step, identity

RESAMPLE_MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")


class RMSNorm(nn.Module):
    """x / max(||x||_C, 1e-12) * sqrt(C) * gamma (+ bias): RMS norm over channels, per pixel (WanRMS_norm).

    ``images``: gamma is (C, 1, 1) for (N, C, H, W) inputs, else (C, 1, 1, 1) for (B, C, T, H, W).
    fp16/bf16 inputs are normalised in fp32.
    """

    def __init__(self, dim: int, images: bool = False, bias: bool = False) -> None:
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def apply_to(self, x: torch.Tensor, act: bool = False) -> torch.Tensor:
        """The norm (+ SiLU) of x (B, C, ...); without autograd its temporaries are written over in place."""
        low = x.dtype in (torch.float16, torch.bfloat16)
        xf = x.float() if low else x
        y = xf / torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min(1e-12)  # (B, C, ...)
        if low:
            y = y.to(x.dtype)
        inplace = lowmem.active()
        g = self.gamma * self.scale
        y = y.mul_(g) if inplace else y * g
        if self.bias is not None:
            y = y.add_(self.bias) if inplace else y + self.bias
        return F.silu(y, inplace=inplace) if act else y

    def transform(self, act: bool = True) -> FrameTransform:
        """The norm (+ SiLU) as a frame-wise transform (it is per frame: nothing to precompute)."""
        return lambda s, a, b: self.apply_to(s, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_to(x)


class ResidualBlock(nn.Module):
    """x + conv2(drop(act(norm2(conv1(act(norm1(x))))))): causal 3x3x3 convolutions, RMS norms, SiLU;
    a causal 1x1x1 ``conv_shortcut`` when the channel count changes (WanResidualBlock)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = FlatCausalConv3d(in_dim, out_dim, 3)
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = FlatCausalConv3d(out_dim, out_dim, 3)
        self.conv_shortcut = FlatCausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor | FrameSource, cache: ConvCache | None = None) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, C', T, H, W)."""
        return causal_residual(self, x, cache, self.norm1.transform(), lambda h: self.norm2.transform())


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, pre-norm, residual (WanAttentionBlock)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, f: torch.Tensor) -> torch.Tensor:
        """f + proj(attention(qkv(norm(f)))) of frames f (N, C, H, W)."""
        h = f.shape[2]
        q, k, v = rearrange(self.to_qkv(self.norm(f)), "n (three c) h w -> three n 1 (h w) c", three=3)
        o = F.scaled_dot_product_attention(q, k, v)  # (N, 1, H * W, C)
        return self.proj(rearrange(o, "n 1 (h w) c -> n c h w", h=h)) + f

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, C, T, H, W); without autograd a few frames at a time. Per frame: nothing
        is cached (``cache`` is taken, and ignored, like the other layers' of an encoder level)."""
        b = x.shape[0]
        if not lowmem.active():
            return rearrange(self.attend(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) c h w -> b c t h w", b=b)
        out = torch.empty_like(x)
        step = frames_per_step(x)
        for t0 in range(0, x.shape[2], step):
            f = rearrange(x[:, :, t0 : t0 + step], "b c t h w -> (b t) c h w")
            out[:, :, t0 : t0 + step] = rearrange(self.attend(f), "(b t) c h w -> b c t h w", b=b)
        return out


class Resample(nn.Module):
    """2x resampling in space, and in time for the "3d" modes (WanResample).

    upsample: nearest 2x then a 3x3 conv (to ``upsample_out_dim`` channels, default dim // 2); "3d"
    first doubles time at low resolution with ``time_conv`` (causal, 3 time taps, dim -> 2 dim: the
    two halves are the two output frames). downsample: 3x3 stride-2 conv after a right/bottom zero pad;
    "3d" then halves time with ``time_conv`` (3 time taps, stride 2).
    """

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None) -> None:
        super().__init__()
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"resample mode {mode!r}; choose one of {RESAMPLE_MODES}")
        self.mode = mode
        self.time_conv: nn.Module | None = None
        if mode.startswith("upsample"):
            out = dim // 2 if upsample_out_dim is None else upsample_out_dim
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(dim, out, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = FlatCausalConv3d(dim, dim * 2, (3, 1, 1))
                self.time_conv.halo_tag = "time upsampling"  # its stream skips the image frame
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    @property
    def conv(self) -> nn.Conv2d:
        return self.resample[1]

    @property
    def carries_frames(self) -> bool:
        """A time downsampler keeps the one frame before the next batch in the ConvCache (``time_down``)."""
        return self.mode == "downsample3d"

    def time_up(self, x: torch.Tensor, cache: ConvCache | None, image_first: bool) -> torch.Tensor:
        """x (B, C, T, h, w) -> (B, C, T', h, w): each frame becomes two (the halves of time_conv's output),
        except the image frame (``image_first``), which is kept as it is and not in time_conv's stream."""
        if self.mode != "upsample3d":
            return x
        head, stream = (x[:, :, :1], x[:, :, 1:]) if image_first else (x[:, :, :0], x)
        y = self.time_conv(stream, cache)  # (B, 2C, T - 1 or T, h, w)
        y = rearrange(y, "b (two c) n h w -> b c (n two) h w", two=2)
        return torch.cat([head, y], dim=2) if head.shape[2] else y

    def time_down(self, x: torch.Tensor, cache: ConvCache | None) -> torch.Tensor:
        """x (B, C, T, h, w) -> (B, C, T', h, w): output 0 of a video is its image frame, as it is; output
        j >= 1 is time_conv over frames 2j - 2 .. 2j. Carried between batches (and sent between time
        shards): the one frame before the batch."""
        if self.mode != "downsample3d":
            return x
        shard = cache.shard if cache is not None else None
        if shard is not None:  # every rank takes part in the exchange; rank 0 has the image frame instead
            before = shard.halo(x, identity, 1, "zeros", "time downsampling")
            if shard.image_first:  # (its received nothing stays in the graph: the exchange's backward runs on all)
                x, before = torch.cat([before[:, :, :0], x], dim=2), None
        else:
            before = None if cache is None or cache.at_start else cache.frames[self]
            if cache is not None:
                cache.frames[self] = x[:, :, -1:].clone()
        head, rest = (x[:, :, :1], x) if before is None else (x[:, :, :0], torch.cat([before, x], dim=2))
        assert rest.shape[2] % 2 == 1, (rest.shape, before is None)  # 2 frames per output after the first
        if rest.shape[2] < 3:
            return head
        return torch.cat([head, self.time_conv(rest)], dim=2)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The 2D resampling of every frame: x (B, C, T, h, w) -> (B, C', T, h', w')."""
        if self.mode.startswith("upsample"):
            if lowmem.active():  # phase kernels, a few frames at a time
                return lowmem.upsample(self.conv, x, list(range(x.shape[2])))
            y = lowmem.upsample2x(self.conv, rearrange(x, "b c t h w -> (b t) c h w"))
            return rearrange(y, "(b t) c h w -> b c t h w", b=x.shape[0])
        b = x.shape[0]
        if not lowmem.active():
            y = self.resample(rearrange(x, "b c t h w -> (b t) c h w"))
            return rearrange(y, "(b t) c h w -> b c t h w", b=b)
        out = x.new_empty(b, self.conv.out_channels, x.shape[2], x.shape[3] // 2, x.shape[4] // 2)
        for a, z, f in frame_slices(x):  # a few frames at a time
            y = self.resample(rearrange(f, "b c t h w -> (b t) c h w"))
            out[:, :, a:z] = rearrange(y, "(b t) c h w -> b c t h w", b=b)
        return out

    def lazy(self, x: torch.Tensor, cache: ConvCache | None, image_first: bool) -> lowmem.UpsampledFrames:
        """An upsampler's output as a FrameSource: time doubled now (low resolution), space on request."""
        y = self.time_up(x, cache, image_first)
        return lowmem.UpsampledFrames(self.conv, y, list(range(y.shape[2])))

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None, image_first: bool = True) -> torch.Tensor:
        """x (B, C, T, h, w) -> (B, C', T', h', w'); ``image_first``: x's first frame is the video's first."""
        if self.mode.startswith("upsample"):
            return self.spatial(self.time_up(x, cache, image_first))
        return self.time_down(self.spatial(x), cache)


class AvgDown3D(nn.Module):
    """Wan 2.2's down-block shortcut: (f_t, f_s, f_s) blocks of pixels to channels, then the mean of channel groups.

    An odd frame count (a clip's image frame) is completed with a zero frame before the first.
    """

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1) -> None:
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if in_channels * factor % out_channels:
            raise ValueError(
                f"in_channels {in_channels} x the downsampling factor {factor} must be divisible by out_channels "
                f"{out_channels}"
            )
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, C', ceil(T / f_t), H / f_s, W / f_s)."""
        ft, fs = self.factor_t, self.factor_s
        pad = -x.shape[2] % ft
        if pad:
            x = F.pad(x, (0, 0, 0, 0, pad, 0))
        y = rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w", ft=ft, fh=fs, fw=fs)
        return y.unflatten(1, (self.out_channels, -1)).mean(2)  # (B, C', group, t, h, w) -> (B, C', t, h, w)


class DupUp3D(nn.Module):
    """Wan 2.2's up-block shortcut: channels repeated, then channel blocks to (f_t, f_s, f_s) blocks of pixels.

    At the start of a video (``first``) the first f_t - 1 output frames are dropped: the image frame
    gives one frame.
    """

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1) -> None:
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if out_channels * factor % in_channels:
            raise ValueError(
                f"out_channels {out_channels} x the upsampling factor {factor} must be divisible by in_channels "
                f"{in_channels}"
            )
        self.repeats = out_channels * factor // in_channels
        self.factor_t, self.factor_s = factor_t, factor_s

    def forward(self, x: torch.Tensor, first: bool = False) -> torch.Tensor:
        """x (B, C, T, h, w) -> (B, C', T f_t (- f_t + 1 if first), h f_s, w f_s)."""
        ft, fs = self.factor_t, self.factor_s
        y = x.repeat_interleave(self.repeats, dim=1)
        y = rearrange(y, "b (c ft fh fw) t h w -> b c (t ft) (h fh) (w fw)", ft=ft, fh=fs, fw=fs)
        return y[:, :, ft - 1 :] if first else y

    def frames(self, x: torch.Tensor, first: bool, a: int, b: int) -> torch.Tensor:
        """Output frames a..b-1 of ``self(x, first)``, computed from the source frames they come from."""
        skip = self.factor_t - 1 if first else 0
        lo, hi = (a + skip) // self.factor_t, (b - 1 + skip) // self.factor_t + 1
        y = self(x[:, :, lo:hi])
        start = a + skip - lo * self.factor_t
        return y[:, :, start : start + b - a]


class MidBlock(nn.Module):
    """Residual block, per-frame attention, residual block (WanMidBlock with one attention layer)."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        x = checkpointed(self, self.resnets[0], x, cache=cache)
        return checkpointed(self, self.resnets[1], self.attentions[0](x), cache=cache)


class ResidualDownBlock(nn.Module):
    """Wan 2.2's encoder level: residual blocks, then the resampler, plus the AvgDown3D shortcut of the input."""

    def __init__(
        self, in_dim: int, out_dim: int, dropout: float, num_res_blocks: int, temporal: bool, down: bool
    ) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2 if down else 1)
        self.resnets = nn.ModuleList(
            ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks)
        )
        self.downsampler = Resample(out_dim, "downsample3d" if temporal else "downsample2d") if down else None

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        h = x
        for resnet in self.resnets:
            h = resnet(h, cache)
        if self.downsampler is not None:
            h = self.downsampler(h, cache)
        return h + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """Wan 2.1's decoder level: residual blocks, then (except the last level) ``upsamplers.0``."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, mode: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks + 1)
        )
        self.upsamplers = nn.ModuleList([Resample(out_dim, mode)]) if mode is not None else None
        self.gradient_checkpointing = False

    @property
    def up(self) -> Resample | None:
        return self.upsamplers[0] if self.upsamplers is not None else None

    shortcut = None  # no shortcut around the level (Wan 2.2's levels have one)

    def forward(self, x: torch.Tensor, image_first: bool, cache: ConvCache | None = None) -> torch.Tensor:
        return up_level(self, x, cache, image_first)


class ResidualUpBlock(nn.Module):
    """Wan 2.2's decoder level: residual blocks, then ``upsampler`` (to out_dim channels), plus the DupUp3D
    shortcut of the level's input (only on levels that upsample)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, mode: str | None) -> None:
        super().__init__()
        temporal = mode == "upsample3d"
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if mode is not None else None
        self.resnets = nn.ModuleList(
            ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks + 1)
        )
        self.upsampler = Resample(out_dim, mode, upsample_out_dim=out_dim) if mode is not None else None
        self.gradient_checkpointing = False

    @property
    def up(self) -> Resample | None:
        return self.upsampler

    @property
    def shortcut(self) -> DupUp3D | None:
        return self.avg_shortcut

    def forward(self, x: torch.Tensor, image_first: bool, cache: ConvCache | None = None) -> torch.Tensor:
        return up_level(self, x, cache, image_first)


def up_level(
    block: UpBlock | ResidualUpBlock, x: torch.Tensor, cache: ConvCache | None, image_first: bool
) -> torch.Tensor:
    """One decoder level (either version), the reference path: x (B, C, T, h, w) -> (B, C', T', 2h, 2w).

    Each residual block is checkpointed when the level's gradient checkpointing is on."""
    h = x
    for resnet in block.resnets:
        h = checkpointed(block, resnet, h, cache=cache)
    if block.up is None:
        return h
    h = block.up(h, cache, image_first)
    return h if block.shortcut is None else h + block.shortcut(x, image_first)


def frame_slices(x: torch.Tensor | FrameSource, step: int | None = None):
    """(a, b, frames a..b-1 of x) in order, ``step`` frames at a time (default: about SLICE_BYTES each)."""
    t = x.shape[2]
    step = step or frames_per_step(x)
    for a in range(0, t, step):
        b = min(t, a + step)
        yield a, b, frame_range(x, a, b)
