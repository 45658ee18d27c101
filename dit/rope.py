"""3D rotary position embedding for video tokens (RoFormer, Su et al. 2021; CogVideoX, Yang et al. 2024; Wan 2025).

The head dimension is split into a time part and two space parts; each part rotates consecutive channel pairs
(x[2i], x[2i+1]) by angle pos * theta^(-2i/d) of its own axis.
- CogVideoX (`cogvideox_rope`): time 1/4, height and width 3/8 each; equal to diffusers' `get_3d_rotary_pos_embed`
  as CogVideoXPipeline calls it, so a caller may pass either.
- Wan (`wan_rope`): height and width 2 * (head_dim // 6) channels each, time the rest (44 / 42 / 42 of 128),
  integer positions; equal to diffusers' `WanRotaryPosEmbed`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_1d(dim: int, pos: Tensor, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables (S, dim) for positions (S,), each frequency repeated for its channel pair; fp32."""
    if dim % 2:
        raise ValueError(f"rotary embedding dim must be even, got {dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim)  # (dim/2,)
    angles = torch.outer(pos.float(), inv_freq)  # (S, dim/2)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)  # (S, dim) each


def rope_3d(head_dim: int, grid_t: Tensor, grid_h: Tensor, grid_w: Tensor, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables (T*H*W, head_dim) over a (t, h, w) grid of positions, frame-major tokens.

    Channels: [time head_dim/4 | height 3*head_dim/8 | width 3*head_dim/8], as CogVideoX was trained.
    """
    if head_dim % 8:
        raise ValueError(f"3D rotary embedding needs head_dim divisible by 8, got {head_dim}")
    dims = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    nt, nh, nw = len(grid_t), len(grid_h), len(grid_w)
    tables = [rope_1d(d, g, theta) for d, g in zip(dims, (grid_t, grid_h, grid_w))]  # each ((n, d), (n, d))

    def combine(t: Tensor, h: Tensor, w: Tensor) -> Tensor:
        full = torch.cat(
            [t[:, None, None].expand(-1, nh, nw, -1), h[None, :, None].expand(nt, -1, nw, -1),
             w[None, None, :].expand(nt, nh, -1, -1)], dim=-1,
        )  # (T, H, W, head_dim)
        return full.reshape(nt * nh * nw, head_dim)

    cos = combine(*(c for c, _ in tables))
    sin = combine(*(s for _, s in tables))
    return cos, sin


def _resize_crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The centred region a (grid_h, grid_w) grid covers once resized to fit the (base_h, base_w) training grid."""
    if grid_h / grid_w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / grid_h * grid_w))
    else:
        rh, rw = int(round(base_w / grid_w * grid_h)), base_w
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def cogvideox_rope(
    head_dim: int, frames: int, grid_h: int, grid_w: int, base_h: int, base_w: int, *,
    temporal_patch: bool, device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """The RoPE tables CogVideoX uses for a (frames, grid_h, grid_w) token grid, as its pipeline computes them.

    1.0 (no temporal patch): positions are stretched over the crop of the (base_h, base_w) training grid
    ("linspace" grid), so other resolutions interpolate rather than extrapolate. 1.5: integer positions.
    `frames`, `grid_h`, `grid_w` count tokens (after patching). Returns cos, sin of shape (F*H*W, head_dim).
    """
    f32 = dict(device=device, dtype=torch.float32)
    if temporal_patch:
        gt, gh, gw = (torch.arange(n, **f32) for n in (frames, grid_h, grid_w))
    else:
        (top, left), (bottom, right) = _resize_crop_region(grid_h, grid_w, base_h, base_w)
        # linspace(start, stop * (n - 1) / n, n) is the training recipe; it is not arange(start, stop).
        gh = torch.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, **f32)
        gw = torch.linspace(left, right * (grid_w - 1) / grid_w, grid_w, **f32)
        gt = torch.linspace(0, frames * (frames - 1) / frames, frames, **f32)
    return rope_3d(head_dim, gt, gh, gw)


def wan_rope(head_dim: int, frames: int, height: int, width: int, *, theta: float = 10000.0,
             device: torch.device | None = None) -> Tensor:
    """Wan's RoPE for a (frames, height, width) token grid as unit complex rotations (F*H*W, head_dim/2), complex64,
    frame-major tokens; channel pairs [time | height | width].

    Angles are computed in float64 and rounded once, as diffusers' `WanRotaryPosEmbed` tables are (its tables hold
    rope_max_seq_len positions per axis; the rows of the first n are these).
    """
    if head_dim % 2:
        raise ValueError(f"Wan's rotary embedding needs an even head_dim, got {head_dim}")
    space = 2 * (head_dim // 6)
    axes = []
    for dim, n in zip((head_dim - 2 * space, space, space), (frames, height, width)):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
        angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)  # (n, dim/2)
        axes.append(torch.complex(angles.cos().float(), angles.sin().float()))
    t, h, w = axes
    rot = torch.cat([t[:, None, None].expand(-1, height, width, -1), h[None, :, None].expand(frames, -1, width, -1),
                     w[None, None, :].expand(frames, height, -1, -1)], dim=-1)  # (F, H, W, head_dim/2)
    return rot.reshape(frames * height * width, head_dim // 2).to(device)


def rope_as_complex(cos: Tensor, sin: Tensor) -> Tensor:
    """Pair-repeated cos/sin tables (S, D) -> unit complex rotations (S, D/2), complex64."""
    return torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())


def apply_rope_(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate channel pairs of x (..., head_dim) in place: (a, b) -> (a cos - b sin, b cos + a sin).

    Each pair is a complex number, so the rotation is one complex multiply by `rot` (..., head_dim/2, complex64,
    broadcast against x): one pass over x in fp32 instead of diffusers' unbind/stack/flatten copies. bf16/fp16
    inputs are rotated in fp32 (as diffusers does) and written back.
    """
    pairs = x.unflatten(-1, (-1, 2))  # (..., head_dim/2, 2), a view
    if torch.compiler.is_compiling():  # inductor has no complex kernels: the same rotation in real arithmetic
        a, b = pairs.float().unbind(-1)  # each (..., head_dim/2)
        cos, sin = rot.real, rot.imag
        return x.copy_(torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2))
    if x.dtype == torch.float32:
        torch.view_as_complex(pairs).mul_(rot)
        return x
    z = torch.view_as_complex(pairs.float()).mul_(rot)
    return x.copy_(torch.view_as_real(z).flatten(-2))
