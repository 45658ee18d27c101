"""The one attention function. Every block calls `attention`; the backend (the kernel) is chosen here only.

Backends, by name (diffusers' names are accepted too: `ALIASES`):

- "sdpa" (default): `F.scaled_dot_product_attention`, torch picking its kernel (flash, cuDNN, efficient, math);
- "sdpa_flash", "sdpa_cudnn", "sdpa_efficient": one of torch's fused CUDA kernels, forced;
- "flash": FlashAttention 2 (`flash_attn`); "flash3": FlashAttention 3 (`flash_attn_interface`, Hopper);
- "sage": SageAttention (`sageattention`, 8-bit quantised QK: approximate); "xformers": xformers' kernels;
- "math": the fp32 reference (tests, and a last resort);
- "auto": per call, the fastest exact kernel that is installed and runs on these tensors (`AUTO_ORDER`);
- or a callable `fn(q, k, v, *, mask, scale)` (the context-parallel wrappers in `dit.parallel` are such objects).

A backend that is not installed is an error when it is set (`resolve_backend`); one that cannot run on the tensors
of a call (device, dtype, head size, mask) is an error at that call naming why and what would run. Nothing falls
back silently except "auto", whose whole point that is.

`attention_lse` is the same choice for the ring (`dit.parallel`): the output and its log-sum-exp per query, the
quantity that merges partial attentions over K/V blocks exactly. Every kernel above returns it (the "sdpa" family
through torch's private ops, whose shapes are checked on the meta device in the tests).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Protocol, Union

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash", "flash3", "sage", "xformers",
            "math")
# diffusers' AttentionBackendName values that mean one of ours (model.set_attention_backend takes either).
ALIASES = {"native": "sdpa", "_native_flash": "sdpa_flash", "_native_cudnn": "sdpa_cudnn",
           "_native_efficient": "sdpa_efficient", "_native_math": "math", "_flash_3": "flash3"}
# "auto": the first of these that is installed and runs on the call's tensors. Exact kernels only (SageAttention
# quantises, so it is never picked for you); FlashAttention 3 before 2 (Hopper), then torch's own dispatch, which
# takes its flash / cuDNN / efficient kernels itself. bench/gpu.py times each to revisit this order.
AUTO_ORDER = ("flash3", "flash", "sdpa")
HALF = (torch.float16, torch.bfloat16)


class AttentionFn(Protocol):
    """A callable attention backend (the context-parallel wrappers in `dit.parallel` are such objects)."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None) -> Tensor: ...


Backend = Union[str, AttentionFn, None]


def canonical(backend: Backend) -> Backend:
    """A backend with diffusers' names mapped to ours (None and callables unchanged)."""
    return ALIASES.get(backend, backend) if isinstance(backend, str) else backend


# ------------------------------------------------------------------------------------------------- kernels


def _scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _math_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> tuple[Tensor, Tensor]:
    """Reference in fp32: (out in q's dtype, lse (B, H, Lq) fp32)."""
    logits = (q.float() @ k.float().transpose(-2, -1)) * _scale(q, scale)  # (B, H, Lq, Lk)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    lse = torch.logsumexp(logits, dim=-1)
    return ((logits - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def _math(q, k, v, mask, scale):
    return _math_lse(q, k, v, mask, scale)[0]


def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _forced_sdpa(kind: str) -> Callable:
    def run(q, k, v, mask, scale):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, kind)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    return run


def _sdpa_lse(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    """torch's dispatch with the lse: the CPU flash kernel, on CUDA its flash kernel where it runs, else the
    efficient one (any dtype), else the reference."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=_scale(q, scale))
        return out, lse.float()
    for name in ("sdpa_flash", "sdpa_efficient"):
        if KERNELS[name].unsupported(q, k, v, None) is None:
            return KERNELS[name].forward_lse(q, k, v, scale)
    return _math_lse(q, k, v, None, scale)


def _sdpa_flash_lse(q, k, v, scale):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=_scale(q, scale))
    return out, lse  # (B, H, Lq, D), (B, H, Lq) fp32


def _sdpa_efficient_lse(q, k, v, scale):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                          scale=_scale(q, scale))
    return out, lse[..., :q.shape[2]]  # the kernel pads the lse's length (to a multiple of 32)


def _sdpa_cudnn_lse(q, k, v, scale):
    # cuDNN reads its inputs as if contiguous in this layout (wrong results otherwise, as diffusers notes).
    q, k, v = (t.contiguous() for t in (q, k, v))
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                      scale=_scale(q, scale))
    return out, lse.reshape(q.shape[:3])  # (B, H, Lq, 1) on recent torch, (B, H, Lq) before


def _bhld(*ts: Tensor) -> list[Tensor]:
    """(B, H, L, D) <-> (B, L, H, D), views (the flash_attn kernels take any strides but the last)."""
    return [t.transpose(1, 2) for t in ts]


_TAKES: dict[tuple[Callable, str], bool] = {}  # (function, argument) -> whether it takes it; read once, not traced


_FUNCTIONS: dict[tuple[str, str], Callable] = {}  # (module, name) -> the package's function, imported once


def _function(module: str, name: str) -> Callable:
    if (module, name) not in _FUNCTIONS:
        _FUNCTIONS[module, name] = getattr(importlib.import_module(module), name)
    return _FUNCTIONS[module, name]


def _takes(fn: Callable, argument: str) -> bool:
    if (fn, argument) not in _TAKES:
        _TAKES[fn, argument] = argument in inspect.signature(fn).parameters
    return _TAKES[fn, argument]


def _flash_call(module: str, q, k, v, scale, lse: bool):
    fn = _function(module, "flash_attn_func")
    kwargs = {"softmax_scale": scale, "causal": False}
    if _takes(fn, "return_attn_probs"):  # FA3 versions without it return (out, lse) always
        kwargs["return_attn_probs"] = lse
    result = fn(*_bhld(q, k, v), **kwargs)
    out = result[0] if isinstance(result, (tuple, list)) else result
    return (out.transpose(1, 2), result[1].float()) if lse else out.transpose(1, 2)


def _flash(q, k, v, mask, scale):
    return _flash_call("flash_attn", q, k, v, scale, False)


def _flash_lse(q, k, v, scale):
    return _flash_call("flash_attn", q, k, v, scale, True)


def _flash3(q, k, v, mask, scale):
    return _flash_call("flash_attn_interface", q, k, v, scale, False)


def _flash3_lse(q, k, v, scale):
    return _flash_call("flash_attn_interface", q, k, v, scale, True)


def _sage(q, k, v, mask, scale):
    return _function("sageattention", "sageattn")(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)


def _sage_lse(q, k, v, scale):
    sageattn = _function("sageattention", "sageattn")
    if not _takes(sageattn, "return_lse"):
        raise ValueError("this sageattention does not return the log-sum-exp (ring attention needs it; "
                         "SageAttention 2 does): choose another backend for context parallelism")
    out, lse, *_ = sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale, return_lse=True)
    return out, lse.float()


def _xformers(q, k, v, mask, scale):
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if mask is not None:
        # xformers wants a dense (B, H, Lq, Lk) bias.
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    # xformers takes (B, L, H, D); ours is (B, H, L, D).
    out = _function("xformers.ops", "memory_efficient_attention")(*_bhld(q, k, v), attn_bias=mask, scale=scale)
    return out.transpose(1, 2)


def _xformers_lse(q, k, v, scale):
    out, lse = _function("xformers.ops.fmha", "memory_efficient_attention_partial")(*_bhld(q, k, v), scale=scale)
    return out.transpose(1, 2).to(q.dtype), lse.float()  # lse (B, H, Lq)


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Kernel:
    """One backend: what it needs installed, where it runs, and how it is called (with and without the lse)."""

    name: str
    forward: Callable[..., Tensor]  # (q, k, v, mask, scale) -> out
    forward_lse: Callable[..., tuple[Tensor, Tensor]]  # (q, k, v, scale) -> (out, lse (B, H, Lq) fp32)
    module: str | None = None  # the package it imports (None: torch itself)
    devices: tuple[str, ...] = ("cpu", "cuda", "meta")
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any
    max_head_dim: int | None = None
    masks: bool = True
    needs_cuda_build: bool = False  # a torch CUDA kernel: this torch build must have CUDA
    exact: bool = True

    def unsupported(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
        """Why this kernel cannot run this call (None: it can)."""
        if q.device.type not in self.devices:
            return f"runs on {' / '.join(d for d in self.devices if d != 'meta')} tensors, got {q.device.type}"
        if self.dtypes is not None and q.dtype not in self.dtypes:
            return f"takes {' or '.join(str(d).removeprefix('torch.') for d in self.dtypes)}, got {q.dtype}"
        if self.max_head_dim is not None and q.shape[-1] > self.max_head_dim:
            return f"takes head dims up to {self.max_head_dim}, got {q.shape[-1]}"
        if mask is not None and not self.masks:
            return "takes no attention mask"
        return None


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("sdpa", _sdpa, _sdpa_lse),
    Kernel("sdpa_flash", _forced_sdpa("FLASH_ATTENTION"), _sdpa_flash_lse, devices=("cuda", "meta"), dtypes=HALF,
           max_head_dim=256, masks=False, needs_cuda_build=True),
    Kernel("sdpa_cudnn", _forced_sdpa("CUDNN_ATTENTION"), _sdpa_cudnn_lse, devices=("cuda", "meta"), dtypes=HALF,
           max_head_dim=128, needs_cuda_build=True),
    Kernel("sdpa_efficient", _forced_sdpa("EFFICIENT_ATTENTION"), _sdpa_efficient_lse, devices=("cuda", "meta"),
           needs_cuda_build=True),
    Kernel("flash", _flash, _flash_lse, module="flash_attn", devices=("cuda",), dtypes=HALF, max_head_dim=256,
           masks=False),
    Kernel("flash3", _flash3, _flash3_lse, module="flash_attn_interface", devices=("cuda",), dtypes=HALF,
           max_head_dim=256, masks=False),
    Kernel("sage", _sage, _sage_lse, module="sageattention", devices=("cuda",), dtypes=HALF, max_head_dim=128,
           masks=False, exact=False),
    Kernel("xformers", _xformers, _xformers_lse, module="xformers.ops", devices=("cuda",)),
    Kernel("math", _math, lambda q, k, v, scale: _math_lse(q, k, v, None, scale)),
)}

_INSTALLED: dict[str, str | None] = {}  # kernel name -> None (usable) or why not; filled once per process


def not_installed(name: str) -> str | None:
    """Why kernel `name` cannot be used in this process at all (None: it can): a missing or broken package, or a
    torch build without CUDA."""
    if name not in _INSTALLED:
        kernel, reason = KERNELS[name], None
        if kernel.needs_cuda_build and not torch.backends.cuda.is_built():
            reason = f"this torch build ({torch.__version__}) has no CUDA"
        elif kernel.module is not None:
            try:
                importlib.import_module(kernel.module)
            except Exception as e:  # ImportError, or a build that fails at import (ABI mismatch)
                reason = f"{kernel.module} is not importable ({type(e).__name__}: {str(e)[:120]})"
        _INSTALLED[name] = reason
    return _INSTALLED[name]


def installed_backends() -> list[str]:
    """The kernels usable in this process (whatever the tensors), in BACKENDS order."""
    return [name for name in KERNELS if not_installed(name) is None]


def xformers_available() -> bool:
    return not_installed("xformers") is None


def runnable_backends(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> list[str]:
    """The installed kernels that can run this call."""
    return [n for n in installed_backends() if KERNELS[n].unsupported(q, k, v, mask) is None]


def _auto(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Kernel:
    for name in AUTO_ORDER:
        if not_installed(name) is None and KERNELS[name].unsupported(q, k, v, mask) is None:
            return KERNELS[name]
    return KERNELS["sdpa"]  # runs anywhere torch does


def _kernel(name: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Kernel:
    """The kernel for a call with a (checked) backend name; ValueError naming why it cannot run and what can."""
    if name == "auto":
        return _auto(q, k, v, mask)
    kernel = KERNELS[name]
    why = kernel.unsupported(q, k, v, mask)
    if why is not None:
        raise ValueError(f"attention backend {name!r} cannot run this call: it {why} (q {tuple(q.shape)} "
                         f"{q.dtype} on {q.device}, mask {'given' if mask is not None else 'none'}); backends that "
                         f"can: {', '.join(runnable_backends(q, k, v, mask))}, or 'auto'")
    return kernel


def resolve_backend(backend: Backend) -> Backend:
    """Check a backend once, where it is chosen: a callable, or the canonical name of an installed kernel (None is
    'sdpa'). ValueError for an unknown name or one whose package is missing, naming those that are installed."""
    backend = canonical(backend)
    if backend is None or callable(backend):
        return backend
    if backend == "auto":
        for name in AUTO_ORDER:
            not_installed(name)  # imported now, not inside a traced forward
        return backend
    if backend not in KERNELS:
        raise ValueError(f"unknown attention backend {backend!r}; accepted: {', '.join(BACKENDS)}, diffusers' "
                         f"{', '.join(ALIASES)}, or a callable fn(q, k, v, *, mask, scale)")
    why = not_installed(backend)
    if why is not None:
        hint = " (pip install 'dit-gen[xformers]')" if backend == "xformers" else ""
        raise ValueError(f"attention backend {backend!r} was selected but {why}{hint}; installed here: "
                         f"{', '.join(['auto', *installed_backends()])}")
    return backend


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
    `backend`: a name of `BACKENDS` (None: 'sdpa') or a callable with the same signature (context-parallel
    attention objects), so swapping the backend never touches a model file.
    """
    backend = canonical(backend)
    if callable(backend):
        return backend(q, k, v, mask=mask, scale=scale)
    name = resolve_backend(backend) or "sdpa"
    return _kernel(name, q, k, v, mask).forward(q, k, v, mask, scale)


def attention_lse(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                  backend: Backend = None) -> tuple[Tensor, Tensor]:
    """Attention without a mask and its log-sum-exp: (out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) fp32, the
    natural log of each query's softmax denominator over these keys). The ring's unit of work: partial results
    over K/V blocks merge exactly by their lse. `backend` as in `attention`, a name (a callable has no lse: None)."""
    backend = canonical(backend)
    name = "sdpa" if backend is None or callable(backend) else resolve_backend(backend)
    out, lse = _kernel(name, q, k, v, None).forward_lse(q, k, v, scale)
    return out, lse
