"""`enable_parallelism` for our transformers: shard the token streams, run context-parallel attention, gather.

Every rank passes the full inputs and gets the full output. After the patch embedding each token stream
(CogVideoX: text, video; MMDiT: image, text) is split into this rank's shard, positional rotations are sliced
to match, the blocks run on the local shards with `ContextParallelAttention` as their attention backend (every
op but attention is token-local), and the output tokens are gathered back in order. Cross-attention to a stream
kept whole on every rank (Wan's text) uses `_cp_cross_attention()`, which needs no exchange. The head count need
not be divisible by ulysses_degree (uneven head shares; `ContextParallelConfig.head_plan`).

CFG parallel (cfg_degree 2): before the sequence split, each cfg group also keeps its contiguous half of the
batch (the pipelines concatenate [uncond; cond]), and the output is all-gathered along the batch after the
sequence gather. Every op of the model is per sample, so the halves are independent.

Gradients: each gather's backward is a reduce-scatter, so when all ranks compute the same loss the local
gradients are (cfg x P) times the true contribution of their batch half and sequence shard; averaging over all
ranks (what DDP's all-reduce does) gives exactly the single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from dit.attention import resolve_backend
from dit.parallel.attention import ContextParallelAttention
from dit.parallel.config import ContextParallelConfig, ParallelContext
from dit.parallel.sequence import gather, shard, split_sizes


@dataclass
class _CPState:
    context: ParallelContext
    attention: ContextParallelAttention  # over all streams jointly
    previous_backend: object
    streams: dict[int, ContextParallelAttention] = field(default_factory=dict)  # over one stream alone
    cross: ContextParallelAttention | None = None  # sharded queries over whole keys/values (text cross-attention)


class ContextParallelMixin:
    """Adds enable_parallelism / disable_parallelism and the shard/gather helpers a model's forward calls."""

    _cp: _CPState | None = None

    def enable_parallelism(self, config: ContextParallelConfig, *, device_type: str | None = None) -> None:
        """Run this model context-parallel over the initialised process group (cfg x ring x ulysses ranks per
        model call; a multiple of them is data parallel)."""
        if not isinstance(config, ContextParallelConfig):
            raise ValueError(f"enable_parallelism takes a ContextParallelConfig, got {type(config).__name__}")
        # Any head count works (uneven head shares over the Ulysses ranks); this refuses, before any process group
        # is made, a plan that would leave a rank or a head chunk without heads (ContextParallelConfig.head_plan).
        config.head_plan(self.config.num_attention_heads)
        device = next(self.parameters()).device
        if device_type is not None and device_type != device.type:
            raise ValueError(f"device_type {device_type!r} is not the model's device ({device}): move the model to "
                             "its rank's device first; the collectives run where its tensors are")
        context = ParallelContext(config, device=device)
        kernel = getattr(self, "attn_backend", None)
        kernel = kernel if not callable(kernel) else None  # a custom callable has no log-sum-exp for the ring
        attention = ContextParallelAttention(context, kernel=kernel)
        self._cp = _CPState(context, attention, getattr(self, "attn_backend", None))
        super().set_attention_backend(attention)

    def set_attention_backend(self, backend) -> None:
        """On a context-parallel model, a backend name chooses the kernel inside the context-parallel attention
        (every rank's local blocks, with the log-sum-exp the ring merges); a callable would replace the
        context-parallel attention itself, so it is refused until `disable_parallelism()`."""
        if self._cp is None:
            return super().set_attention_backend(backend)
        if callable(backend):
            raise ValueError("this model runs context-parallel: its attention is the ContextParallelAttention, which "
                             "a callable backend would replace; pass a backend name (the kernel inside it), or "
                             "disable_parallelism() first")
        kernel = resolve_backend(backend)
        self._cp.previous_backend = kernel
        for attention in (self._cp.attention, *self._cp.streams.values(), self._cp.cross):
            if attention is not None:
                attention.kernel = kernel

    def disable_parallelism(self) -> None:
        if self._cp is not None:
            previous, self._cp = self._cp.previous_backend, None
            self.set_attention_backend(previous)

    @property
    def is_parallel(self) -> bool:
        return self._cp is not None

    @property
    def cfg_degree(self) -> int:
        """How many CFG groups split each call's batch (1 when the model is not parallel or has no CFG parallel)."""
        return self._cp.context.config.cfg_degree if self._cp is not None else 1

    def _cp_stream_attention(self, stream: int) -> ContextParallelAttention:
        """An attention backend over stream `stream` alone (e.g. SD3.5's image-only second attention)."""
        if stream not in self._cp.streams:
            self._cp.streams[stream] = ContextParallelAttention(self._cp.context, kernel=self._cp.attention.kernel)
        return self._cp.streams[stream]

    def _cp_cross_attention(self) -> ContextParallelAttention:
        """An attention backend for cross-attention (Wan's text K/V): queries this rank's token shard, keys/values
        whole on every rank. The model keeps the text whole (no `_cp_shard`) but splits it with `_cfg_split` like
        the rest of the batch; nothing is exchanged, and the gradients follow the same averaging rule."""
        if self._cp.cross is None:
            self._cp.cross = ContextParallelAttention(self._cp.context, cross=True, kernel=self._cp.attention.kernel)
        return self._cp.cross

    def _cfg_split(self, x: Tensor) -> Tensor:
        """This cfg group's contiguous part of the batch of a (B, ...) tensor: (B / cfg_degree, ...)."""
        ctx = self._cp.context
        parts = ctx.config.cfg_degree
        if parts == 1:
            return x
        if x.shape[0] % parts:
            raise ValueError(f"CFG parallel splits the batch into cfg_degree {parts} halves [uncond; cond], but the "
                             f"batch is {x.shape[0]}; pass a guidance batch (guidance scale > 1) or use cfg_degree 1")
        return x.chunk(parts)[ctx.cfg_rank]

    def _cp_shard(self, *streams: Tensor) -> list[Tensor]:
        """This rank's shard of each (B, L_i, ...) token stream, (B / cfg, L_i_r, ...); declares the shard sizes
        to the attention backends (joint: every stream's shard on each rank; per stream: that stream's)."""
        ctx = self._cp.context
        world, index = ctx.world_size, ctx.shard_index
        per_stream = [split_sizes(s.shape[1], world) for s in streams]
        self._cp.attention.set_sizes([sum(sizes[r] for sizes in per_stream) for r in range(world)])
        for i, attention in self._cp.streams.items():
            attention.set_sizes(per_stream[i])
        return [shard(self._cfg_split(s), 1, index, world) for s in streams]

    def _cp_shard_rows(self, table: Tensor, dim: int = 0) -> Tensor:
        """This rank's rows of a per-token table (positions, rotations) of the full stream."""
        ctx = self._cp.context
        return shard(table, dim, ctx.shard_index, ctx.world_size)

    def _cp_gather(self, x: Tensor, full_length: int) -> Tensor:
        """The full (B, L, ...) stream from every rank's (B / cfg, L_r, ...) shard, in order."""
        ctx = self._cp.context
        x = gather(x, 1, split_sizes(full_length, ctx.world_size), ctx.world_group)  # (B / cfg, L, ...)
        return gather(x, 0, [x.shape[0]] * ctx.config.cfg_degree, ctx.cfg_group)  # (B, L, ...)
