"""Building blocks of the CogVideoX VAE: norms, the 3D ResNet block, time-aware down/upsampling.

Module and parameter names equal diffusers' (``norm1.norm_layer.weight``, ``conv1.conv.weight``,
``downsamplers.0.conv.weight``) so that diffusers' state dicts load without renaming.

Norms are split into statistics (over the whole frame batch, in fp32) and a frame-wise apply, so
that the apply can be fused into the next causal convolution a few frames at a time (see
``lowmem``). Statistics per frame batch are what diffusers' frame-batched decode computes.

Forwards are the reference path; without autograd a few of them hand the call to ``vae3d.lowmem``
(chosen by ``lowmem.active()``), which computes the same with less memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from einops import rearrange

from . import lowmem
from .causal_conv import CausalConv3d, ConvCache, FrameTransform
from .lowmem import FrameSource, frame_range, frames_per_step


# stats(x, groups) -> (var, mean), each (B, G, T) or (B, G, 1) in fp32: the GroupNorm statistics
# of x (B, C, T, H, W) per frame, when they are not simply x's own (a time shard's: vae3d.parallel).
NormStats = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def group_var_mean(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean of x (B, C, ...) per (batch, group), in fp32: two (B, G) tensors.

    fp16/bf16 inputs are upcast one group at a time, so no full fp32 copy is made.
    """
    xg = x.reshape(x.shape[0], groups, -1)  # (B, G, C/G * T * H * W)
    if x.dtype == torch.float32:
        return torch.var_mean(xg, dim=-1, correction=0)
    stats = [torch.var_mean(xg[:, i].float(), dim=-1, correction=0) for i in range(groups)]
    return torch.stack([v for v, _ in stats], 1), torch.stack([m for _, m in stats], 1)


def merge_var_mean(
    variances: torch.Tensor, means: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(var, mean) of the union of parts, from each part's (P, ...) var and mean and its share (P,) of the count.

    Chan et al.'s pairwise merge: exact, and stable where a sum / sum-of-squares difference would cancel.
    """
    w = (weights / weights.sum()).view(-1, *[1] * (means.ndim - 1))  # (P, 1, ...)
    mean = (w * means).sum(0)
    return (w * (variances + (means - mean) ** 2)).sum(0), mean


def streamed_var_mean(x: FrameSource, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``group_var_mean`` of a FrameSource (B, C, T, H, W), computed a few frames at a time: two (B, G)."""
    t, step = x.shape[2], frames_per_step(x)
    parts = [group_var_mean(frame_range(x, a, min(t, a + step)), groups) for a in range(0, t, step)]
    counts = torch.tensor([min(t, a + step) - a for a in range(0, t, step)], dtype=torch.float32, device=x.device)
    return merge_var_mean(torch.stack([v for v, _ in parts]), torch.stack([m for _, m in parts]), counts)


def group_norm_transform(
    norm: nn.GroupNorm, x: torch.Tensor | FrameSource, act: bool = True, stats: NormStats | None = None
) -> FrameTransform:
    """GroupNorm (+ SiLU) of ``x`` (B, C, T, H, W) as a frame-wise transform.

    Mean and variance are computed once over the whole batch in fp32 (or given per frame by
    ``stats``); the returned function normalises any frame range with them. A FrameSource's
    statistics are streamed (``streamed_var_mean``).
    """
    b, c = x.shape[:2]
    g = norm.num_groups
    if stats is None:
        whole = group_var_mean if isinstance(x, torch.Tensor) else streamed_var_mean
        var, mean = (v[..., None] for v in whole(x, g))  # (B, G, 1): one for all frames
    else:
        var, mean = stats(x, g)  # (B, G, T) or (B, G, 1)
    rstd = torch.rsqrt(var + norm.eps)
    # Fold normalisation and affine into one per-channel (and per-frame) scale and shift: y = x * a + s.
    scale = rstd.repeat_interleave(c // g, dim=1)  # (B, C, T or 1)
    shift = -mean.repeat_interleave(c // g, dim=1) * scale
    if norm.affine:
        scale = scale * norm.weight.float()[:, None]
        shift = shift * norm.weight.float()[:, None] + norm.bias.float()[:, None]
    scale = scale[:, :, :, None, None]  # (B, C, T or 1, 1, 1)
    shift = shift[:, :, :, None, None]
    per_frame = scale.shape[2] > 1
    dtype = x.dtype  # the closure keeps only what it needs, not x
    low = dtype != torch.float32

    def apply(s: torch.Tensor, a: int, b_: int) -> torch.Tensor:
        sc, sh = (scale[:, :, a:b_], shift[:, :, a:b_]) if per_frame else (scale, shift)
        y = torch.addcmul(sh, s.float() if low else s, sc)  # fp32 math for fp16/bf16 inputs
        if low:
            y = y.to(dtype)
        return F.silu(y, inplace=lowmem.active()) if act else y

    return apply


def cache_stats(cache: ConvCache | None) -> NormStats | None:
    """The norm statistics a call's cache asks for: a time shard's, else None (the batch's own)."""
    return cache.shard.norm_stats if cache is not None and cache.shard is not None else None


def _latent_index(frames: int, latent_frames: int) -> list[int]:
    """Latent frame that conditions each of ``frames`` feature frames (nearest, in time).

    As diffusers: an odd frame count > 1 keeps frame 0 with latent 0 and stretches the rest.
    """
    if frames > 1 and frames % 2 == 1 and latent_frames > 1:
        r = (frames - 1) // (latent_frames - 1)
        return [0] + [1 + (t - 1) // r for t in range(1, frames)]
    r = frames // latent_frames
    return [t // r for t in range(frames)]


class SpatialNorm3D(nn.Module):
    """Spatially conditioned norm (MoVQ, Zheng et al. 2022): GN(f) * conv_y(zq) + conv_b(zq).

    zq is nearest-upsampled to f's size before the 1x1x1 convolutions in diffusers; a 1x1x1
    convolution commutes with nearest upsampling, so they run at latent size here and the result
    is broadcast, never materialised at feature size.
    """

    def __init__(self, f_channels: int, zq_channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm_layer = nn.GroupNorm(num_channels=f_channels, num_groups=groups, eps=1e-6, affine=True)
        self.conv_y = CausalConv3d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, kernel_size=1)

    def transform(
        self, f: torch.Tensor, zq: torch.Tensor, act: bool = True, stats: NormStats | None = None
    ) -> FrameTransform:
        """Frame-wise SpatialNorm (+ SiLU) of f (B, C, T, H, W) conditioned on zq (B, Z, Tz, h, w).

        zq holds the latent frames of f's frames (a time shard's own latents when sharded).
        """
        norm = group_norm_transform(self.norm_layer, f, act=False, stats=stats)
        y = self.conv_y(zq)  # (B, C, Tz, h, w)
        b = self.conv_b(zq)
        index = torch.tensor(_latent_index(f.shape[2], zq.shape[2]), device=f.device)
        rh, rw = f.shape[3] // zq.shape[3], f.shape[4] // zq.shape[4]

        def apply(s: torch.Tensor, a: int, b_: int) -> torch.Tensor:
            h = norm(s, a, b_)
            ys, bs = y[:, :, index[a:b_]], b[:, :, index[a:b_]]  # (B, C, n, h, w)
            n, zh, zw = ys.shape[2:]
            hv = h.view(h.shape[0], h.shape[1], n, zh, rh, zw, rw)  # (B, C, n, h, rh, w, rw)
            ys, bs = ys[:, :, :, :, None, :, None], bs[:, :, :, :, None, :, None]
            if lowmem.active():
                torch.addcmul(bs, hv, ys, out=hv)
                return F.silu(h, inplace=True) if act else h
            h = torch.addcmul(bs, hv, ys).view(h.shape)
            return F.silu(h) if act else h

        return apply

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        return self.transform(f, zq, act=False)(f, 0, f.shape[2])


class ResnetBlock3D(nn.Module):
    """Pre-norm 3D ResNet block: x + conv2(act(norm2(conv1(act(norm1(x)))))).

    ``spatial_norm_dim`` set (decoder) uses SpatialNorm3D conditioned on the latents.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        spatial_norm_dim: int | None = None,
    ) -> None:
        super().__init__()
        if spatial_norm_dim is None:
            self.norm1 = nn.GroupNorm(num_channels=in_channels, num_groups=groups, eps=eps)
            self.norm2 = nn.GroupNorm(num_channels=out_channels, num_groups=groups, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(in_channels, spatial_norm_dim, groups)
            self.norm2 = SpatialNorm3D(out_channels, spatial_norm_dim, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels, kernel_size=3)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, kernel_size=3)
        # diffusers' non-causal 1x1x1 shortcut (a plain Conv3d, named conv_shortcut).
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _norm_act(
        self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None, stats: NormStats | None
    ) -> FrameTransform:
        if isinstance(norm, SpatialNorm3D):
            return norm.transform(x, zq, stats=stats)
        return group_norm_transform(norm, x, stats=stats)

    def forward(
        self, x: torch.Tensor | FrameSource, zq: torch.Tensor | None, cache: ConvCache | None
    ) -> torch.Tensor:
        """x + conv2(act(norm2(conv1(act(norm1(x)))))) of x (B, C, T, H, W); zq: the latents (SpatialNorm).

        Without autograd x may be a FrameSource (read frame by frame three times: norm1's statistics,
        conv1's input, the shortcut), conv2 writes over its input and the shortcut is added in frame slices.
        """
        stats = cache_stats(cache)
        return causal_residual(
            self, x, cache, self._norm_act(self.norm1, x, zq, stats), lambda h: self._norm_act(self.norm2, h, zq, stats)
        )


def causal_residual(
    block: nn.Module, x: torch.Tensor | FrameSource, cache: ConvCache | None, norm_act1: FrameTransform,
    norm_act2: Callable[[torch.Tensor], FrameTransform],
) -> torch.Tensor:
    """x + conv2(dropout(norm_act2(h))) with h = conv1(norm_act1(x)): the ResNet block both VAEs share.

    ``block`` has causal ``conv1``, ``conv2``, a ``dropout`` and a 1x1x1 ``conv_shortcut`` (None: the
    identity); ``norm_act2(h)`` builds conv2's frame-wise transform once h exists. Without autograd
    conv2 writes over its input (h is not needed afterwards) and the shortcut is added in frame slices.
    """
    h = block.conv1(x, cache, norm_act1)
    tf2 = norm_act2(h)
    if block.dropout.p > 0 and block.training:
        norm_act = tf2
        tf2 = lambda s, a, b: block.dropout(norm_act(s, a, b))  # noqa: E731 (as diffusers: before conv2)
    h = block.conv2(h, cache, tf2, overwrite_input=True)
    shortcut = block.conv_shortcut if block.conv_shortcut is not None else (lambda s: s)
    if lowmem.active():
        return lowmem.add_frames(h, x, shortcut)
    return h + shortcut(x)


class Downsample3D(nn.Module):
    """Halve H and W (3x3 stride-2 conv after a right/bottom zero pad); optionally halve time.

    Time is halved by averaging frame pairs; the causal first frame of a video with an odd
    frame count stays alone (it is the image frame).
    """

    def __init__(self, in_channels: int, out_channels: int, compress_time: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=0)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor, at_start: bool = True) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames: list[tuple[int, ...]] = [(i,) for i in range(t)]
        if self.compress_time:
            keep_first = t % 2 == 1
            if keep_first and not at_start and t > 1:
                raise AssertionError(f"a frame batch after the first has an odd frame count {t}")
            first = [(0,)] if keep_first else []
            frames = first + [(i, i + 1) for i in range(len(first), t, 2)]
        out = x.new_empty(b, self.conv.out_channels, len(frames), (h - 2) // 2 + 1, (w - 2) // 2 + 1)
        step = frames_per_step(x)
        for j0 in range(0, len(frames), step):
            group = frames[j0 : j0 + step]
            f = torch.stack(
                [x[:, :, s[0]] if len(s) == 1 else (x[:, :, s[0]] + x[:, :, s[1]]) / 2 for s in group], 1
            )  # (B, n, C, H, W)
            y = self.conv(F.pad(f.flatten(0, 1), (0, 1, 0, 1)))  # (B * n, C', H / 2, W / 2)
            out[:, :, j0 : j0 + len(group)] = rearrange(y, "(b n) c h w -> b c n h w", b=b)
        return out


class Upsample3D(nn.Module):
    """Double H and W (nearest, then 3x3 conv); optionally double time by repeating frames.

    When x's first frame is the video's image frame (``image_first``: the caller decides, from the
    latent count of the batch or, for a time shard, of the whole clip) it is not repeated. A repeated
    frame gives the same convolution output, so each source frame is convolved once and written twice.
    Without autograd the nearest upsampling is never materialised (``lowmem.phase_upsample``).
    """

    def __init__(self, in_channels: int, out_channels: int, compress_time: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.compress_time = compress_time

    def source_frames(self, t: int, image_first: bool) -> list[int]:
        """The input frame of each output frame, for an input of t frames."""
        if not self.compress_time:
            return list(range(t))
        return [i for i in range(t) for _ in range(1 if (i == 0 and image_first) else 2)]

    def upsample(self, f: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """conv(nearest_2x(f)) of frames f (N, C, h, w) -> (N, C', 2h, 2w); ``weight``: lowmem.phase_weight, if at hand."""
        return lowmem.upsample2x(self.conv, f, weight)

    def lazy(self, x: torch.Tensor, image_first: bool) -> lowmem.UpsampledFrames:
        """``self(x, image_first)`` as a FrameSource: frames computed on request."""
        return lowmem.UpsampledFrames(self.conv, x, self.source_frames(x.shape[2], image_first))

    def forward(self, x: torch.Tensor, image_first: bool) -> torch.Tensor:
        """x (B, C, T, h, w) -> (B, C', T', 2h, 2w)."""
        if lowmem.active():  # a few source frames at a time
            return lowmem.upsample(self.conv, x, self.source_frames(x.shape[2], image_first))
        y = self.upsample(rearrange(x, "b c t h w -> (b t) c h w"))
        y = rearrange(y, "(b t) c h w -> b c t h w", b=x.shape[0])
        return y[:, :, self.source_frames(x.shape[2], image_first)]  # (B, C', T', 2h, 2w)
