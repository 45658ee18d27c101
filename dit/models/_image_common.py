"""Input checks and the text projection the image transformers (DiT, MMDiT, CogView3-Plus) share.

Their attention, feed-forward and adaLN pieces are the shared transformer primitives of `dit.layers`.
"""

from __future__ import annotations

from torch import Tensor, nn


def check_shape(name: str, value: Tensor | None, expected: tuple[int | str, ...]) -> None:
    """ValueError unless `value` has shape `expected`; a str entry (e.g. "L") is a free dimension."""
    if value is None or value.ndim != len(expected) or any(
        not isinstance(e, str) and n != e for n, e in zip(value.shape, expected)
    ):
        got = None if value is None else tuple(value.shape)
        raise ValueError(f"{name} must have shape ({', '.join(map(str, expected))}), got {got}")


def check_latents(x: Tensor, timestep, *, in_channels: int, patch_size: int, max_grid: int | None = None) -> int:
    """The batch size of latents (B, C, H, W) with H, W multiples of the patch; ValueError naming what is wrong.

    `max_grid`: patches per side of a fixed positional table (SD3, CogView3-Plus), which caps H and W.
    """
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"hidden_states must have shape (B, {in_channels}, H, W), got {tuple(x.shape)}")
    b, _, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent height and width must be divisible by patch_size {p}, got {h}x{w}; "
                         f"expected e.g. {h - h % p}x{w - w % p}")
    if max_grid is not None and (h > max_grid * p or w > max_grid * p):
        raise ValueError(f"latent {h}x{w} exceeds the positional table: height and width must be <= {max_grid * p} "
                         f"(pos_embed_max_size {max_grid} x patch_size {p})")
    if timestep is None:
        raise ValueError(f"timestep is required: a scalar or shape ({b},)")
    return b


class TextProjection(nn.Module):
    """Linear -> SiLU -> Linear (diffusers' PixArtAlphaTextProjection with act_fn='silu')."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))
