"""Low-memory inference of the video blocks: CogVideoX's expert-adaLN block over a joint [text, video] sequence,
and Wan's adaLN block.

The same arithmetic as the blocks' `forward`, the reference (modulation, attention, gated residual adds,
feed-forward), for calls autograd does not record: the adaLN modulation and the residual gates work in place,
GELU works in place, and for long sequences the residual branches (attention's out-projection, the MLP) run over
token chunks, added into the residual stream chunk by chunk, so the (tokens, 4 D) MLP state never exists in full.
Chunks stay under glibc's 32 MiB mmap threshold: reused heap, whereas a larger CPU allocation is a fresh mmap
whose page faults cost several times the arithmetic done on it. Below CHUNK_ABOVE_BYTES fewer, larger ops win
(each op is a thread barrier, costly on a shared CPU), so short sequences are not chunked.

Chosen in one place (`usable`, at the top of the block's forward); the parity tests prove it equal to the
reference: every no-grad comparison with diffusers runs this path, the gradient tests run the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dit.layers import ADALN_ZERO, GELU, FeedForward, Rope, layer_norm, modulation_chunks, needs_grad

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


def _rows(t: Tensor, i: int, j: int, k: int) -> Tensor:
    """Sample i's rows j:k of a per-token (B, N, D) modulation, or sample i's (B, D) one."""
    return t[i, j:k] if t.ndim == 3 else t[i]


def _modulated_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """`modulate(layer_norm(x.float()), shift, scale).type_as(x)` with the modulation in place on the fresh norm
    output; shift / scale (B, D) or per token (B, N, D), fp32."""
    h = layer_norm(x.float(), eps)  # (B, N, D) fp32, a fresh tensor
    if shift.ndim == 2:
        shift, scale = shift[:, None], scale[:, None]  # (B, 1, D)
    torch.addcmul(shift, h, 1 + scale, out=h)
    return h.type_as(x)


def _fp32_gated_add_(x: Tensor, gate: Tensor, fn: Callable[[Tensor], Tensor], y: Tensor, hidden: int) -> Tensor:
    """x = (x.float() + gate * fn(y).float()).type_as(x) in place, over token chunks when fn's (tokens, hidden)
    intermediate would be large; gate (B, D) or per token (B, N, D), fp32."""
    b, length, _ = y.shape
    row_bytes = hidden * y.element_size()
    rows = length if b * length * row_bytes <= CHUNK_ABOVE_BYTES else max(16, CHUNK_BYTES // row_bytes)
    for i in range(b):
        for j in range(0, length, rows):
            k = min(j + rows, length)
            out = fn(y[i, j:k]).float()  # (rows, D)
            if x.dtype == torch.float32:
                x[i, j:k].addcmul_(out, _rows(gate, i, j, k))
            else:
                x[i, j:k] = torch.addcmul(x[i, j:k].float(), out, _rows(gate, i, j, k))
    return x


def wan_block(block: nn.Module, x: Tensor, text: Tensor, image: Tensor | None, modulation: Tensor,
              rope: Rope) -> Tensor:
    """`WanTransformerBlock.forward(x, text, image, modulation, rotations)` in place on x (B, N, D), for calls
    autograd does not record (`usable`); `rope` is the self-attention's RoPE hook."""
    m = modulation_chunks(block.scale_shift_table + modulation.float(), ADALN_ZERO)  # each (B, [N,] D), fp32
    h = _modulated_norm(x, m.shift_msa, m.scale_msa, block.eps)
    out = block.attn1.attend(h, rope=rope)  # (B, N, H Dh), before the output projection
    del h
    x = _fp32_gated_add_(x, m.gate_msa, block.attn1.to_out[0], out, x.shape[-1])
    del out
    x += block.attn2(block.norm2(x.float()).type_as(x), text, added=image)
    h = _modulated_norm(x, m.shift_mlp, m.scale_mlp, block.eps)
    return _fp32_gated_add_(x, m.gate_mlp, lambda t: feed_forward_(block.ffn, t), h, block.ffn.inner_dim)
