"""Pieces the image transformers (DiT, MMDiT, CogView3-Plus) share, with diffusers' parameter names.

Parameter names follow diffusers (`attn.to_q`, `attn.to_out.0`, `ff.net.0.proj`, `ff.net.2`, ...) so that
checkpoints load without renaming and diffusers LoRA files target the same modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit.attention import Backend, attention, resolve_backend
from dit.layers import RMSNorm

# Chunk order of diffusers' AdaLayerNormZero linear (a checkpoint fixes it).
ADALN_ZERO = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
# AdaLayerNormContinuous puts scale before shift.
ADALN_CONTINUOUS = ("scale", "shift")


def layer_norm(x: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim without affine parameters (every adaLN norm in these models)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def gated_add(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """adaLN-Zero residual x + gate * y, gate (B, D) broadcast over tokens, in one fused op."""
    return torch.addcmul(x, gate.unsqueeze(1), y)


def broadcast_timestep(timestep: Tensor | float | int, batch: int, device: torch.device) -> Tensor:
    """A scalar or (B,) timestep as a (B,) tensor; ValueError for any other shape."""
    t = torch.as_tensor(timestep, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.ndim == 1 and t.shape[0] == 1 and batch != 1:
        t = t.expand(batch)
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"timestep must be a scalar or have shape ({batch},), got shape {tuple(t.shape)}")
    return t


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


class _ProjGELU(nn.Module):
    """diffusers' GELU activation module: it owns the input projection (`net.0.proj`)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear with diffusers' FeedForward names (`net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, dim_out: int | None = None, *, mult: int = 4, activation_fn: str = "gelu-approximate",
                 dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if activation_fn not in ("gelu", "gelu-approximate"):
            raise ValueError(f"activation_fn {activation_fn!r} is not supported; accepted: 'gelu', 'gelu-approximate'")
        inner = int(dim * mult)
        approximate = "tanh" if activation_fn == "gelu-approximate" else "none"
        self.net = nn.ModuleList(
            [_ProjGELU(dim, inner, approximate, bias), nn.Dropout(dropout), nn.Linear(inner, dim_out or dim, bias=bias)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[1](self.net[0](x)))


def _qk_norm(kind: str | None, head_dim: int, eps: float, affine: bool) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "rms_norm":
        return RMSNorm(head_dim, eps, elementwise_affine=affine)
    if kind == "layer_norm":
        return nn.LayerNorm(head_dim, eps=eps, elementwise_affine=affine)
    raise ValueError(f"qk_norm {kind!r} is not supported; accepted: None, 'rms_norm', 'layer_norm'")


def _packed(linears: Sequence[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """One (sum out, in) weight and bias for several linears, as a view when their storage is adjacent.

    Used for inference only: the first call copies the weights into one buffer and points each
    linear's `.data` at its slice (same Parameter objects, same names, no extra memory); later calls
    find them adjacent and take a zero-copy view. Anything that replaces the tensors (`.to()`, a
    load with assign=True) is detected by the pointer check and repacked on the next call.
    """
    ws = [lin.weight for lin in linears]
    bs = [lin.bias for lin in linears]
    has_bias = all(b is not None for b in bs)
    if has_bias != any(b is not None for b in bs):
        raise AssertionError("fused projections need all or none of the biases")

    def adjacent(ts: list[Tensor]) -> bool:
        size = ts[0].element_size()
        return all(t.is_contiguous() and t.dtype == ts[0].dtype and t.device == ts[0].device for t in ts) and all(
            b.data_ptr() == a.data_ptr() + a.numel() * size for a, b in zip(ts, ts[1:])
        ) and all(t.untyped_storage().data_ptr() == ts[0].untyped_storage().data_ptr() for t in ts)

    def view(ts: list[Tensor]) -> Tensor:
        rows = sum(t.shape[0] for t in ts)
        return ts[0].detach().new_empty(0).set_(
            ts[0].untyped_storage(), ts[0].storage_offset(), (rows, *ts[0].shape[1:])
        )

    def pack(ts: list[Tensor]) -> None:
        with torch.inference_mode(False):  # a normal tensor even under inference_mode, so training can follow
            fused = torch.cat([t.detach() for t in ts])
        offset = 0
        for t in ts:
            t.data = fused[offset: offset + t.shape[0]]
            offset += t.shape[0]

    if not adjacent(ws):
        pack(ws)
    if has_bias and not adjacent(bs):
        pack(bs)
    return view(ws), (view(bs) if has_bias else None)


def _plain(lin: nn.Module) -> bool:
    """A bare nn.Linear: not wrapped (PEFT LoRA) and without hooks that must see its call (accelerate's
    offload hooks bring the weights to the device in a pre-forward hook; user hooks read activations)."""
    return type(lin) is nn.Linear and not (lin._forward_pre_hooks or lin._forward_hooks or hasattr(lin, "_hf_hook"))


def fused_linear(x: Tensor, linears: Sequence[nn.Module]) -> Tensor:
    """`torch.cat([lin(x) for lin in linears], -1)` as one matmul (fused QKV), keeping the modules' names.

    Inference, or frozen weights (a teacher, a ControlNet's base), uses packed weights (no copy);
    trainable weights and torch.compile concatenate the weights so gradients reach each Parameter; wrapped or
    hooked modules (PEFT LoRA, accelerate offload, forward hooks) run one by one.
    """
    if not all(_plain(lin) for lin in linears):
        return torch.cat([lin(x) for lin in linears], dim=-1)
    params = [p for lin in linears for p in (lin.weight, lin.bias) if p is not None]
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    else:
        weight, bias = _packed(linears)
    return F.linear(x, weight, bias)


class Attention(nn.Module):
    """Multi-head attention with diffusers' names; with `context=True` a second token stream (MMDiT).

    The context stream has its own projections (`add_q_proj`, `add_k_proj`, `add_v_proj`, `to_add_out`,
    `norm_added_q/k`); both streams attend jointly over [image, context] (SD3's order). The attention
    itself is `dit.attention.attention` with `self.attn_backend`.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, bias: bool = True, out_bias: bool = True,
                 qk_norm: str | None = None, qk_norm_affine: bool = True, eps: float = 1e-6,
                 context: bool = False, context_out: bool = True, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.attn_backend: Backend = None
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.norm_q = _qk_norm(qk_norm, head_dim, eps, qk_norm_affine)
        self.norm_k = _qk_norm(qk_norm, head_dim, eps, qk_norm_affine)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias), nn.Dropout(dropout)])
        self.context = context
        if context:
            self.add_q_proj = nn.Linear(dim, inner, bias=bias)
            self.add_k_proj = nn.Linear(dim, inner, bias=bias)
            self.add_v_proj = nn.Linear(dim, inner, bias=bias)
            # diffusers always gives the context stream affine RMS weights (RMSNorm's default).
            self.norm_added_q = _qk_norm(qk_norm, head_dim, eps, qk_norm != "layer_norm" or qk_norm_affine)
            self.norm_added_k = _qk_norm(qk_norm, head_dim, eps, qk_norm != "layer_norm" or qk_norm_affine)
            # SD3's last block is "context pre-only": its text outputs are dropped, so no to_add_out.
            self.to_add_out = nn.Linear(inner, dim, bias=out_bias) if context_out else None

    def project(self, x: Tensor, stream: str = "x") -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of one stream, each (B, L, H, Dh) with the stream's qk-norm applied."""
        if stream == "x":
            projs, nq, nk = (self.to_q, self.to_k, self.to_v), self.norm_q, self.norm_k
        else:
            projs, nq, nk = (self.add_q_proj, self.add_k_proj, self.add_v_proj), self.norm_added_q, self.norm_added_k
        qkv = fused_linear(x, projs)  # (B, L, 3 * H * Dh)
        q, k, v = qkv.unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)  # each (B, L, H, Dh), strided
        if nq is not None:
            q, k = nq(q), nk(k)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, L, H, Dh) inputs -> (B, Lq, H * Dh) output."""
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=self.attn_backend)
        return out.transpose(1, 2).flatten(2)  # (B, H, Lq, Dh) -> (B, Lq, H * Dh)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor | None]:
        """Self-attention over x (B, N, D); with c (B, M, D), joint attention returning (x_out, c_out)."""
        q, k, v = self.project(x)  # (B, N, H, Dh)
        if c is None:
            return self.to_out[1](self.to_out[0](self.attend(q, k, v)))
        cq, ck, cv = self.project(c, "context")  # (B, M, H, Dh)
        n = x.shape[1]
        # Text queries are computed even where their outputs are dropped (SD3's last block has no
        # to_add_out), as diffusers does: attention backends (context-parallel ones included) always see
        # one joint sequence, and training sees the same (zero) gradients as diffusers' model.
        q, k, v = (torch.cat(pair, dim=1) for pair in ((q, cq), (k, ck), (v, cv)))  # (B, N + M, H, Dh)
        out = self.attend(q, k, v)  # (B, N + M, D)
        x_out = self.to_out[1](self.to_out[0](out[:, :n]))
        return x_out, (self.to_add_out(out[:, n:]) if self.to_add_out is not None else None)


class AttentionBackendMixin:
    """`set_attention_backend` / `reset_attention_backend` for models built from `Attention` modules.

    Listed before ModelMixin in a model's bases, so it replaces diffusers' processor-based version.
    """

    def set_attention_backend(self, backend: Backend) -> None:
        """'sdpa' (default), 'xformers', 'math', or a callable attention(q, k, v, *, mask, scale)."""
        backend = {"native": "sdpa", "_native_math": "math"}.get(backend, backend)  # diffusers' names
        resolve_backend(backend)  # unknown names fail here, not in the middle of a forward
        for module in self.modules():
            if isinstance(module, Attention):
                module.attn_backend = backend

    def reset_attention_backend(self) -> None:
        self.set_attention_backend(None)

    def fuse_qkv_projections(self) -> None:
        """No-op kept for diffusers scripts: q, k, v always run as one matmul here (see `fused_linear`)."""

    def unfuse_qkv_projections(self) -> None:
        """No-op kept for diffusers scripts: fusion never changes parameters or their names here."""


def checkpointed(model: nn.Module, block: nn.Module, *args):
    """Run a block, through diffusers' gradient-checkpointing function when enabled and training."""
    if torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False):
        return model._gradient_checkpointing_func(block, *args)
    return block(*args)
