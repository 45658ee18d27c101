"""Context-parallel training: ranks of a CP group share data and noise, and the gradient is scaled right under
DDP when every rank computes the full loss from gathered shards (dit/train/parallel.py)."""

from __future__ import annotations

import pytest
import torch

from dit.train.config import ParallelConfig
from dit.train.data import BatchStream
from dit.train.parallel import Layout, enable_context_parallel
from dit.train.trainer import step_generator


def test_cp_group_shares_batches_and_noise_dp_groups_do_not():
    layouts = [Layout(rank=r, world=8, cp=4) for r in range(8)]
    assert [lay.dp_rank for lay in layouts] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [lay.cp_rank for lay in layouts] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert layouts[5].cp_group_ranks() == [4, 5, 6, 7]
    buckets = tuple([0] * 32)
    streams = [BatchStream(buckets, 2, lay.dp_rank, lay.dp_size, seed=1) for lay in layouts]
    noise = [torch.randn(4, generator=step_generator(1, lay.dp_rank, 7, 0)) for lay in layouts]
    for r in range(8):
        same = [q for q in range(8) if layouts[q].dp_rank == layouts[r].dp_rank]
        for q in range(8):
            equal_batch = streams[q].batch(3) == streams[r].batch(3)
            equal_noise = torch.equal(noise[q], noise[r])
            assert equal_batch == equal_noise == (q in same)
    # and a new step draws new noise
    assert not torch.equal(noise[0], torch.randn(4, generator=step_generator(1, 0, 8, 0)))
    with pytest.raises(ValueError, match="ring_degree x ulysses_degree = 3 must divide the number of processes 8"):
        Layout(rank=0, world=8, cp=3)


def test_enable_context_parallel_passes_the_degrees_for_dp_times_cp():
    from dit.models.cogvideox import CogVideoXTransformer3DModel
    from dit.parallel import ContextParallelConfig

    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=8, text_embed_dim=8, num_layers=1, sample_width=4,
                                        sample_height=4, sample_frames=5, max_text_seq_length=4)
    enable_context_parallel(model, ParallelConfig(), Layout(0, 1, 1))  # degree 1: nothing to do
    assert not model.is_parallel
    seen = []

    class WithCP(torch.nn.Module):
        def enable_parallelism(self, config):
            seen.append(config)

    enable_context_parallel(WithCP(), ParallelConfig(ring_degree=2), Layout(0, 4, 2))  # dp 2 x cp 2
    assert seen == [ContextParallelConfig(ring_degree=2, ulysses_degree=1)]


class _ShardedToy(torch.nn.Module):
    """Per-token layers on this rank's sequence shard, a shared conditioning vector, gathered like a CP model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(6, 6)
        self.cond = torch.nn.Parameter(torch.randn(6))
        self.out = torch.nn.Linear(6, 6)  # after the gather: replicated computation

    def forward(self, x, group=None, index=0, parts=1):
        from dit.parallel.sequence import gather, shard, split_sizes

        h = torch.tanh(self.proj(shard(x, 1, index, parts)) + self.cond)  # (B, L_r, D)
        if parts > 1:
            h = gather(h, 1, split_sizes(x.shape[1], parts), group)  # (B, L, D)
        return self.out(h)


def _cp_ddp_worker(rank, world, expected):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_ShardedToy())
    g = torch.Generator().manual_seed(1)  # one CP group: same inputs on both ranks
    x, target = torch.randn(2, 7, 6, generator=g), torch.randn(2, 7, 6, generator=g)
    loss = (model(x, dist.group.WORLD, rank, world) - target).square().mean()  # the full loss, not rescaled
    loss.backward()
    for name, p in model.module.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parallel
def test_cp_gradients_under_ddp_equal_the_single_process_gradients():
    from distributed import run_distributed

    model = _ShardedToy()
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(2, 7, 6, generator=g), torch.randn(2, 7, 6, generator=g)
    (model(x) - target).square().mean().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    run_distributed(_cp_ddp_worker, 2, expected)
