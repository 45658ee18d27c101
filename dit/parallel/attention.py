"""Context-parallel attention: Ulysses (all-to-all over heads), Ring (LSE merge), and USP (both on a 2-D mesh).

Each is a callable with the signature of `dit.attention.attention`'s backends, working on this rank's
sequence shard (B, H, L_r, D) and returning its shard of the output, so a model switches to it by setting
its attention backend; no model file changes. Shards may be uneven (sizes differ by one): full attention
without a mask does not depend on the order of the keys, so exactness needs no padding or masking.
Gradients are exact: the all-to-all and all-gather are autograd collectives, and the p2p ring has a hand-written
backward that sends the K/V gradients round the ring back to their owners.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F
from torch import Tensor

from dit.parallel.config import ContextParallelConfig, ParallelContext
from dit.parallel.sequence import gather, gather_sizes

# ----------------------------------------------------------------------------------------------------------------
# Block attention with log-sum-exp (the ring's unit of work)
# ----------------------------------------------------------------------------------------------------------------


def _block_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, H, Lq, D), lse (B, H, Lq) fp32) of softmax(q k^T scale) v over one K/V block."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse.float()
    logits = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    lse = torch.logsumexp(logits, dim=-1)
    return ((logits - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def _block_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one K/V block's share of the attention, given the *merged* output and lse.

    With the global out and lse, P = exp(q k^T scale - lse) is the block's slice of the global softmax, so the
    flash-attention backward of the block gives exactly its contribution (as in ring flash-attention).
    """
    if q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, 0.0, False, scale=scale
        )
        return dq.float(), dk.float(), dv.float()
    qf, kf, vf, do, of = q.float(), k.float(), v.float(), dout.float(), out.float()
    p = ((qf @ kf.transpose(-2, -1)) * scale - lse[..., None]).exp()  # (B, H, Lq, Lk)
    dv = p.transpose(-2, -1) @ do
    ds = p * (do @ vf.transpose(-2, -1) - (do * of).sum(-1, keepdim=True))
    return (ds @ kf) * scale, (ds.transpose(-2, -1) @ qf) * scale, dv


def _merge(out: Tensor | None, lse: Tensor | None, o: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial softmax-attention results by their log-sum-exp, in fp32."""
    o = o.float()
    if out is None:
        return o, l
    new = torch.logaddexp(lse, l)
    return out * (lse - new).exp()[..., None] + o * (l - new).exp()[..., None], new


# ----------------------------------------------------------------------------------------------------------------
# Ring attention
# ----------------------------------------------------------------------------------------------------------------


def _rotate(tensors: Tensor, recv_len: int, len_dim: int, group: dist.ProcessGroup) -> Tensor:
    """Send `tensors` to the next rank of the ring and receive the previous rank's (of length recv_len)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shape = list(tensors.shape)
    shape[len_dim] = recv_len
    buf = tensors.new_empty(shape)
    nxt = dist.get_global_rank(group, (rank + 1) % world)
    prv = dist.get_global_rank(group, (rank - 1) % world)
    ops = [dist.P2POp(dist.isend, tensors.contiguous(), nxt, group), dist.P2POp(dist.irecv, buf, prv, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return buf


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, sizes: list[int], group) -> Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        kv = torch.stack([k, v])  # (2, B, H, L_c, D): one message per step
        out = lse = None
        for step in range(world):
            o, l = _block_forward(q, kv[0], kv[1], scale)
            if step < world - 1:  # the next chunk is (rank - step - 1) mod P
                kv = _rotate(kv, sizes[(rank - step - 1) % world], 3, group)
            out, lse = _merge(out, lse, o, l)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.sizes, ctx.group = scale, sizes, group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, sizes = ctx.group, ctx.sizes
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v])
        dkv = torch.zeros_like(kv, dtype=torch.float32)  # gradient of the chunk held, travels with it
        for step in range(world):
            dq_j, dk_j, dv_j = _block_backward(dout, q, kv[0], kv[1], out, lse, ctx.scale)
            dq += dq_j
            dkv[0] += dk_j
            dkv[1] += dv_j
            recv_len = sizes[(rank - step - 1) % world]
            if step < world - 1:
                kv = _rotate(kv, recv_len, 3, group)
            dkv = _rotate(dkv, recv_len, 3, group)  # after P rotations the gradients are home
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, sizes: list[int], group: dist.ProcessGroup,
                   scale: float | None = None, impl: str = "p2p") -> Tensor:
    """Attention of local queries over the whole ring's keys/values; sizes = every rank's sequence length."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if len(sizes) == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if impl == "allgather":
        k_all, v_all = gather(k, 2, sizes, group), gather(v, 2, sizes, group)
        return F.scaled_dot_product_attention(q, k_all, v_all, scale=scale)
    return _RingAttention.apply(q, k, v, scale, list(sizes), group)


# ----------------------------------------------------------------------------------------------------------------
# Ulysses all-to-all
# ----------------------------------------------------------------------------------------------------------------


def _a2a(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    y = fc.all_to_all_single_autograd(x, out_splits, in_splits, group)
    return fc.wait_tensor(y) if hasattr(fc, "wait_tensor") else y


def seq_to_heads(x: Tensor, sizes: list[int], group: dist.ProcessGroup) -> Tensor:
    """(B, H, L_r, D) sequence shard -> (B, H / P, L, D) head shard of the full sequence."""
    world, rank = len(sizes), dist.get_rank(group)
    b, h, l_r, d = x.shape
    hp = h // world
    send = x.reshape(b, world, hp, l_r, d).transpose(0, 1).reshape(-1)  # (P * B * H/P * L_r * D,)
    recv = _a2a(send, [b * hp * n * d for n in sizes], [b * hp * l_r * d] * world, group)
    if b * hp == 1:  # the pieces arrive in sequence order already: no reordering copy (one head's full length)
        return recv.view(1, 1, sum(sizes), d)
    pieces = recv.split([b * hp * n * d for n in sizes])
    return torch.cat([p.view(b, hp, n, d) for p, n in zip(pieces, sizes)], dim=2)  # (B, H/P, L, D)


def heads_to_seq(x: Tensor, sizes: list[int], group: dist.ProcessGroup) -> Tensor:
    """(B, H / P, L, D) head shard -> (B, H, L_r, D) sequence shard: the inverse of seq_to_heads."""
    world, rank = len(sizes), dist.get_rank(group)
    b, hp, _, d = x.shape
    l_r = sizes[rank]
    if b * hp == 1:  # (1, 1, L, D): the sequence chunks are already rank by rank in memory
        send = x.reshape(-1)
    else:
        send = torch.cat([p.reshape(-1) for p in x.split(sizes, dim=2)])  # chunks of the sequence, rank by rank
    recv = _a2a(send, [b * hp * l_r * d] * world, [b * hp * n * d for n in sizes], group)
    return recv.view(world, b, hp, l_r, d).transpose(0, 1).reshape(b, world * hp, l_r, d)


# ----------------------------------------------------------------------------------------------------------------
# The backend a model plugs in
# ----------------------------------------------------------------------------------------------------------------


class ContextParallelAttention:
    """USP attention over a ParallelContext: Ulysses inside, ring across (either degree may be 1).

    Called as a `dit.attention` backend on this rank's shard. The shard sizes of the other ranks are taken from
    `sizes` (set by the model for its current sequence with `attn.set_sizes(sizes)`) or, when unset,
    gathered with a tiny collective.
    """

    def __init__(self, context: ParallelContext):
        self.context = context
        self._sizes: list[int] | None = None

    def set_sizes(self, sizes: list[int] | None) -> None:
        """Declare every rank's shard length until changed; it must outlive the forward pass, because gradient
        checkpointing runs the attention again during backward."""
        if sizes is not None and len(sizes) != self.context.world_size:
            raise ValueError(f"need {self.context.world_size} shard sizes, got {len(sizes)}")
        self._sizes = None if sizes is None else list(sizes)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None,
                 scale: float | None = None) -> Tensor:
        if mask is not None:
            raise ValueError("context-parallel attention does not take an attention mask (joint DiT attention has none)")
        ctx, cfg = self.context, self.context.config
        sizes = self._sizes or gather_sizes(q.shape[2], ctx.world_group)
        if not q.shape[2] == k.shape[2] == sizes[ctx.shard_index]:
            raise ValueError(f"queries ({q.shape[2]}) and keys ({k.shape[2]}) must both be this rank's shard "
                             f"of {sizes[ctx.shard_index]} tokens")
        u = cfg.ulysses_degree
        if q.shape[1] % u:
            raise ValueError(
                f"the head count {q.shape[1]} is not divisible by ulysses_degree {u}; "
                f"use a ulysses_degree that divides it (e.g. {max(d for d in range(1, u + 1) if q.shape[1] % d == 0)}) "
                "and put the rest in ring_degree"
            )
        per_rank = q.shape[1] // u
        chunks = cfg.head_chunks or (per_rank if u > 1 else 1)
        if per_rank % chunks:
            raise ValueError(f"head_chunks {chunks} must divide the {per_rank} heads per Ulysses rank "
                             f"({q.shape[1]} heads / ulysses_degree {u})")
        r0 = ctx.ring_rank * u
        u_sizes = sizes[r0: r0 + u]  # the shards of my Ulysses group
        ring_sizes = [sum(sizes[r * u:(r + 1) * u]) for r in range(cfg.ring_degree)]
        b, h, l_r, d = q.shape
        # Written chunk by chunk in (B, L_r, H, D) so that the caller's (B, L_r, H D) view of it needs no copy.
        out = q.new_empty(b, l_r, h, d)
        step = h // chunks
        # With one head per Ulysses rank per chunk, batch elements go one at a time too (e.g. CFG's two halves):
        # an all-to-all of one sequence for one head needs no reordering copy (seq_to_heads / heads_to_seq).
        b_step = 1 if u > 1 and step == u else b
        for start in range(0, h, step):  # heads are independent: a chunk's all-to-all buffers die before the next
            for b0 in range(0, b, b_step):
                qc, kc, vc = (t[b0:b0 + b_step, start:start + step] for t in (q, k, v))  # (b', H/chunks, L_r, D)
                if u > 1:
                    qc, kc, vc = (seq_to_heads(t, u_sizes, ctx.ulysses_group) for t in (qc, kc, vc))
                o = ring_attention(qc, kc, vc, sizes=ring_sizes, group=ctx.ring_group, scale=scale,
                                   impl=cfg.ring_impl)
                del qc, kc, vc
                if u > 1:
                    o = heads_to_seq(o, u_sizes, ctx.ulysses_group)  # (b', H/chunks, L_r, D)
                out[b0:b0 + b_step, :, start:start + step] = o.transpose(1, 2)
        return out.transpose(1, 2)  # (B, H, L_r, D)
