"""Low-memory inference of expert-adaLN blocks over a joint [text, video] sequence (CogVideoX).

The same arithmetic as `CogVideoXBlock.forward`, the reference (`expert_modulate`, attention, `expert_gated_add`,
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

from dit.layers import GELU, FeedForward, Rope, needs_grad

CHUNK_BYTES = 16 << 20  # one chunk's (tokens, hidden) intermediate
CHUNK_ABOVE_BYTES = 256 << 20  # sequences whose whole intermediate is larger than this are chunked


def usable(block: nn.Module, *inputs: Tensor) -> bool:
    """True when autograd records nothing through the block, so its tensors may be overwritten in place."""
    return not needs_grad(*inputs, *block.parameters())


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
