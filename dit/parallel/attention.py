"""Context-parallel attention: Ulysses (all-to-all over heads), Ring (LSE merge), and USP (both on a 2-D mesh).

Each is a callable with the signature of `dit.attention.attention`'s backends, working on this rank's
sequence shard (B, H, L_r, D) and returning its shard of the output, so a model switches to it by setting
its attention backend; no model file changes. Shards may be uneven (sizes differ by one): full attention
without a mask does not depend on the order of the keys, so exactness needs no padding or masking. Head shares may
be uneven too (a head count the Ulysses degree does not divide: 6 over 4 is 2, 2, 1, 1), through all-to-alls with
uneven split sizes. Cross-attention to keys/values whole on every rank needs no exchange (`cross=True`).
Gradients are exact: the all-to-all and all-gather are autograd collectives, and the p2p ring has a hand-written
backward that sends the K/V gradients round the ring back to their owners.
The ring's forward (training and inference) streams K/V round the ring in pieces within a message budget (by
default on the CPU), so a rank's attention memory is its output shard plus a few messages (`_ring_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor

from dit.attention import Backend, attention, attention_lse
from dit.parallel.config import ParallelContext
from dit.parallel.sequence import gather, gather_sizes, split_sizes

# ----------------------------------------------------------------------------------------------------------------
# Block attention with log-sum-exp (the ring's unit of work)
# ----------------------------------------------------------------------------------------------------------------


def _block_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, kernel: Backend = None) -> tuple[Tensor, Tensor]:
    """(out (B, H, Lq, D), lse (B, H, Lq) fp32) of softmax(q k^T scale) v over one K/V block, by the model's
    attention kernel (`dit.attention.attention_lse`: the CPU flash kernel, on CUDA flash_attn 2 / 3, torch's
    flash / cuDNN / efficient kernels, SageAttention, xformers, or the fp32 reference)."""
    return attention_lse(q, k, v, scale=scale, backend=kernel)


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


def _needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will record a call on these tensors (the ring's inference path is taken otherwise)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _merge_into(acc: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, q_tokens: int,
                kernel: Backend = None) -> None:
    """Add one K/V block's share to a partial attention result in place, at most q_tokens queries at a time.

    acc (B, H, L_q, D) and lse (B, H, L_q) hold the attention over the blocks so far and its log-sum-exp (zeros and
    -inf before the first block). With the block's (o, l), the merged result is acc * exp(lse - new) +
    o * exp(l - new) with new = logaddexp(lse, l); the two weights sum to one, so it is one lerp of acc towards o,
    in acc's dtype (fp32 or wider). The query blocks bound the block's partial output, the one temporary of the
    size of the queries.
    """
    if k.shape[2] == 0 or q.shape[2] == 0:
        return
    start = 0
    for n in split_sizes(q.shape[2], -(-q.shape[2] // q_tokens)):  # even blocks: no small ragged last one
        rows, start = slice(start, start + n), start + n
        o, l = _block_forward(q[:, :, rows], k, v, scale, kernel)  # (B, H, n, D), (B, H, n)
        acc_r, lse_r = acc[:, :, rows], lse[:, :, rows]
        new = torch.logaddexp(lse_r, l)
        acc_r.lerp_(o.to(acc.dtype), (l - new).exp_().unsqueeze(-1).to(acc.dtype))  # weight 1 on the first block
        lse_r.copy_(new)


# ----------------------------------------------------------------------------------------------------------------
# Ring attention
# ----------------------------------------------------------------------------------------------------------------


# "auto" message budget of the ring on the CPU: 1/64 of the (largest) output shard, so that the three messages in
# flight and a query block's partial output stay near 5% of it (bench.parallel --mode ring: 0.52-0.53x / 0.29x of the
# single-process attention memory at cp 2 / 4), but not below 64 KiB, where per-message costs would dominate.
# Smaller messages mean more steps: on this 2-core CPU each costs a wake-up, and attention took 4.2 / 6.2 s at
# cp 2 / 4 against 3.5 / 3.7 s with whole blocks (docs/ARCHITECTURE.md). On other devices "auto" is whole blocks
# (P - 1 messages): many small messages cost launch latency there (not measured: no GPU here).
RING_AUTO_SHARD_FRACTION = 64
RING_AUTO_MIN_BYTES = 64 << 10


def _message_budget(message_bytes: int | None | str, q: Tensor, sizes: list[int]) -> int | None:
    """The ring's message budget in bytes (None: whole blocks), with "auto" resolved for q's device and size.

    "auto" is sized from the largest shard, which every rank knows, not from this rank's own: shards differ by a
    token, and budgets that differ would give the ranks different plans (and mismatched messages).
    """
    if message_bytes != "auto":
        return message_bytes
    if q.device.type != "cpu":
        return None
    b, h, _, d = q.shape
    return max(RING_AUTO_MIN_BYTES, b * h * max(sizes) * d * q.element_size() // RING_AUTO_SHARD_FRACTION)


def _ring_plan(b: int, h: int, d: int, itemsize: int, acc_itemsize: int, sizes: list[int],
               message_bytes: int | None) -> tuple[int, int, int]:
    """(heads per group, pieces per block, queries per block) of the streamed ring within a message budget.

    A message carries up to P - 1 pieces of one head group's K and V; a query block's partial output (in the
    accumulator's dtype) is held to half the budget. None: all heads, whole blocks and all queries at once. A
    budget below one token of one head per piece still sends one token per piece (the smallest message).
    """
    world, largest = len(sizes), max(sizes)
    if message_bytes is None:
        return h, 1, max(1, sum(sizes))
    token = 2 * b * d * itemsize * max(1, world - 1)  # one token of one head, K and V, in each of P - 1 pieces
    tokens = max(1, message_bytes // token)
    if tokens >= largest:  # whole blocks fit: as many heads as the budget allows
        heads, pieces = max(1, min(h, message_bytes // (token * max(largest, 1)))), 1
    else:
        heads, pieces = 1, -(-largest // tokens)
    return heads, pieces, max(1, message_bytes // (2 * b * heads * d * acc_itemsize))


@dataclass(frozen=True)
class _RingSchedule:
    """This rank's tokens per step of the streamed ring: its own piece sent, the pieces it forwards, the pieces
    arriving; and where each own piece starts in its block."""

    steps: int
    offsets: list[int]
    own: list[int]
    ahead: list[int]
    arriving: list[int]

    @property
    def longest(self) -> int:
        return max([o + a for o, a in zip(self.own, self.ahead)] + self.arriving)


def _ring_schedule(sizes: list[int], rank: int, pieces: int) -> _RingSchedule:
    world = len(sizes)
    lens = [split_sizes(n, pieces) for n in sizes]  # lens[c][i]: tokens of piece i of rank c's block
    steps = pieces + world - 2  # the last piece leaves its owner at step pieces - 1, then makes P - 2 more hops

    def piece(c: int, i: int) -> int:
        return lens[c % world][i] if 0 <= i < pieces else 0

    return _RingSchedule(
        steps=steps, offsets=[sum(lens[rank][:i]) for i in range(pieces)],
        own=[piece(rank, t) for t in range(steps)],
        ahead=[sum(piece(rank - 1 - j, t - 1 - j) for j in range(world - 2)) for t in range(steps)],
        arriving=[sum(piece(rank - 1 - j, t - j) for j in range(world - 1)) for t in range(steps)],
    )


def _message(buffer: Tensor, like: Tensor, n: int) -> Tensor:
    """A message of n tokens for heads like `like` (B, g, L, D): (2, B, g, n, D), keys then values, contiguous."""
    b, g, _, d = like.shape
    return buffer[:2 * b * g * n * d].view(2, b, g, n, d)


def _ring_step(t: int, plan: _RingSchedule, kh: Tensor, vh: Tensor, prev: Tensor | None, send_buffer: Tensor,
               recv_buffer: Tensor, peers: tuple[int, int], group: dist.ProcessGroup) -> tuple[list, Tensor | None]:
    """Start step t: send the own piece t followed by the prefix of the previous message that still has hops to
    go, receive the next message; one batch, as NCCL needs both sides grouped. Returns (requests, receive)."""
    ops, recv = [], None
    if t < plan.steps:
        mine, n_send = plan.own[t], plan.own[t] + plan.ahead[t]
        if n_send:
            send = _message(send_buffer, kh, n_send)
            if mine:
                o = plan.offsets[t]
                send[0, :, :, :mine] = kh[:, :, o:o + mine]
                send[1, :, :, :mine] = vh[:, :, o:o + mine]
            if plan.ahead[t]:
                send[:, :, :, mine:] = prev[:, :, :, :plan.ahead[t]]
            ops.append(dist.P2POp(dist.isend, send, peers[0], group))
        if plan.arriving[t]:
            recv = _message(recv_buffer, kh, plan.arriving[t])
            ops.append(dist.P2POp(dist.irecv, recv, peers[1], group))
    return (dist.batch_isend_irecv(ops) if ops else []), recv


def _ring_heads(qh: Tensor, kh: Tensor, vh: Tensor, acc: Tensor, lse: Tensor, scale: float, q_tokens: int,
                plan: _RingSchedule, buffers: list[Tensor], peers: tuple[int, int], group: dist.ProcessGroup,
                kernel: Backend = None) -> None:
    """One head group once round the ring, merged into acc / lse: each received message is used while the next
    one travels. The three buffers rotate (send, receive, in use)."""
    prev = None  # the message received at the previous step, (2, B, g, n, D)
    for t in range(plan.steps + 1):  # step `steps` only uses the last message
        send_buffer, recv_buffer, prev_buffer = buffers
        reqs, recv = _ring_step(t, plan, kh, vh, prev, send_buffer, recv_buffer, peers, group)
        if t == 0:  # the own block while the first message travels
            _merge_into(acc, lse, qh, kh, vh, scale, q_tokens, kernel)
        elif prev is not None:
            _merge_into(acc, lse, qh, prev[0], prev[1], scale, q_tokens, kernel)
        for req in reqs:
            req.wait()
        prev = recv
        buffers = [send_buffer, prev_buffer, recv_buffer]  # the received message is the one in use next


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, sizes: list[int], group: dist.ProcessGroup,
                  message_bytes: int | None, out: Tensor | None = None,
                  keep_lse: bool = False, kernel: Backend = None) -> tuple[Tensor, Tensor | None]:
    """Ring attention forward, streamed: (out (B, H, L_q, D) in q's dtype, written into `out` when given; with
    keep_lse the lse (B, H, L_q) fp32, for the backward). Heads go in groups, each group once round the ring.

    Every rank's K/V block is cut into the same number of pieces. Piece i of rank c's block leaves c at step i, and
    each next rank forwards it one step after it arrives until all P - 1 other ranks have had it. So a rank's
    message at step t is its own piece t followed by the pieces it received at step t - 1 that still have hops to
    go: a prefix of that message, because pieces lie in it by hops travelled. Attention does not depend on the
    order of the keys, so each received message is used whole as one K/V block while the next one travels, and
    merged in place into a fp32 accumulator. Beyond its inputs and output a rank holds three messages (being sent,
    being received, in use), the lse and one query block's partial output: with a message budget, a few percent
    of its output shard, where passing whole blocks round and merging whole partial outputs costs several shards.
    """
    world, rank = len(sizes), dist.get_rank(group)
    peers = (dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world))
    b, h, l_q, d = q.shape
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    heads, pieces, q_tokens = _ring_plan(b, h, d, k.element_size(), acc_dtype.itemsize, sizes, message_bytes)
    plan = _ring_schedule(sizes, rank, pieces)
    # Three message buffers, reused round the steps (send, receive, in use): allocating each message afresh
    # fragments the heap when messages fall below the allocator's mmap threshold.
    buffers = [k.new_empty(2 * b * min(h, heads) * plan.longest * d) for _ in range(3)]
    out = q.new_empty(b, h, l_q, d) if out is None else out
    lse = torch.empty(b, h if keep_lse else min(h, heads), l_q, dtype=torch.float32, device=q.device)
    direct = out.dtype == acc_dtype  # accumulate in the output itself
    for h0 in range(0, h, heads):
        hs = slice(h0, h0 + heads)
        g = q[:, hs].shape[1]
        lse_h = (lse[:, hs] if keep_lse else lse[:, :g]).fill_(float("-inf"))
        acc = out[:, hs] if direct else torch.empty(b, g, l_q, d, dtype=acc_dtype, device=q.device)
        acc.zero_()
        _ring_heads(q[:, hs], k[:, hs], v[:, hs], acc, lse_h, scale, q_tokens, plan, list(buffers), peers, group,
                    kernel)
        if not direct:
            out[:, hs] = acc
    return out, lse if keep_lse else None


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
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, sizes: list[int], group,
                message_bytes: int | None, kernel: Backend) -> Tensor:
        out, lse = _ring_forward(q, k, v, scale, sizes, group, message_bytes, keep_lse=True, kernel=kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.sizes, ctx.group = scale, sizes, group
        return out

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
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, sizes: list[int], group: dist.ProcessGroup,
                   scale: float | None = None, impl: str = "p2p", message_bytes: int | None | str = "auto",
                   out: Tensor | None = None, kernel: Backend = None) -> Tensor:
    """Attention of local queries over the whole ring's keys/values; sizes = every rank's sequence length.

    message_bytes bounds the p2p ring's K/V messages, and so its memory (see `_ring_forward`): "auto" is 1/64 of
    the largest rank's q (at least 64 KiB) on the CPU and whole blocks elsewhere; None is whole blocks.
    `out` (B, H, L_q, D), for inference only, receives the result in place: the p2p ring then accumulates in it
    when it is fp32 or wider. `kernel`: the attention backend name (`dit.attention`) that computes each block
    with its log-sum-exp (None: 'sdpa').
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    message_bytes = _message_budget(message_bytes, q, sizes)
    needs_grad = _needs_grad(q, k, v)
    if out is not None and needs_grad:
        raise ValueError("ring_attention(out=...) is for inference: with gradients, use the returned tensor")
    if len(sizes) == 1:
        result = attention(q, k, v, scale=scale, backend=kernel)
    elif impl == "allgather":
        k_all, v_all = gather(k, 2, sizes, group), gather(v, 2, sizes, group)
        result = attention(q, k_all, v_all, scale=scale, backend=kernel)
    elif needs_grad:
        return _RingAttention.apply(q, k, v, scale, list(sizes), group, message_bytes, kernel)
    else:
        return _ring_forward(q, k, v, scale, list(sizes), group, message_bytes, out, kernel=kernel)[0]
    return result if out is None else out.copy_(result)


# ----------------------------------------------------------------------------------------------------------------
# Ulysses all-to-all
# ----------------------------------------------------------------------------------------------------------------


def _a2a(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    y = fc.all_to_all_single_autograd(x, out_splits, in_splits, group)
    return fc.wait_tensor(y) if hasattr(fc, "wait_tensor") else y


def seq_to_heads(x: Tensor, sizes: list[int], group: dist.ProcessGroup, heads: list[int] | None = None) -> Tensor:
    """(B, H, L_r, D) sequence shard -> (B, heads[rank], L, D): this rank's heads over the full sequence.

    heads: how many of x's H heads each rank gets, consecutive in rank order (default split_sizes(H, P): H / P each
    where P divides H; uneven shares and zero are fine). All ranks pass the same list. On the wire a rank's block
    for rank i is (heads[i], B, L_r, D), one copy of x; a received block from rank j is (heads[rank], B, L_j, D), so
    with B x heads[rank] = 1 the blocks arrive in sequence order and are used as received (no reordering copy).
    """
    world, rank = len(sizes), dist.get_rank(group)
    b, h, l_r, d = x.shape
    heads = split_sizes(h, world) if heads is None else list(heads)
    if len(heads) != world or sum(heads) != h:
        raise ValueError(f"heads {heads} must give each of the {world} ranks its share of the {h} heads")
    mine = heads[rank]
    send = x.transpose(0, 1).reshape(-1)  # (H, B, L_r, D): each destination's heads one block
    recv = _a2a(send, [mine * b * n * d for n in sizes], [n * b * l_r * d for n in heads], group)
    if b * mine == 1:  # one head of one sequence: the pieces are already in sequence order
        return recv.view(1, 1, sum(sizes), d)
    pieces = recv.split([mine * b * n * d for n in sizes])
    return torch.cat([p.view(mine, b, n, d).transpose(0, 1) for p, n in zip(pieces, sizes)], dim=2)  # (B, h_r, L, D)


def heads_to_seq(x: Tensor, sizes: list[int], group: dist.ProcessGroup, heads: list[int] | None = None) -> Tensor:
    """(B, heads[rank], L, D) head shard -> (B, sum(heads), L_r, D) sequence shard: the inverse of seq_to_heads.

    heads: every rank's head count, as given to seq_to_heads (default: every rank holds as many as this one). On the
    wire a rank's block for rank j is (L_j, B, heads[rank], D), one copy of x (none for one head of one sequence);
    with B = 1 and at most one head per rank the received blocks are already (H, L_r, D) and used as received.
    """
    world, rank = len(sizes), dist.get_rank(group)
    b, mine, _, d = x.shape
    heads = [mine] * world if heads is None else list(heads)
    if len(heads) != world or heads[rank] != mine:
        raise ValueError(f"heads {heads} must list the {world} ranks' head counts, this rank's being {mine}")
    l_r = sizes[rank]
    send = x.permute(2, 0, 1, 3).reshape(-1)  # (L, B, h_r, D): each destination's chunk of the sequence one block
    recv = _a2a(send, [l_r * b * n * d for n in heads], [n * b * mine * d for n in sizes], group)
    if b == 1 and max(heads) <= 1:  # one (L_r, D) block per head, in head order
        return recv.view(1, sum(heads), l_r, d)
    pieces = recv.split([l_r * b * n * d for n in heads])
    return torch.cat([p.view(l_r, b, n, d) for p, n in zip(pieces, heads)], dim=2).permute(1, 2, 0, 3)  # (B,H,L_r,D)


# ----------------------------------------------------------------------------------------------------------------
# The backend a model plugs in
# ----------------------------------------------------------------------------------------------------------------


class ContextParallelAttention:
    """USP attention over a ParallelContext: Ulysses inside, ring across (either degree may be 1).

    Called as a `dit.attention` backend on this rank's shard. The shard sizes of the other ranks are taken from
    `sizes` (set by the model for its current sequence with `attn.set_sizes(sizes)`) or, when unset,
    gathered with a tiny collective.

    Heads need not divide evenly over the Ulysses ranks: `ContextParallelConfig.head_plan` gives each rank its share
    (6 heads over 4 ranks: 2, 2, 1, 1) and cuts the shares into head chunks; each chunk is one all-to-all per q, k, v
    and one back for the output, with uneven split sizes. A rank with no head in a chunk still sends its sequence
    shard of the others' heads and receives its shard of their outputs.

    cross=True: cross-attention (e.g. Wan's text K/V), the queries this rank's sequence shard, the keys and values
    whole on every rank (this rank's batch: the model splits them like the queries under CFG parallel). Each query's
    attention over the whole K/V is complete on its rank, so nothing is exchanged (Ulysses would only move q to head
    shards and the output back, the ring has nothing to pass); gradients follow the rule of the joint streams: the
    K/V gradients are each rank's queries' share, times P through the output gather, so their mean over the ranks
    (DDP) is exact.
    """

    def __init__(self, context: ParallelContext, *, cross: bool = False, kernel: Backend = None):
        self.context = context
        self.cross = cross
        self.kernel = kernel  # the attention backend name that computes the local attention (None: 'sdpa')
        self._sizes: list[int] | None = None

    def set_sizes(self, sizes: list[int] | None) -> None:
        """Declare every rank's shard length until changed; it must outlive the forward pass, because gradient
        checkpointing runs the attention again during backward."""
        if sizes is not None and len(sizes) != self.context.world_size:
            raise ValueError(f"need {self.context.world_size} shard sizes, got {len(sizes)}")
        self._sizes = None if sizes is None else list(sizes)

    def _cross_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"cross-attention keys/values have batch {k.shape[0]}, the queries {q.shape[0]}: under "
                             "CFG parallel give the keys/values the cfg group's part of the batch too (_cfg_split)")
        if mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1:
            raise ValueError("context-parallel cross-attention takes a mask over the keys only (size 1 along the "
                             f"queries, e.g. (B, 1, 1, L_kv)), got {tuple(mask.shape)}: the queries are this rank's "
                             "shard, and a per-query mask would have to be sharded with them")
        return attention(q, k, v, mask=mask, scale=scale, backend=self.kernel)

    @torch.compiler.disable  # p2p and host-side plans: runs eagerly between a compiled block's graphs
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None,
                 scale: float | None = None) -> Tensor:
        if self.cross:
            return self._cross_attention(q, k, v, mask, scale)
        if mask is not None:
            raise ValueError("context-parallel attention does not take an attention mask (joint DiT attention has none)")
        ctx, cfg = self.context, self.context.config
        sizes = self._sizes or gather_sizes(q.shape[2], ctx.world_group, q.device)
        if not q.shape[2] == k.shape[2] == sizes[ctx.shard_index]:
            raise ValueError(f"queries ({q.shape[2]}) and keys ({k.shape[2]}) must both be this rank's shard "
                             f"of {sizes[ctx.shard_index]} tokens")
        u = cfg.ulysses_degree
        b, h, l_r, d = q.shape
        plan = cfg.head_plan(h)  # plan[chunk][i]: heads of Ulysses rank i in that chunk (consecutive, rank order)
        r0 = ctx.ring_rank * u
        u_sizes = sizes[r0: r0 + u]  # the shards of my Ulysses group
        ring_sizes = [sum(sizes[r * u:(r + 1) * u]) for r in range(cfg.ring_degree)]
        needs_grad = _needs_grad(q, k, v)
        ring = dict(sizes=ring_sizes, group=ctx.ring_group, scale=scale, impl=cfg.ring_impl,
                    message_bytes=cfg.ring_message_bytes, kernel=self.kernel)
        # Written chunk by chunk in (B, L_r, H, D) so that the caller's (B, L_r, H D) view of it needs no copy.
        out = q.new_empty(b, l_r, h, d)
        # With at most one head per Ulysses rank per chunk, batch elements go one at a time too (e.g. CFG's two
        # halves): an all-to-all of one sequence for one head needs no reordering copy (seq_to_heads / heads_to_seq).
        # The plan is the same on every rank, so all ranks make the same collectives.
        b_step = 1 if u > 1 and max(plan[0]) == 1 else b
        start = 0
        for heads in plan:  # heads are independent: a chunk's all-to-all buffers die before the next
            hs, start = slice(start, start + sum(heads)), start + sum(heads)
            mine = heads[ctx.ulysses_rank]
            for b0 in range(0, b, b_step):
                target = out[b0:b0 + b_step, :, hs].transpose(1, 2)  # (b', H_chunk, L_r, D)
                qc, kc, vc = (t[b0:b0 + b_step, hs] for t in (q, k, v))  # (b', H_chunk, L_r, D)
                if u == 1 and not needs_grad:  # the ring writes (and accumulates) straight into the output
                    ring_attention(qc, kc, vc, out=target, **ring)
                    continue
                if u > 1:
                    qc, kc, vc = (seq_to_heads(t, u_sizes, ctx.ulysses_group, heads) for t in (qc, kc, vc))
                if mine:
                    o = ring_attention(qc, kc, vc, **ring)  # (b', mine, L_ring, D); ring peers hold as many heads
                else:
                    # No head here in this chunk (uneven shares), and none on the ring peers (same Ulysses rank).
                    # The empty output still depends on q, k and v, so that the backward runs this rank's part of
                    # all three exchanges, in the same order as the ranks that computed attention.
                    o = qc + kc + vc  # (b', 0, L, D)
                del qc, kc, vc
                if u > 1:
                    o = heads_to_seq(o, u_sizes, ctx.ulysses_group, heads)  # (b', H_chunk, L_r, D)
                target.copy_(o)
        return out.transpose(1, 2)  # (B, H, L_r, D)
