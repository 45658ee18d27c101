"""Context parallelism (Ulysses, ring, USP) on torch.distributed, for the transformers and the VAE."""

from dit.parallel.attention import ContextParallelAttention, heads_to_seq, ring_attention, seq_to_heads
from dit.parallel.config import ContextParallelConfig, ParallelContext
from dit.parallel.model import ContextParallelMixin
from dit.parallel.sequence import gather, shard, split_sizes

__all__ = ["ContextParallelConfig", "ParallelContext", "ContextParallelAttention", "ContextParallelMixin", "ring_attention",
           "seq_to_heads", "heads_to_seq", "gather", "shard", "split_sizes"]
