"""The transformer primitives every family is built from (DiT, MMDiT, CogVideoX, CogView3-Plus, and new ones).

- adaLN: `modulate`, `gated_add` and their two-expert forms (`expert_modulate`, `expert_gated_add`: text tokens
  and vision tokens of one sequence, each with its own chunks); `Modulation`, the named, zero-initialised chunks;
  `modulation_chunks`, the same names over precomputed parameters (Wan's table + shared projection).
- Norms: `layer_norm` (no affine), `RMSNorm`, and `qk_norm_layer`, the q/k norms the families use.
- `FeedForward` and `Attention` (self, cross, joint and extra-K/V attention, optional q/k norm, a RoPE hook,
  always through `dit.attention.attention`); `fused_linear`, the one fused-QKV projection.
- Model plumbing: `broadcast_timestep`, `checkpointed`, `AttentionBackendMixin`, and `needs_grad`, the one test
  of whether autograd records a call.

Parameter names are diffusers' (`to_q`, `to_out.0`, `norm_q`, `add_k_proj`, `net.0.proj`, `net.2`, ...), so
checkpoints load strictly, without renaming, and diffusers LoRA files target the same modules. Every forward
here is the reference path; the inference-only in-place / token-chunked execution is `dit/models/lowmem.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit.attention import Backend, attention, resolve_backend

# Chunk orders of diffusers' adaLN linears (a checkpoint fixes them): AdaLayerNormZero, AdaLayerNormContinuous.
ADALN_ZERO = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
ADALN_CONTINUOUS = ("scale", "shift")

Rope = Callable[[Tensor], Tensor]  # a RoPE hook: (B, H, L, Dh) queries or keys -> the same, rotated


# ------------------------------------------------------------------------------------------- model plumbing


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd records a call on these tensors (else they may be overwritten in place or packed)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def broadcast_timestep(timestep: Tensor | float | int, batch: int, device: torch.device) -> Tensor:
    """A scalar, (1,) or (B,) timestep as a (B,) tensor; ValueError for any other shape."""
    t = torch.as_tensor(timestep, device=device)
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
        t = t.reshape(1).expand(batch)
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"timestep must be a scalar or have shape ({batch},), got shape {tuple(t.shape)}")
    return t


def checkpointed(model: nn.Module, block: nn.Module, *args):
    """Run a block, through diffusers' gradient-checkpointing function when it is enabled and autograd records."""
    if torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False):
        return model._gradient_checkpointing_func(block, *args)
    return block(*args)


# ----------------------------------------------------------------------------------------------------- adaLN


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) conditioning broadcast over the tokens of (B, L, D)."""
    if shift.ndim == x.ndim - 1:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)  # (B, 1, D)
    return torch.addcmul(shift, x, 1 + scale)


def gated_add(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """adaLN-Zero residual x + gate * y, a (B, D) gate broadcast over the tokens of (B, L, D), in one fused op."""
    if gate.ndim == x.ndim - 1:
        gate = gate.unsqueeze(1)  # (B, 1, D)
    return torch.addcmul(x, gate, y)


def expert_modulate(x: Tensor, n_text: int, text: tuple[Tensor, Tensor], vision: tuple[Tensor, Tensor]) -> Tensor:
    """Expert adaLN (CogVideoX, CogView3-Plus): over a joint sequence (B, T + N, D) the first T = n_text tokens
    take the text expert's (shift, scale), the others the vision expert's. Returns (B, T + N, D)."""
    return torch.cat([modulate(x[:, :n_text], *text), modulate(x[:, n_text:], *vision)], dim=1)


def expert_gated_add(x: Tensor, n_text: int, gates: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
    """x + gate * y over a joint sequence (B, T + N, D): the text gate on the first n_text tokens, the vision gate
    on the others (gates: (text, vision), each (B, D))."""
    text, vision = gates
    return torch.cat([gated_add(x[:, :n_text], text, y[:, :n_text]), gated_add(x[:, n_text:], vision, y[:, n_text:])],
                     dim=1)


class ModulationOut(dict):
    """Named modulation chunks: `m.shift`, `m.scale`, `m.gate`, ... (also `m["shift"]`)."""

    def __getattr__(self, name: str) -> Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"modulation has no chunk {name!r}; it has {', '.join(self)}") from None


def modulation_chunks(params: Tensor, names: Sequence[str]) -> ModulationOut:
    """Named chunks of adaLN parameters laid out (..., len(names), D) (Wan: a block's learned `scale_shift_table`
    plus the model's shared timestep projection, instead of a per-block `Modulation` linear); each (..., D)."""
    if params.shape[-2] != len(names):
        raise ValueError(f"expected {len(names)} modulation chunks ({', '.join(names)}), "
                         f"got shape {tuple(params.shape)}")
    return ModulationOut(zip(names, params.unbind(-2)))


class Modulation(nn.Module):
    """adaLN modulation: SiLU -> Linear(cond_dim, len(names) * dim), split into named chunks.

    The order of `names` is the order of the chunks in the linear layer's output, which is what a
    checkpoint fixes (ADALN_ZERO, ADALN_CONTINUOUS above). Zero-initialised (adaLN-Zero): a fresh block is
    the identity.
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


# ----------------------------------------------------------------------------------------------------- norms


def layer_norm(x: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim without affine parameters (the norm before every adaLN modulation)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


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


QK_NORMS = (None, "layer_norm", "rms_norm", "rms_norm_across_heads")


def qk_norm_layer(kind: str | None, heads: int, head_dim: int, eps: float, affine: bool = True) -> nn.Module | None:
    """The norm of queries or keys: per head over Dh ("layer_norm": CogVideoX, CogView3-Plus; "rms_norm": SD3.5),
    or over all heads' H * Dh channels ("rms_norm_across_heads": Wan); None for none (DiT, SD3)."""
    if kind is None:
        return None
    if kind == "layer_norm":
        return nn.LayerNorm(head_dim, eps=eps, elementwise_affine=affine)
    if kind == "rms_norm":
        return RMSNorm(head_dim, eps, elementwise_affine=affine)
    if kind == "rms_norm_across_heads":
        return RMSNorm(heads * head_dim, eps, elementwise_affine=affine)
    raise ValueError(f"qk_norm {kind!r} is not supported; accepted: {', '.join(map(repr, QK_NORMS))}")


# ------------------------------------------------------------------------------------------- feed-forward


class GELU(nn.Module):
    """Linear then GELU: diffusers' `GELU` activation module, which owns the input projection (`net.0.proj`)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


ACTIVATIONS = {"gelu-approximate": "tanh", "gelu": "none"}  # diffusers' activation_fn -> F.gelu's `approximate`


class FeedForward(nn.Module):
    """Transformer MLP, Linear -> activation -> Linear, laid out as diffusers' FeedForward (`net.0.proj`, `net.2`).

    The hidden width is `inner_dim`, or `mult * dim`; `final_dropout` appends diffusers' last Dropout (`net.3`).
    """

    def __init__(self, dim: int, dim_out: int | None = None, *, mult: float = 4, inner_dim: int | None = None,
                 activation_fn: str = "gelu-approximate", dropout: float = 0.0, final_dropout: bool = False,
                 bias: bool = True):
        super().__init__()
        if activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn {activation_fn!r} is not supported; accepted: {', '.join(ACTIVATIONS)}")
        self.inner_dim = inner = inner_dim or int(dim * mult)
        layers = [GELU(dim, inner, ACTIVATIONS[activation_fn], bias), nn.Dropout(dropout),
                  nn.Linear(inner, dim_out or dim, bias=bias)]
        self.net = nn.ModuleList(layers + ([nn.Dropout(dropout)] if final_dropout else []))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# ------------------------------------------------------------------------------------- fused projections


def hooked(module: nn.Module) -> bool:
    """The module's call runs more than its arithmetic: forward hooks (activation capture), a diffusers hook
    (layerwise casting, group offload) or an accelerate hook (offload); a fast path must call it instead."""
    return bool(module._forward_pre_hooks or module._forward_hooks or hasattr(module, "_diffusers_hook")
                or hasattr(module, "_hf_hook"))


def _plain(lin: nn.Module) -> bool:
    """A bare nn.Linear whose call is just its matmul: not wrapped (PEFT LoRA), not `hooked`."""
    return type(lin) is nn.Linear and not hooked(lin)


def _adjacent(ts: list[Tensor]) -> bool:
    """The tensors follow one another in one storage, so together they are one (sum of rows, ...) tensor."""
    size, storage = ts[0].element_size(), ts[0].untyped_storage().data_ptr()
    return all(t.is_contiguous() and t.dtype == ts[0].dtype and t.device == ts[0].device
               and t.untyped_storage().data_ptr() == storage for t in ts) and all(
        b.data_ptr() == a.data_ptr() + a.numel() * size for a, b in zip(ts, ts[1:]))


def _pack(ts: list[Tensor]) -> None:
    """Copy the tensors into one buffer and point each one's `.data` at its slice (same Parameter objects),
    marked with the buffer so that `unpack` undoes this packing and no other storage sharing."""
    with torch.inference_mode(False):  # a normal tensor even under inference_mode, so training can follow
        fused = torch.cat([t.detach() for t in ts])
    offset = 0
    for t in ts:
        t.data = fused[offset: offset + t.shape[0]]
        t._packed_into = fused.untyped_storage().data_ptr()
        offset += t.shape[0]


def _packed(ts: list[Tensor]) -> Tensor:
    """One (sum of rows, ...) tensor over `ts`: packed on first use, then a zero-copy view."""
    if not _adjacent(ts):
        _pack(ts)
    rows = sum(t.shape[0] for t in ts)
    return ts[0].detach().new_empty(0).set_(ts[0].untyped_storage(), ts[0].storage_offset(), (rows, *ts[0].shape[1:]))


def unpack(linears: Sequence[nn.Module]) -> None:
    """Give weights that `fused_linear` packed their own storage again (before a state dict is taken: accelerate's
    checkpoints drop tensors that share storage). The next inference call packs them again."""
    for t in (getattr(lin, name, None) for lin in linears for name in ("weight", "bias")):
        if t is not None and getattr(t, "_packed_into", None) == t.untyped_storage().data_ptr():
            with torch.no_grad(), torch.inference_mode(False):
                t.data = t.detach().clone()
            t._packed_into = None


def fused_linear(x: Tensor, linears: Sequence[nn.Module]) -> Tensor:
    """`torch.cat([lin(x) for lin in linears], -1)` as one matmul (fused QKV), keeping the modules and names.

    Only where every linear is `_plain`: wrapped or hooked modules (PEFT LoRA, diffusers' layerwise casting and
    group offload, accelerate offload, forward hooks) are called one by one, so the wrapper or hook sees the call.
    Without autograd the weights are packed into one buffer once (no copy per call, no extra memory); while
    autograd records through them, and under torch.compile, they are concatenated per call so that gradients
    reach each Parameter.
    """
    has_bias = {lin.bias is not None for lin in linears}
    if not all(_plain(lin) for lin in linears) or len(has_bias) > 1:
        return torch.cat([lin(x) for lin in linears], dim=-1)
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears] if has_bias == {True} else []
    if torch.compiler.is_compiling() or needs_grad(*weights, *biases):
        return F.linear(x, torch.cat(weights), torch.cat(biases) if biases else None)
    return F.linear(x, _packed(weights), _packed(biases) if biases else None)


# -------------------------------------------------------------------------------------------------- attention


PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")  # what fused_linear may pack


def _unpack_before_state_dict(module: Attention, prefix: str, keep_vars: bool) -> None:
    module.unpack()


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names: the one attention module of every family.

    - self-attention `attn(x)`; cross-attention `attn(x, context)` (keys and values from `context`, whose width
      is `cross_attention_dim`);
    - `qk_norm` (see `qk_norm_layer`) on queries and keys: `norm_q`, `norm_k`;
    - `rope`, a hook applied to the queries and keys (B, H, L, Dh) that enter the softmax;
    - `added_kv_proj_dim`: a second token stream `added` with its own keys and values (`add_k_proj`,
      `add_v_proj`, `norm_added_k`). With `joint=True` (MMDiT) it also has queries (`add_q_proj`,
      `norm_added_q`) and an output projection (`to_add_out`, left out by `joint_out=False`), and both streams
      attend over [x, added] in one softmax: `attn(x, added=c)` returns (x_out, c_out or None). Otherwise
      (Wan I2V) the queries of x attend to the added tokens separately and the two results are summed.
    The attention itself is `dit.attention.attention` with `self.attn_backend`.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, cross_attention_dim: int | None = None,
                 added_kv_proj_dim: int | None = None, joint: bool = False, joint_out: bool = True,
                 bias: bool = True, out_bias: bool = True, qk_norm: str | None = None, qk_norm_affine: bool = True,
                 eps: float = 1e-6, dropout: float = 0.0):
        super().__init__()
        if joint and added_kv_proj_dim is None:
            raise ValueError("joint attention needs added_kv_proj_dim, the width of the second stream")
        inner = heads * head_dim
        self.heads, self.head_dim, self.joint = heads, head_dim, joint
        self.attn_backend: Backend = None
        self.across_heads = qk_norm == "rms_norm_across_heads"
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or dim, inner, bias=bias)
        self.norm_q = qk_norm_layer(qk_norm, heads, head_dim, eps, qk_norm_affine)
        self.norm_k = qk_norm_layer(qk_norm, heads, head_dim, eps, qk_norm_affine)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias), nn.Dropout(dropout)])
        if added_kv_proj_dim is not None:
            # diffusers gives the added stream affine norm weights except for a non-affine LayerNorm.
            added_affine = qk_norm != "layer_norm" or qk_norm_affine
            if joint:
                self.add_q_proj = nn.Linear(added_kv_proj_dim, inner, bias=bias)
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner, bias=bias)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner, bias=bias)
            if joint:
                self.norm_added_q = qk_norm_layer(qk_norm, heads, head_dim, eps, added_affine)
            self.norm_added_k = qk_norm_layer(qk_norm, heads, head_dim, eps, added_affine)
            # SD3's last block is "context pre-only": its text outputs are dropped, so no to_add_out.
            self.to_add_out = nn.Linear(inner, dim, bias=out_bias) if joint and joint_out else None
        self.register_state_dict_pre_hook(_unpack_before_state_dict)

    def unpack(self) -> None:
        """Separate storage for packed projection weights (see `unpack`); runs before every state dict."""
        unpack([getattr(self, name) for name in PROJECTIONS if getattr(self, name, None) is not None])

    def project(self, x: Tensor, linears: Sequence[nn.Module], norms: Sequence[nn.Module | None]) -> list[Tensor]:
        """x (B, L, D) through each linear (one matmul, `fused_linear`), each output normalised and split into
        heads: a list of contiguous (B, H, L, Dh) tensors."""
        outs = []
        for t, norm in zip(fused_linear(x, linears).chunk(len(linears), dim=-1), norms):  # each (B, L, H Dh)
            if norm is not None and self.across_heads:
                t = norm(t)  # over all heads' channels
            t = t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, L, Dh), a view
            if norm is not None and not self.across_heads:
                t = norm(t)  # per head: LayerNorm writes a fresh tensor in this (B, H, L, Dh) order
            outs.append(t.contiguous())  # the layout the CPU attention kernel runs fastest on
        return outs

    def qkv(self, x: Tensor, context: Tensor | None = None) -> list[Tensor]:
        """Queries of x and keys / values of x (or of context), each (B, H, L, Dh) with the q/k norms applied."""
        if context is None:
            return self.project(x, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k, None))
        return self.project(x, (self.to_q,), (self.norm_q,)) + self.project(context, (self.to_k, self.to_v),
                                                                             (self.norm_k, None))

    def added_qkv(self, c: Tensor) -> list[Tensor]:
        """The added stream's (q,) k, v, each (B, H, M, Dh): queries only for joint attention."""
        if self.joint:
            return self.project(c, (self.add_q_proj, self.add_k_proj, self.add_v_proj),
                                (self.norm_added_q, self.norm_added_k, None))
        return self.project(c, (self.add_k_proj, self.add_v_proj), (self.norm_added_k, None))

    def softmax_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, H, Lq, Dh) queries over (B, H, Lk, Dh) keys / values -> (B, Lq, H Dh), heads merged."""
        return attention(q, k, v, backend=self.attn_backend).transpose(1, 2).flatten(2)

    def attend(self, x: Tensor, context: Tensor | None = None, *, added: Tensor | None = None,
               rope: Rope | None = None) -> Tensor:
        """Self- or cross-attention before the output projection: (B, L, D) -> (B, L, H Dh)."""
        q, k, v = self.qkv(x, context)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = self.softmax_attention(q, k, v)
        if added is not None:  # Wan I2V: the same queries over the added (image) tokens, summed
            out = out + self.softmax_attention(q, *self.added_qkv(added))
        return out

    def forward(self, x: Tensor, context: Tensor | None = None, *, added: Tensor | None = None,
                rope: Rope | None = None) -> Tensor | tuple[Tensor, Tensor | None]:
        """x (B, N, D) -> (B, N, D); joint attention returns (x_out, added_out or None) for added (B, M, D)."""
        if self.joint:
            return self.joint_attention(x, added, rope)
        return self.to_out[1](self.to_out[0](self.attend(x, context, added=added, rope=rope)))

    def joint_attention(self, x: Tensor, c: Tensor, rope: Rope | None = None) -> tuple[Tensor, Tensor | None]:
        """MMDiT: both streams' tokens attend over [x, c] (SD3's order) in one softmax."""
        # Text queries are computed even where their outputs are dropped (SD3's last block has no to_add_out),
        # as diffusers does: attention backends (context-parallel ones included) always see one joint sequence,
        # and training sees the same (zero) gradients as diffusers' model.
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(self.qkv(x), self.added_qkv(c)))  # (B, H, N + M, Dh)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = self.softmax_attention(q, k, v)  # (B, N + M, H Dh)
        n = x.shape[1]
        x_out = self.to_out[1](self.to_out[0](out[:, :n]))
        return x_out, (self.to_add_out(out[:, n:]) if self.to_add_out is not None else None)


class NoAttentionProcessorsError(AttributeError):
    """diffusers' attention-processor API (`attn_processors`, `set_attn_processor`) on our models, which have none.

    An AttributeError, so `hasattr(model, "attn_processors")` is False (there are no processors to list or
    replace), and code that probes for processors before using them (IP-Adapter loaders, diffusers' modular
    components manager) takes the path for models without them; calling it is this error, never a silent no-op."""


ATTENTION_PROCESSOR_API = frozenset({"attn_processors", "set_attn_processor"})


class AttentionBackendMixin:
    """`set_attention_backend` / `reset_attention_backend` for models built from `Attention` modules.

    Listed before ModelMixin in a model's bases, so it replaces diffusers' processor-based version. There are no
    attention processors: every block calls the one `dit.attention.attention`, whose backend this sets, so
    diffusers' `attn_processors` / `set_attn_processor` raise NoAttentionProcessorsError saying so, and diffusers'
    xformers switch (`enable_xformers_memory_efficient_attention`) selects the 'xformers' backend.
    """

    attn_backend: Backend = None

    def __getattr__(self, name: str):
        if name in ATTENTION_PROCESSOR_API:
            raise NoAttentionProcessorsError(
                f"{type(self).__name__} has no attention processors, so no `{name}`: every attention layer calls "
                "the one function dit.attention.attention, by design. Choose its backend with "
                "model.set_attention_backend('sdpa' | 'auto' | 'flash' | ... | a callable attention(q, k, v, *, mask, "
                "scale)); a custom attention is such a callable (docs/diffusers.md)")
        return super().__getattr__(name)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Callable | None = None) -> None:
        """diffusers' xformers switch (`enable_xformers_memory_efficient_attention`, also called by a pipeline's):
        the 'xformers' backend, or back to 'sdpa'. xformers picks its own kernel: an `attention_op` is refused."""
        if attention_op is not None:
            raise ValueError("attention_op is not supported: xformers chooses its kernel here; pass a callable to "
                             "set_attention_backend to run a specific one")
        self.set_attention_backend("xformers" if valid else None)

    def set_use_npu_flash_attention(self, valid: bool) -> None:
        """diffusers' NPU flash-attention switch: there is no NPU backend here (turning it off is a no-op)."""
        if valid:
            raise ValueError("there is no NPU flash-attention backend here; plug one in as a callable with "
                             "set_attention_backend(fn), fn(q, k, v, *, mask, scale) -> out")

    def set_use_xla_flash_attention(self, use_xla_flash_attention: bool, partition_spec=None, **kwargs) -> None:
        """diffusers' XLA flash-attention switch: there is no XLA backend here (turning it off is a no-op)."""
        if use_xla_flash_attention:
            raise ValueError("there is no XLA flash-attention backend here; plug one in as a callable with "
                             "set_attention_backend(fn), fn(q, k, v, *, mask, scale) -> out")

    def set_attention_backend(self, backend: Backend) -> None:
        """A name of `dit.attention.BACKENDS` ('sdpa' default, 'auto', 'flash', 'flash3', 'sdpa_cudnn', 'sage',
        'xformers', 'math', ...; diffusers' names too) or a callable attention(q, k, v, *, mask, scale)."""
        backend = resolve_backend(backend)  # unknown or missing kernels fail here, not in the middle of a forward
        self.attn_backend = backend
        for module in self.modules():
            if isinstance(module, Attention):
                module.attn_backend = backend

    def reset_attention_backend(self) -> None:
        self.set_attention_backend(None)

    def fuse_qkv_projections(self) -> None:
        """No-op kept for diffusers scripts: q, k, v always run as one matmul here (see `fused_linear`)."""

    def unfuse_qkv_projections(self) -> None:
        """No-op kept for diffusers scripts: fusion never changes parameters or their names here."""
