"""Shared helpers for transformer parity tests: seeded random weights, save with diffusers, load with ours."""

from __future__ import annotations

import torch
from torch import nn

import dit


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Overwrite every parameter (and persistent float buffer) with seeded N(0, std^2): nothing stays at its
    zero/one init, so a parity test cannot pass by both sides computing an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in list(model.named_parameters()) + [(n, b) for n, b in model.state_dict().items()
                                                       if n not in dict(model.named_parameters())]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * std)
    return model.eval()


def save_and_load(ref: nn.Module, folder) -> nn.Module:
    """save_pretrained with diffusers, then `dit.load_transformer` the folder (strict load into our class)."""
    ref.save_pretrained(str(folder))
    return dit.load_transformer(str(folder))


def rel_max_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the output's scale (max |ref|)."""
    ref = ref.float()
    return ((ours.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
