"""Building blocks shared by every transformer family: named adaLN modulation, MLP, norms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) conditioning broadcast over the tokens of (B, L, D)."""
    if shift.ndim == x.ndim - 1:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)  # (B, 1, D)
    return torch.addcmul(shift, x, 1 + scale)


class ModulationOut(dict):
    """Named modulation chunks: `m.shift`, `m.scale`, `m.gate`, ... (also `m["shift"]`)."""

    def __getattr__(self, name: str) -> Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"modulation has no chunk {name!r}; it has {', '.join(self)}") from None


class Modulation(nn.Module):
    """adaLN modulation: SiLU -> Linear(cond_dim, len(names) * dim), split into named chunks.

    The order of `names` is the order of the chunks in the linear layer's output, which is what a
    checkpoint fixes (diffusers' AdaLayerNormZero is shift, scale, gate, shift_mlp, scale_mlp, gate_mlp;
    AdaLayerNormContinuous is scale, shift). Zero-initialised (adaLN-Zero): a fresh block is the identity.
    """

    def __init__(self, cond_dim: int, dim: int, names: Sequence[str], *, bias: bool = True):
        super().__init__()
        if len(set(names)) != len(names):
            raise ValueError(f"modulation chunk names must be unique, got {list(names)}")
        self.names = tuple(names)
        self.dim = dim
        self.act = nn.SiLU()
        self.linear = nn.Linear(cond_dim, len(self.names) * dim, bias=bias)
        nn.init.zeros_(self.linear.weight)
        if bias:
            nn.init.zeros_(self.linear.bias)

    def forward(self, cond: Tensor) -> ModulationOut:
        chunks = self.linear(self.act(cond)).chunk(len(self.names), dim=-1)  # each (B, D)
        return ModulationOut(zip(self.names, chunks))


class MLP(nn.Module):
    """Transformer feed-forward: Linear -> GELU(tanh) -> Linear (diffusers' FeedForward 'gelu-approximate')."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None, *, bias: bool = True,
                 approximate: str = "tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as diffusers' RMSNorm), optional learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6, *, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # fp32 statistics
        if self.weight is None:
            return x.to(dtype)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return (x * self.weight).to(dtype)
