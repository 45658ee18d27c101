"""The one attention function. Every block calls `attention`; the backend is chosen here only."""

from __future__ import annotations

from typing import Callable, Protocol, Union

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("sdpa", "xformers", "math")


class AttentionFn(Protocol):
    """A callable attention backend (the context-parallel wrappers in `dit.parallel` are such objects)."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None) -> Tensor: ...


Backend = Union[str, AttentionFn, None]


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build that fails at import
        return False
    return True


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _math(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None) -> Tensor:
    # Reference path in fp32: used by tests and as a last resort where no fused kernel runs.
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return (logits.softmax(dim=-1) @ v.float()).to(q.dtype)


def _xformers(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None) -> Tensor:
    import xformers.ops as xops

    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if mask is not None:
        # xformers wants a dense (B, H, Lq, Lk) bias.
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    # xformers takes (B, L, H, D); ours is (B, H, L, D).
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=mask, scale=scale
    )
    return out.transpose(1, 2)


def resolve_backend(backend: Backend, q: Tensor | None = None) -> Callable[..., Tensor]:
    """Turn a backend name (or callable) into the function that runs; a clear error when it cannot run."""
    if backend is None or backend == "sdpa":
        return _sdpa
    if callable(backend):
        return backend
    if backend == "math":
        return _math
    if backend == "xformers":
        if not xformers_available():
            raise ValueError(
                "attention backend 'xformers' was selected but xformers is not installed "
                "(pip install 'dit-gen[xformers]'); accepted backends here: 'sdpa', 'math'"
            )
        if q is not None and q.device.type != "cuda":
            raise ValueError(
                f"attention backend 'xformers' runs on CUDA tensors only, got device {q.device}; "
                "use 'sdpa' on this device"
            )
        return _xformers
    raise ValueError(f"unknown attention backend {backend!r}; accepted: {', '.join(BACKENDS)} or a callable")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    scale: float | None = None,
    backend: Backend = None,
) -> Tensor:
    """Scaled dot-product attention over (B, H, L, D) tensors; returns (B, H, Lq, D).

    `mask` is boolean (True = attend) or additive, broadcastable to (B, H, Lq, Lk).
    `backend` is 'sdpa' (default), 'xformers' (CUDA only), 'math', or a callable with the same signature
    (context-parallel attention objects), so swapping the backend never touches a model file.
    """
    return resolve_backend(backend, q)(q, k, v, mask=mask, scale=scale)
