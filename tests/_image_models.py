"""Helpers for the image-transformer parity tests (DiT, SD3/SD3.5, CogView3-Plus)."""

from __future__ import annotations

import pytest
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


def assert_bf16_load_close(ref: nn.Module, tmp_path, kw: dict, kw16: dict) -> None:
    """load_transformer(torch_dtype=bf16) of ref's folder runs in bf16 within 2e-2 (relative) of diffusers'
    own bf16 load and of the fp32 reference; kw16 is kw with the float inputs in bf16."""
    ours = roundtrip(ref, tmp_path, torch_dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    ref16 = type(ref).from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        got = ours(**kw16).sample
        assert got.dtype == torch.bfloat16
        assert rel_err(got, ref16(**kw16).sample) <= 2e-2
        assert rel_err(got, ref(**kw).sample) <= 2e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| relative to the reference output's scale (its max abs value)."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(cls, config: dict) -> nn.Module:
    with torch.device("meta"):
        return cls.from_config(config)


def assert_same_parameters(ours: nn.Module, ref: nn.Module) -> int:
    """Same parameter count and the same state-dict names and shapes; returns the count."""
    assert count_params(ours) == count_params(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    return count_params(ours)


def assert_each_raises(model: nn.Module, kw: dict, bad: list[tuple[dict, str]]) -> None:
    """For each (override, message): model(**kw with override) raises a ValueError matching message."""
    for override, message in bad:
        with pytest.raises(ValueError, match=message):
            model(**{**kw, **override})


def fresh_copy(model: nn.Module) -> nn.Module:
    """The same class and weights, built from the config (in training mode, gradients on)."""
    copy = type(model).from_config(model.config)
    copy.load_state_dict(model.state_dict())
    return copy


def assert_checkpointing_keeps_gradients(model: nn.Module, kw: dict) -> None:
    """Gradient checkpointing gives every parameter the same gradient as the plain backward pass."""

    def grads():
        model.zero_grad()
        model(**kw).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys() == {n for n, _ in model.named_parameters()}
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def assert_compiles_fullgraph(module: nn.Module, *args, backend: str = "eager", **kwargs) -> None:
    """torch.compile(fullgraph=True) runs without graph breaks and gives the eager outputs."""
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    with torch.no_grad():
        got, expected = compiled(*args, **kwargs), module(*args, **kwargs)
    if hasattr(expected, "sample"):
        got, expected = got.sample, expected.sample
    tol = {} if backend == "eager" else dict(rtol=1e-5, atol=1e-5)  # inductor may reorder float sums
    torch.testing.assert_close(got, expected, **tol)
