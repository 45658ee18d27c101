"""Timestep embeddings, sin-cos positions (1D/2D/3D) and patchify/unpatchify for 2D and 3D latents."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn


def timestep_embedding(
    t: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> Tensor:
    """Sinusoidal timestep features (DDPM / "Attention is all you need"); (N,) -> (N, dim), fp32.

    `flip_sin_to_cos` and `downscale_freq_shift` reproduce the variants checkpoints were trained with
    (DiT, SD3 and CogVideoX use flip=True, shift=0; some use shift=1).
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor of shape (N,), got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))  # (half,)
    args = scale * t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb  # (N, dim)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear (diffusers' Timesteps + TimestepEmbedding)."""

    def __init__(self, freq_dim: int, dim: int, *, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        freqs = timestep_embedding(
            t, self.freq_dim, flip_sin_to_cos=self.flip_sin_to_cos, downscale_freq_shift=self.downscale_freq_shift
        )
        freqs = freqs.to(dtype or self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(freqs)))  # (N, dim)


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """1D sin-cos features of positions (MAE / DiT); (M,) -> (M, dim), computed in float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    out = torch.outer(pos.reshape(-1).double(), omega)  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def sincos_2d(dim: int, grid_h: Tensor, grid_w: Tensor) -> Tensor:
    """2D sin-cos positions over an (H, W) grid, row-major tokens: half the channels for w, half for h.

    The w half comes first, as in MAE/DiT/diffusers (their meshgrid puts w first). Returns (H*W, dim).
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding dim must be divisible by 4, got {dim}")
    gw, gh = torch.meshgrid(grid_w, grid_h, indexing="xy")  # each (H, W)
    return torch.cat([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], dim=1)  # (H*W, dim)


def sincos_pos_embed_2d(
    dim: int, height: int, width: int, *, base_size: float | None = None, interpolation_scale: float = 1.0,
    device: torch.device | None = None,
) -> Tensor:
    """2D sin-cos positions (H*W, dim) in fp32; `base_size` rescales the grid (PixArt / SD3 convention)."""
    gh = torch.arange(height, dtype=torch.float32, device=device)
    gw = torch.arange(width, dtype=torch.float32, device=device)
    if base_size is not None:
        gh, gw = gh / (height / base_size), gw / (width / base_size)
    return sincos_2d(dim, gh / interpolation_scale, gw / interpolation_scale).float()


def sincos_pos_embed_3d(
    dim: int, frames: int, height: int, width: int, *, spatial_interpolation_scale: float = 1.0,
    temporal_interpolation_scale: float = 1.0, device: torch.device | None = None,
) -> Tensor:
    """3D sin-cos positions (CogVideoX): a quarter of the channels for time, then 2D for space.

    Returns (F, H*W, dim) in fp32.
    """
    if dim % 4:
        raise ValueError(f"3D sin-cos embedding dim must be divisible by 4, got {dim}")
    gh = torch.arange(height, dtype=torch.float32, device=device) / spatial_interpolation_scale
    gw = torch.arange(width, dtype=torch.float32, device=device) / spatial_interpolation_scale
    spatial = sincos_2d(3 * dim // 4, gh, gw)  # (H*W, 3D/4)
    gt = torch.arange(frames, dtype=torch.float32, device=device) / temporal_interpolation_scale
    temporal = sincos_1d(dim // 4, gt)  # (F, D/4)
    pos = torch.cat(
        [temporal[:, None].expand(-1, height * width, -1), spatial[None].expand(frames, -1, -1)], dim=-1
    )  # (F, H*W, D)
    return pos.float()


def patchify_2d(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p); tokens row-major, channels (c, p1, p2)."""
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)


def unpatchify_2d(x: Tensor, p: int, height: int, width: int) -> Tensor:
    """(B, (H/p)(W/p), C p p) -> (B, C, H, W); height/width are in latent pixels. Channels (c, p1, p2)."""
    return rearrange(x, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=height // p, w=width // p, p1=p, p2=p)


def patchify_3d(x: Tensor, p: int, pt: int = 1) -> Tensor:
    """(B, F, C, H, W) -> (B, (F/pt)(H/p)(W/p), C pt p p); frame-major tokens, as CogVideoX orders them."""
    return rearrange(x, "b (f pt) c (h p1) (w p2) -> b (f h w) (c pt p1 p2)", pt=pt, p1=p, p2=p)


def unpatchify_3d(x: Tensor, p: int, pt: int, frames: int, height: int, width: int) -> Tensor:
    """(B, (F/pt)(H/p)(W/p), C pt p p) -> (B, F, C, H, W); sizes in latent frames/pixels."""
    return rearrange(
        x, "b (f h w) (c pt p1 p2) -> b (f pt) c (h p1) (w p2)",
        f=frames // pt, h=height // p, w=width // p, pt=pt, p1=p, p2=p,
    )
