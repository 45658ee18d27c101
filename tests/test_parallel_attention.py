"""Context-parallel attention (Ulysses, ring p2p / all-gather, USP) equals single-process attention:
outputs and q/k/v gradients within 1e-5, on uneven sequence lengths, over 2 and 4 gloo processes."""

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed

pytestmark = pytest.mark.parallel

B, H, D = 2, 4, 16


def _check_configs(rank, world, configs, length, batch=B):
    from dit.parallel import ContextParallelAttention, ContextParallelConfig, ParallelContext, shard, split_sizes

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, H, length, D, generator=g) for _ in range(3))
    dout = torch.randn(batch, H, length, D, generator=g)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr)
    ref.backward(dout)
    for ring, ulysses, impl, *chunks in configs:  # optional head_chunks (default: one head per Ulysses rank)
        ctx = ParallelContext(ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, ring_impl=impl,
                                                    head_chunks=chunks[0] if chunks else None))
        attn = ContextParallelAttention(ctx)
        idx = ctx.shard_index
        ql, kl, vl = (shard(t, 2, idx, world).clone().requires_grad_() for t in (q, k, v))
        attn.set_sizes(split_sizes(length, world))
        out = attn(ql, kl, vl)
        out.backward(shard(dout, 2, idx, world))
        name = f"ring={ring} ulysses={ulysses} {impl} chunks={chunks} rank {rank}"
        torch.testing.assert_close(out, shard(ref, 2, idx, world), rtol=0, atol=1e-5, msg=name)
        for local, full, what in ((ql, qr, "dq"), (kl, kr, "dk"), (vl, vr, "dv")):
            torch.testing.assert_close(local.grad, shard(full.grad, 2, idx, world), rtol=0, atol=1e-5,
                                       msg=f"{name} {what}")
        # without declared sizes, the shard lengths are gathered
        attn.set_sizes(None)
        torch.testing.assert_close(attn(ql, kl, vl), out, rtol=0, atol=1e-6)


def test_two_ranks_ulysses_ring_allgather():
    run_distributed(_check_configs, 2, [(1, 2, "p2p"), (1, 2, "p2p", 1), (2, 1, "p2p"), (2, 1, "p2p", 4),
                                        (2, 1, "allgather")], 37)


def test_four_ranks_all_meshes():
    run_distributed(_check_configs, 4, [(1, 4, "p2p"), (4, 1, "p2p"), (2, 2, "p2p"), (2, 2, "p2p", 1),
                                        (2, 2, "allgather")], 226 + 39)


def test_batch_one_with_one_head_per_rank_and_chunk():
    """Batch 1 and one head per Ulysses rank per chunk: the all-to-alls receive the sequence already in order and
    skip the reordering copies (dit.parallel.attention.seq_to_heads / heads_to_seq)."""
    run_distributed(_check_configs, 2, [(1, 2, "p2p"), (1, 2, "p2p", 1)], 37, 1)
    run_distributed(_check_configs, 4, [(1, 4, "p2p"), (2, 2, "p2p")], 226 + 39, 1)


def _head_error(rank, world):
    from dit.parallel import ContextParallelAttention, ContextParallelConfig, ParallelContext

    attn = ContextParallelAttention(ParallelContext(ContextParallelConfig(ulysses_degree=2)))
    q = torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match="head count 3 is not divisible by ulysses_degree 2"):
        attn(q, q, q)


def test_head_count_not_divisible_is_a_clear_error():
    run_distributed(_head_error, 2)


def _chunk_error(rank, world):
    from dit.parallel import ContextParallelAttention, ContextParallelConfig, ParallelContext

    attn = ContextParallelAttention(ParallelContext(ContextParallelConfig(ulysses_degree=2, head_chunks=3)))
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match=r"head_chunks 3 must divide the 2 heads per Ulysses rank"):
        attn(q, q, q)


def test_head_chunks_not_dividing_is_a_clear_error():
    run_distributed(_chunk_error, 2)


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
