"""Helpers for the image-transformer parity tests (DiT, SD3/SD3.5, CogView3-Plus)."""

from __future__ import annotations

import torch
from torch import nn

import dit


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded normal weights of unit-ish gain, so zero-initialised layers (adaLN-Zero, outputs) do work.

    Matrices get std 1/sqrt(fan_in) (activations stay O(1) through the blocks); vectors std 0.1 around 0,
    norm scales around 1. A zero model would make parity trivial.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            std = fan_in ** -0.5 if p.ndim > 1 else 0.1
            is_norm_scale = p.ndim == 1 and "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight")
            p.normal_(1.0 if is_norm_scale else 0.0, std, generator=g)
    return model


def roundtrip(ref: nn.Module, tmp_path, **kwargs) -> nn.Module:
    """save_pretrained the diffusers model, load it with dit.load_transformer."""
    ref.save_pretrained(tmp_path)
    return dit.load_transformer(tmp_path, **kwargs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| relative to the reference output's scale (its max abs value)."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(cls, config: dict) -> nn.Module:
    with torch.device("meta"):
        return cls.from_config(config)
