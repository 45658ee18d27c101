"""Context-parallel attention (Ulysses, ring p2p / all-gather, USP) equals single-process attention:
outputs and q/k/v gradients within 1e-5, on uneven sequence lengths and head counts the Ulysses degree does not
divide, over 2 and 4 gloo processes; cross-attention with sharded queries and whole keys/values as well."""

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed

pytestmark = pytest.mark.parallel

B, H, D = 2, 4, 16


def _check_configs(rank, world, configs, length, batch=B, heads=H):
    from dit.parallel import ContextParallelAttention, ContextParallelConfig, ParallelContext, shard, split_sizes

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, D, generator=g) for _ in range(3))
    dout = torch.randn(batch, heads, length, D, generator=g)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr)
    ref.backward(dout)
    for ring, ulysses, impl, *extra in configs:  # optional head_chunks, ring_message_bytes
        options = dict(zip(("head_chunks", "ring_message_bytes"), extra))
        ctx = ParallelContext(ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, ring_impl=impl,
                                                    **options))
        attn = ContextParallelAttention(ctx)
        idx = ctx.shard_index
        ql, kl, vl = (shard(t, 2, idx, world).clone().requires_grad_() for t in (q, k, v))
        attn.set_sizes(split_sizes(length, world))
        out = attn(ql, kl, vl)
        out.backward(shard(dout, 2, idx, world))
        name = f"heads={heads} batch={batch} ring={ring} ulysses={ulysses} {impl} {options} rank {rank}"
        torch.testing.assert_close(out, shard(ref, 2, idx, world), rtol=0, atol=1e-5, msg=name)
        for local, full, what in ((ql, qr, "dq"), (kl, kr, "dk"), (vl, vr, "dv")):
            torch.testing.assert_close(local.grad, shard(full.grad, 2, idx, world), rtol=0, atol=1e-5,
                                       msg=f"{name} {what}")
        # without declared sizes, the shard lengths are gathered
        attn.set_sizes(None)
        torch.testing.assert_close(attn(ql, kl, vl), out, rtol=0, atol=1e-6)
        with torch.no_grad():  # inference takes its own path (the ring streams into the output)
            torch.testing.assert_close(attn(ql, kl, vl), out, rtol=0, atol=1e-6, msg=f"{name} no grad")


def test_two_ranks_ulysses_ring_allgather():
    run_distributed(_check_configs, 2, [(1, 2, "p2p"), (1, 2, "p2p", 1), (2, 1, "p2p"), (2, 1, "p2p", 4),
                                        (2, 1, "p2p", None, None), (2, 1, "p2p", None, 700),
                                        (2, 1, "allgather")], 37)


def test_four_ranks_all_meshes():
    run_distributed(_check_configs, 4, [(1, 4, "p2p"), (4, 1, "p2p"), (2, 2, "p2p"), (2, 2, "p2p", 1),
                                        (4, 1, "p2p", None, 1000), (2, 2, "p2p", None, 1000),
                                        (2, 2, "allgather")], 226 + 39)


def test_batch_one_with_one_head_per_rank_and_chunk():
    """Batch 1 and one head per Ulysses rank per chunk: the all-to-alls receive the sequence already in order and
    skip the reordering copies (dit.parallel.attention.seq_to_heads / heads_to_seq)."""
    run_distributed(_check_configs, 2, [(1, 2, "p2p"), (1, 2, "p2p", 1)], 37, 1)
    run_distributed(_check_configs, 4, [(1, 4, "p2p"), (2, 2, "p2p")], 226 + 39, 1)


def _check_cases(rank, world, cases):
    """Several (configs, length, batch, heads) cases in one set of processes."""
    for case in cases:
        _check_configs(rank, world, *case)


def test_uneven_heads_two_ranks():
    """3 heads over 2 Ulysses ranks: shares 2 and 1. By default one head per rank per chunk, so rank 1 has no head in
    the second chunk (it still sends its shard of rank 0's head and receives its output); head_chunks 1 is one
    exchange with 2- and 1-head splits. Batch 2 and batch 1 (the no-reordering-copy path)."""
    configs = [(1, 2, "p2p"), (1, 2, "p2p", 1)]
    run_distributed(_check_cases, 2, [(configs, 37, 2, 3), (configs, 37, 1, 3), ([(2, 1, "p2p", 2)], 37, 2, 3)])


def test_uneven_heads_four_ranks():
    """6 heads over 4 Ulysses ranks (2, 2, 1, 1); 30 heads over 4 (8, 8, 7, 7: CogVideoX's count), in 8 chunks, one
    and three (uneven: 3+3+2 and 3+2+2 heads per rank); USP 2 x 2 with 5 heads (3, 2), the p2p ring (whole blocks and
    streamed) and the all-gather ring; the ring alone with 5 heads in 3 uneven chunks."""
    run_distributed(_check_cases, 4, [
        ([(1, 4, "p2p"), (1, 4, "p2p", 1)], 226 + 39, 2, 6),
        ([(1, 4, "p2p"), (1, 4, "p2p", 1)], 226 + 39, 1, 6),
        ([(1, 4, "p2p"), (1, 4, "p2p", 1), (1, 4, "p2p", 3)], 45, 2, 30),
        ([(2, 2, "p2p"), (2, 2, "p2p", 1), (2, 2, "p2p", None, 1000), (2, 2, "allgather"), (4, 1, "p2p", 3)],
         226 + 39, 2, 5),
        ([(2, 2, "p2p"), (2, 2, "p2p", 2)], 226 + 39, 1, 5),
    ])


def test_head_plan():
    from dit.parallel import ContextParallelConfig

    assert ContextParallelConfig(ulysses_degree=4).head_plan(6) == [[1, 1, 1, 1], [1, 1, 0, 0]]  # shares 2, 2, 1, 1
    assert ContextParallelConfig(ulysses_degree=4, head_chunks=1).head_plan(30) == [[8, 8, 7, 7]]
    assert ContextParallelConfig(ulysses_degree=4, head_chunks=3).head_plan(30) == [[3, 3, 3, 3], [3, 3, 2, 2],
                                                                                    [2, 2, 2, 2]]
    assert ContextParallelConfig(ulysses_degree=4).head_plan(30) == [[1, 1, 1, 1]] * 7 + [[1, 1, 0, 0]]
    assert ContextParallelConfig(ulysses_degree=2).head_plan(8) == [[1, 1]] * 4  # even counts: as before
    assert ContextParallelConfig(ring_degree=2, head_chunks=2).head_plan(5) == [[3], [2]]
    assert ContextParallelConfig(ring_degree=2).head_plan(5) == [[5]]
    for ulysses, heads in ((4, 6), (8, 12), (3, 40), (6, 24), (4, 30), (8, 40), (5, 7)):  # every head, once
        for chunks in (None, 1, 2):
            plan = ContextParallelConfig(ulysses_degree=ulysses, head_chunks=chunks).head_plan(heads)
            assert sum(map(sum, plan)) == heads
            shares = [sum(p[i] for p in plan) for i in range(ulysses)]
            assert max(shares) - min(shares) <= 1, (ulysses, heads, chunks, plan)


def _head_error(rank, world):
    from dit.parallel import ContextParallelAttention, ContextParallelConfig, ParallelContext

    attn = ContextParallelAttention(ParallelContext(ContextParallelConfig(ulysses_degree=2)))
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match=r"ulysses_degree 2 is more than the 1 attention heads: Ulysses gives each "
                                         r"rank whole heads, so 1 rank\(s\) would hold none"):
        attn(q, q, q)


def test_more_ulysses_ranks_than_heads_is_a_clear_error():
    run_distributed(_head_error, 2)


def _chunk_error(rank, world):
    from dit.parallel import ContextParallelAttention, ContextParallelConfig, ParallelContext

    attn = ContextParallelAttention(ParallelContext(ContextParallelConfig(ulysses_degree=2, head_chunks=3)))
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match=r"head_chunks 3 is more than the 2 heads of the largest Ulysses rank share"):
        attn(q, q, q)


def test_head_chunks_beyond_the_share_is_a_clear_error():
    run_distributed(_chunk_error, 2)


def _check_cross(rank, world, meshes, length, kv_length, batch, heads):
    """Cross-attention: queries sharded, keys/values whole on every rank (with a key mask, as padded text has)."""
    import torch.distributed as dist

    from dit.parallel import ContextParallelAttention, ContextParallelConfig, ParallelContext, shard

    g = torch.Generator().manual_seed(4)
    q = torch.randn(batch, heads, length, D, generator=g)
    k, v = (torch.randn(batch, heads, kv_length, D, generator=g) for _ in range(2))
    dout = torch.randn(batch, heads, length, D, generator=g)
    mask = torch.ones(batch, 1, 1, kv_length, dtype=torch.bool)
    mask[0, ..., kv_length - 3:] = False  # the first sample's last text tokens are padding
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask)
    ref.backward(dout)
    for ring, ulysses in meshes:
        ctx = ParallelContext(ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
        attn = ContextParallelAttention(ctx, cross=True)
        idx, name = ctx.shard_index, f"cross ring={ring} ulysses={ulysses} heads={heads} rank {rank}"
        ql = shard(q, 2, idx, world).clone().requires_grad_()
        kl, vl = k.clone().requires_grad_(), v.clone().requires_grad_()
        out = attn(ql, kl, vl, mask=mask)
        out.backward(shard(dout, 2, idx, world))
        torch.testing.assert_close(out, shard(ref, 2, idx, world), rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(ql.grad, shard(qr.grad, 2, idx, world), rtol=0, atol=1e-5, msg=f"{name} dq")
        for local, full, what in ((kl, kr, "dk"), (vl, vr, "dv")):  # each rank has its queries' share
            total = local.grad.clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, full.grad, rtol=0, atol=1e-5, msg=f"{name} {what}")
        with torch.no_grad():
            torch.testing.assert_close(attn(ql, kl, vl, mask=mask), out, rtol=0, atol=1e-6, msg=f"{name} no grad")
            torch.testing.assert_close(attn(ql, kl, vl), shard(F.scaled_dot_product_attention(q, k, v), 2, idx, world),
                                       rtol=0, atol=1e-5, msg=f"{name} no mask")
        with pytest.raises(ValueError, match="cross-attention takes a mask over the keys only"):
            attn(ql, kl, vl, mask=torch.ones(batch, 1, ql.shape[2], kv_length, dtype=torch.bool))
        with pytest.raises(ValueError, match="cross-attention keys/values have batch 1, the queries 2"):
            attn(ql, kl[:1], vl[:1])


def test_cross_attention_sharded_queries_whole_keys():
    run_distributed(_check_cross, 2, [(1, 2), (2, 1)], 37, 11, 2, 3)
    run_distributed(_check_cross, 4, [(1, 4), (2, 2), (4, 1)], 45, 11, 2, 6)


def test_config_validation():
    from dit.parallel import ContextParallelConfig

    with pytest.raises(ValueError, match="ring_degree must be an integer >= 1, got 0"):
        ContextParallelConfig(ring_degree=0)
    with pytest.raises(ValueError, match="unknown ring_impl 'tree'"):
        ContextParallelConfig(ring_impl="tree")
    with pytest.raises(ValueError, match="head_chunks must be None or an integer >= 1, got 0"):
        ContextParallelConfig(head_chunks=0)
    with pytest.raises(ValueError, match="cfg_degree must be 1 or 2, got 4"):
        ContextParallelConfig(cfg_degree=4)
    with pytest.raises(ValueError, match="ring_message_bytes must be 'auto', None or an integer >= 1"):
        ContextParallelConfig(ring_message_bytes=0)


def test_ring_plan_fits_the_message_budget():
    from dit.parallel.attention import _ring_plan

    # bench.parallel's shape: 8 heads x 64, 16,380 tokens over 2 and 4 ranks, 256 KiB messages
    assert _ring_plan(1, 8, 64, 4, 4, [8190, 8190], 256 << 10) == (1, 16, 512)  # 512-token pieces: 256 KiB
    assert _ring_plan(1, 8, 64, 4, 4, [4095] * 4, 256 << 10) == (1, 25, 512)  # 3 pieces of <= 170 tokens
    assert _ring_plan(1, 8, 64, 4, 4, [100] * 2, 256 << 10) == (5, 1, 102)  # whole blocks of 5 heads fit
    assert _ring_plan(1, 8, 64, 4, 4, [4095] * 4, None) == (8, 1, 16380)  # the classic ring


def test_auto_message_budget():
    from dit.parallel.attention import _message_budget

    sizes = [8190, 8190]
    assert _message_budget("auto", torch.empty(1, 8, 8190, 64), sizes) == 8190 * 8 * 64 * 4 // 64  # 1/64 of q
    assert _message_budget("auto", torch.empty(1, 8, 100, 64), [100, 100]) == 64 << 10  # not below 64 KiB
    assert _message_budget("auto", torch.empty(1, 8, 8190, 64, device="meta"), sizes) is None  # whole blocks
    assert _message_budget(None, torch.empty(1), sizes) is None and _message_budget(1000, torch.empty(1), sizes) == 1000
    # uneven shards: both ranks must resolve the same budget and so the same plan (found in review: 8031 tokens
    # over 2 ranks gave 251- and 250-token pieces, 16 and 17 pieces, and mismatched messages)
    from dit.parallel.attention import _ring_plan

    sizes = [4016, 4015]
    plans = {_ring_plan(1, 8, 64, 4, 4, sizes, _message_budget("auto", torch.empty(1, 8, n, 64), sizes)) for n in sizes}
    assert len(plans) == 1, plans


def _streamed_ring(rank, world, length, budget, batch):
    """Inference through the streamed ring: exact, every message within the budget, and really streamed."""
    import torch.distributed as dist

    from dit.parallel import ContextParallelAttention, ContextParallelConfig, ParallelContext, shard, split_sizes

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, H, length, D, generator=g) for _ in range(3))
    attn = ContextParallelAttention(ParallelContext(ContextParallelConfig(ring_degree=world,
                                                                          ring_message_bytes=budget)))
    attn.set_sizes(split_sizes(length, world))
    ql, kl, vl = (shard(t, 2, rank, world) for t in (q, k, v))
    sent, batch_isend_irecv = [], dist.batch_isend_irecv

    def record(ops):
        sent.extend(op.tensor.nbytes for op in ops if op.op is dist.isend)
        return batch_isend_irecv(ops)

    dist.batch_isend_irecv = record
    try:
        with torch.no_grad():
            out = attn(ql, kl, vl)
            low = attn(*(t.bfloat16() for t in (ql, kl, vl)))  # accumulated in fp32, written in bf16
    finally:
        dist.batch_isend_irecv = batch_isend_irecv
    torch.testing.assert_close(out, shard(F.scaled_dot_product_attention(q, k, v), 2, rank, world), rtol=0, atol=1e-5)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), out, rtol=0, atol=2e-2)
    assert max(sent) <= budget, (max(sent), budget)
    if ql.shape[2]:  # a rank with tokens sends more than the P - 1 whole blocks of the classic ring
        assert len(sent) > 2 * (world - 1), len(sent)


def test_streamed_ring_is_exact_and_keeps_messages_within_the_budget():
    run_distributed(_streamed_ring, 2, 37, 700, 2)  # 2 x 16 x 4-byte tokens: 5 tokens of one head per message
    run_distributed(_streamed_ring, 4, 226 + 39, 2000, 1)  # uneven shards, three pieces per message
    run_distributed(_streamed_ring, 4, 3, 300, 1)  # [1, 1, 1, 0]: a rank with no tokens still forwards


def test_ring_out_argument_is_for_inference_only():
    from dit.parallel.attention import ring_attention

    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"ring_attention\(out=...\) is for inference"):
        ring_attention(q, q, q, sizes=[5], group=None, out=torch.empty(1, 2, 5, 8))
    out = torch.empty(1, 2, 5, 8)
    with torch.no_grad():
        assert ring_attention(q, q, q, sizes=[5], group=None, out=out) is out
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q).detach())
