"""Low-memory inference of the video blocks: CogVideoX's expert-adaLN block over a joint [text, video] sequence,
and Wan's adaLN block.

The same arithmetic as the blocks' `forward`, the reference (modulation, attention, gated residual adds,
feed-forward), for calls autograd does not record: the adaLN modulation and the residual gates work in place,
GELU works in place, and for long sequences the residual branches (attention's out-projection, the MLP) run over
token chunks, added into the residual stream chunk by chunk, so the (tokens, 4 D) MLP state never exists in full.
CogVideoX's chunks stay under glibc's 32 MiB mmap threshold: reused heap, whereas a larger CPU allocation is a
fresh mmap whose page faults cost several times the arithmetic done on it (Wan's fp32 MLP chunks are larger on
purpose, `_chunk_rows`). Where Wan's reference rounds after each fp32 step, one mixed-dtype op may compute the
same steps and round once: bf16 results then differ from the reference by at most one ulp.
Below CHUNK_ABOVE_BYTES fewer, larger ops win (each op is a thread barrier, costly on a shared CPU), so short
sequences are not chunked.

Chosen in one place (`usable`, at the top of the block's forward); the parity tests prove it equal to the
reference: every no-grad comparison with diffusers runs this path, the gradient tests run the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit.layers import (ADALN_ZERO, GELU, FeedForward, RMSNorm, Rope, fused_linear, hooked, layer_norm,
                        modulation_chunks, needs_grad)
from dit.rope import apply_rope_

CHUNK_BYTES = 16 << 20  # one chunk's (tokens, hidden) intermediate
CHUNK_ABOVE_BYTES = 256 << 20  # sequences whose whole intermediate is larger than this are chunked


def usable(block: nn.Module, *inputs: Tensor) -> bool:
    """True when autograd records nothing through the block, so its tensors may be overwritten in place; never
    under torch.compile, whose compiler plans the memory of the reference path itself (the token loops here would
    unroll into the graph)."""
    return not torch.compiler.is_compiling() and not needs_grad(*inputs, *block.parameters())


def expert_modulate_(h: Tensor, n_text: int, text: tuple[Tensor, Tensor], vision: tuple[Tensor, Tensor]) -> Tensor:
    """`expert_modulate` in place on h (B, T + N, D): no fresh (B, L, D) tensor (a page-faulting allocation)."""
    for rows, (shift, scale) in ((h[:, :n_text], text), (h[:, n_text:], vision)):  # views
        torch.addcmul(shift[:, None], rows, 1 + scale[:, None], out=rows)
    return h


def feed_forward_(ff: FeedForward, x: Tensor) -> Tensor:
    """`ff(x)` with the GELU in place: no second (tokens, hidden) buffer."""
    act = ff.net[0]
    if isinstance(act, GELU):
        h = torch.ops.aten.gelu_(act.proj(x), approximate=act.approximate)
    else:
        h = act(x)
    for layer in ff.net[1:]:
        h = layer(h)
    return h


def expert_gated_add_(x: Tensor, n_text: int, gates: tuple[Tensor, Tensor], fn: Callable[[Tensor], Tensor], y: Tensor,
                      hidden: int) -> Tensor:
    """`expert_gated_add(x, n_text, gates, fn(y))` added into x in place; fn acts per token with an intermediate
    of `hidden` channels, and runs over token chunks when the whole intermediate would be large."""
    b, length, _ = y.shape
    row_bytes = hidden * y.element_size()
    rows = length if b * length * row_bytes <= CHUNK_ABOVE_BYTES else max(16, CHUNK_BYTES // row_bytes)
    if rows >= length:
        y = fn(y)  # (B, L, D)
        x[:, :n_text].addcmul_(y[:, :n_text], gates[0][:, None])
        x[:, n_text:].addcmul_(y[:, n_text:], gates[1][:, None])
        return x
    for i in range(b):
        for start, stop, gate in ((0, n_text, gates[0][i]), (n_text, length, gates[1][i])):
            for j in range(start, stop, rows):
                k = min(j + rows, stop)
                x[i, j:k].addcmul_(fn(y[i, j:k]), gate)  # (rows, D)
    return x


def cogvideox_block(block: nn.Module, x: Tensor, temb: Tensor, n_text: int, rope: Rope | None) -> Tensor:
    """`CogVideoXBlock.forward(x, temb, n_text, rope)` in place on x (B, T + N, D), for calls autograd does not
    record (`usable`); `rope` is the block's RoPE hook."""
    m = block.norm1(temb)  # named chunks, each (B, D)
    h = expert_modulate_(block.norm1.norm(x), n_text, (m.enc_shift, m.enc_scale), (m.shift, m.scale))
    out = block.attn1.attend(h, rope=rope)  # (B, L, H Dh), before the output projection
    x = expert_gated_add_(x, n_text, (m.enc_gate, m.gate), block.attn1.to_out[0], out, x.shape[-1])
    m = block.norm2(temb)
    h = expert_modulate_(block.norm2.norm(x), n_text, (m.enc_shift, m.enc_scale), (m.shift, m.scale))
    return expert_gated_add_(x, n_text, (m.enc_gate, m.gate), lambda t: feed_forward_(block.ff, t), h,
                             block.ff.inner_dim)


# ------------------------------------------------------------------------------------------------------ Wan
# The reference rounds to the residual stream's dtype after each fp32 step (x.float() ... .type_as(x)). Here the
# fp32 arithmetic happens inside one op whose output is in x's dtype (a mixed-dtype LayerNorm, `out=` in x's
# dtype), and the elementwise passes with fp32 temporaries (q/k norms, RoPE, gated adds) run over token blocks of
# at most CHUNK_BYTES of them: reused heap rather than fresh tensors of the whole sequence, in few enough ops.

HALF = (torch.float16, torch.bfloat16)


def _chunk_rows(b: int, length: int, row_bytes: int) -> int:
    """Tokens per chunk of a residual branch whose intermediate takes row_bytes per token: all of them up to
    CHUNK_ABOVE_BYTES, else the fewest even chunks under that (under CHUNK_BYTES where it is the larger, as the
    tests set it). Larger than CogVideoX's CHUNK_BYTES chunks: Wan's MLP matmuls (fp32 above all) run markedly
    slower on a few hundred or a few thousand rows than on all of them, which costs more than the larger
    intermediate's page faults."""
    if b * length * row_bytes <= CHUNK_ABOVE_BYTES:
        return length
    chunks = -(-length * row_bytes // max(CHUNK_ABOVE_BYTES, CHUNK_BYTES))  # ceil
    return max(16, -(-length // chunks))


def _block_rows(row_bytes: int) -> int:
    """Tokens per block of an elementwise pass whose fp32 temporaries take row_bytes per token."""
    return max(16, CHUNK_BYTES // row_bytes)


def _rows(t: Tensor, i: int, j: int, k: int) -> Tensor:
    """Sample i's rows j:k of a per-token (B, N, D) modulation, or sample i's (B, D) one."""
    return t[i, j:k] if t.ndim == 3 else t[i]


def _fp32_affine(x: Tensor) -> bool:
    """F.layer_norm may take x with fp32 weight and bias: fp32 x, or bf16 / fp16 x on the CPU, whose kernel then
    computes in fp32 and rounds once to x's dtype (CUDA's kernel wants one dtype)."""
    return x.dtype == torch.float32 or (x.device.type == "cpu" and x.dtype in HALF)


def modulated_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """`modulate(layer_norm(x.float()), shift, scale).type_as(x)`; shift / scale (B, D) or per token (B, N, D).
    A per-sample modulation is an affine LayerNorm with weight 1 + scale and bias shift: one op."""
    if shift.ndim == 2 and _fp32_affine(x):
        outs = [F.layer_norm(x[i], x.shape[-1:], (1 + scale[i]).float(), shift[i].float(), eps)
                for i in range(x.shape[0])]
        return outs[0][None] if len(outs) == 1 else torch.stack(outs)
    h = layer_norm(x.float(), eps)  # (B, N, D) fp32, a fresh tensor
    if shift.ndim == 2:
        shift, scale = shift[:, None], scale[:, None]  # (B, 1, D)
    torch.addcmul(shift, h, 1 + scale, out=h)
    return h.type_as(x)


def _cross_attn_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """`norm(x.float()).type_as(x)` for the block's norm2: an fp32 LayerNorm (FP32LayerNorm) or Identity."""
    if isinstance(norm, nn.LayerNorm) and _fp32_affine(x):
        weight, bias = (None if p is None else p.float() for p in (norm.weight, norm.bias))
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
    return x if isinstance(norm, nn.Identity) else norm(x.float()).type_as(x)


def _unit_rms(norm: nn.Module, t: Tensor) -> tuple[Tensor, Tensor | None]:
    """`norm(t)` as (t normalised, the weight still to multiply it by, or None). For an `RMSNorm` whose weight is
    None or in t's dtype, F.rms_norm is its arithmetic up to the weight (fp32 statistics, rounded to t's dtype
    before a half weight multiplies) in fewer passes; other norms, and hooked ones, run whole."""
    weight = getattr(norm, "weight", None)
    if isinstance(norm, RMSNorm) and not hooked(norm) and (weight is None or weight.dtype == t.dtype):
        return F.rms_norm(t, t.shape[-1:], eps=norm.eps), weight
    return norm(t), None


def _heads(norm: nn.Module | None, t: Tensor, heads: int, rot: Tensor | None) -> Tensor:
    """`norm(t)` (B, N, H Dh) split into heads, contiguous (B, H, N, Dh), then rotated in place by rot (N, Dh/2)
    (None: no RoPE), as `Attention.project` and the RoPE hook do, over token blocks; the norm's weight multiplies
    as the heads are split (one pass)."""
    b, n, d = t.shape
    out = t.new_empty(b, heads, n, d // heads)
    step = n if norm is None and rot is None else _block_rows(b * d * 4)  # a plain copy has no temporaries
    for j in range(0, n, step):
        k = min(j + step, n)
        rows, weight = (t[:, j:k], None) if norm is None else _unit_rms(norm, t[:, j:k])  # (B, R, H Dh)
        rows, block = rows.unflatten(-1, (heads, -1)).transpose(1, 2), out[:, :, j:k]  # (B, H, R, Dh) each
        if weight is None:
            block.copy_(rows)
        else:
            torch.mul(rows, weight.view(heads, 1, -1), out=block)
        if rot is not None:
            apply_rope_(block, rot[j:k])
    return out


def _attend(attn: nn.Module, x: Tensor, rot: Tensor | None = None, context: Tensor | None = None,
            added: Tensor | None = None) -> Tensor:
    """`attn.attend(x, context, added=added, rope=rotate(rot))` for Wan's attention (q/k RMSNorm across all
    heads): (B, N, D) -> (B, N, H Dh). The norms, head split and RoPE of the video tokens run per token block."""
    linears = (attn.to_q,) if context is not None else (attn.to_q, attn.to_k, attn.to_v)
    projected = fused_linear(x, linears).chunk(len(linears), dim=-1)  # each (B, N, H Dh), views of one tensor
    del x  # the caller's last reference (a norm's output): freed now
    q, *kv = [_heads(norm, t, attn.heads, r) for norm, t, r in zip((attn.norm_q, attn.norm_k, None), projected,
                                                                    (rot, rot, None))]
    del projected  # freed before the attention
    if context is not None:
        kv = attn.project(context, (attn.to_k, attn.to_v), (attn.norm_k, None))
    out = attn.softmax_attention(q, *kv)
    if added is not None:  # I2V: the same queries over the image tokens, summed
        out = out + attn.softmax_attention(q, *attn.added_qkv(added))
    return out


def _fp32_gated_add_(x: Tensor, gate: Tensor, fn: Callable[[Tensor], Tensor], y: Tensor, hidden: int) -> Tensor:
    """x = (x.float() + gate * fn(y).float()).type_as(x) in place, over token chunks when fn's (tokens, hidden)
    intermediate would be large; gate (B, D) or per token (B, N, D), fp32."""
    b, length, _ = y.shape
    rows = _chunk_rows(b, length, hidden * y.element_size())
    step = length if x.dtype == gate.dtype else _block_rows(x.shape[-1] * 4)  # fp32 x: no temporary
    for i in range(b):
        for j in range(0, length, rows):
            k = min(j + rows, length)
            x_rows, out, gate_rows = x[i, j:k], fn(y[i, j:k]), _rows(gate, i, j, k)  # gate (D,) or (rows, D)
            for s in range(0, k - j, step):  # addcmul computes in fp32 (the gate's dtype), rounds once into x
                xs = x_rows[s: s + step]
                torch.addcmul(xs, out[s: s + step], gate_rows if gate.ndim == 2 else gate_rows[s: s + step], out=xs)
    return x


def wan_block(block: nn.Module, x: Tensor, text: Tensor, image: Tensor | None, modulation: Tensor,
              rotations: Tensor) -> Tensor:
    """`WanTransformerBlock.forward(x, text, image, modulation, rotations)` in place on x (B, N, D), for calls
    autograd does not record (`usable`); rotations (N, Dh/2) are the self-attention's RoPE."""
    m = modulation_chunks(block.scale_shift_table + modulation.float(), ADALN_ZERO)  # each (B, [N,] D), fp32
    out = _attend(block.attn1, modulated_norm(x, m.shift_msa, m.scale_msa, block.eps), rotations)  # (B, N, H Dh)
    x = _fp32_gated_add_(x, m.gate_msa, block.attn1.to_out[0], out, x.shape[-1])
    del out
    x += block.attn2.to_out[0](_attend(block.attn2, _cross_attn_norm(block.norm2, x), context=text, added=image))
    h = modulated_norm(x, m.shift_mlp, m.scale_mlp, block.eps)
    return _fp32_gated_add_(x, m.gate_mlp, lambda t: feed_forward_(block.ffn, t), h, block.ffn.inner_dim)
