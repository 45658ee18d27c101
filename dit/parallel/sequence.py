"""Splitting a sequence over ranks and gathering it back, exactly (uneven shards, no padding in the result)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor


def split_sizes(length: int, parts: int) -> list[int]:
    """Shard lengths differing by at most one, larger first: 226 over 4 -> [57, 57, 56, 56]."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(length, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def shard(x: Tensor, dim: int, index: int, parts: int) -> Tensor:
    """This rank's chunk of `x` along `dim` (every rank passes the full tensor)."""
    sizes = split_sizes(x.shape[dim], parts)
    start = sum(sizes[:index])
    return x.narrow(dim, start, sizes[index])


def gather(x: Tensor, dim: int, sizes: list[int], group: dist.ProcessGroup) -> Tensor:
    """All-gather uneven shards along `dim` into the full tensor on every rank, with autograd.

    Shards are padded to the largest for the collective and the padding is cut away again, so the result
    is exactly the concatenation; the backward pass is a reduce-scatter (gradient of the gather).
    """
    world = len(sizes)
    if world == 1:
        return x
    largest = max(sizes)
    x = x.movedim(dim, 0)  # (L_r, ...)
    if x.shape[0] < largest:
        x = torch.cat([x, x.new_zeros((largest - x.shape[0], *x.shape[1:]))])
    full = fc.all_gather_single_autograd(x.contiguous(), 0, group) if hasattr(fc, "all_gather_single_autograd") \
        else fc.all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=group)  # (P * L_max, ...)
    full = fc.wait_tensor(full) if hasattr(fc, "wait_tensor") else full
    pieces = [full[i * largest: i * largest + n] for i, n in enumerate(sizes)]
    return torch.cat(pieces).movedim(0, dim)


def gather_sizes(local: int, group: dist.ProcessGroup, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's local length (a tiny all-gather), for callers that do not know the global split; `device`:
    where the group's collectives run (the model's device: NCCL takes CUDA tensors only)."""
    t = torch.tensor([local], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [int(v) for v in out]
