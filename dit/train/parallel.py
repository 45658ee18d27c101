"""Data-parallel x context-parallel layout of the ranks, and the integration point for a CP transformer.

Ranks are grouped into context-parallel (CP) groups of `ring_degree x ulysses_degree` consecutive ranks
(consecutive, so a group sits on one node's fast links). All ranks of a CP group are one data-parallel (DP)
replica: they take the same batch and draw the same timesteps and noise (everything random is seeded by the
DP rank, not the global rank), pass the full inputs to the transformer, and each computes the same full loss.

Gradient scaling: the CP transformer gathers its sequence shards with an autograd all-gather whose backward
is a reduce-scatter (dit.parallel.sequence.gather), so each rank's shard receives the sum over the group of
identical output gradients, i.e. cp x its share, and the parameter gradient on each rank is cp x its shard's
contribution. DDP (and FSDP) average over all dp x cp ranks: sum_dp sum_shards cp g / (dp cp) = mean over DP
replicas of the full gradient. So the loss is NOT rescaled; `tests/test_train_parallel.py` checks this rule on
gloo with a sharded toy model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dit.train.config import ParallelConfig


@dataclass(frozen=True)
class Layout:
    rank: int
    world: int
    cp: int

    def __post_init__(self) -> None:
        if self.world % self.cp:
            raise ValueError(f"parallel: ring_degree x ulysses_degree = {self.cp} must divide the number of "
                             f"processes {self.world}")

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def dp_size(self) -> int:
        return self.world // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    def cp_group_ranks(self) -> list[int]:
        start = self.dp_rank * self.cp
        return list(range(start, start + self.cp))


def enable_context_parallel(transformer: nn.Module, cfg: ParallelConfig, layout: Layout) -> None:
    """Switch the transformer to context parallelism (the integration point with dit.parallel).

    The transformer-level `enable_parallelism(ContextParallelConfig)` owns the sharding, on CP groups of
    consecutive ranks inside a dp x cp world.
    """
    if cfg.degree == 1:
        return
    from dit.parallel import ContextParallelConfig

    enable = getattr(transformer, "enable_parallelism", None)
    if enable is None:
        raise ValueError(f"parallel: {type(transformer).__name__} has no enable_parallelism yet, so "
                         f"ring_degree x ulysses_degree = {cfg.degree} cannot be used; accepted now: 1")
    # dit.parallel's mesh puts consecutive ranks in one CP group, as this layout does.
    enable(ContextParallelConfig(ring_degree=cfg.ring_degree, ulysses_degree=cfg.ulysses_degree))


def layout_for(cfg: ParallelConfig, rank: int, world: int) -> Layout:
    return Layout(rank=rank, world=world, cp=cfg.degree)
