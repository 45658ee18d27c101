"""Run a function on N gloo CPU processes (the tests' stand-in for torchrun)."""

from __future__ import annotations

import gc
import os
import socket
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N processes share 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # Free what fn left in reference cycles (a DDP model's reducer) while its process group still exists,
        # then leave together: a reducer torn down after destroy_process_group, or a rank that tears gloo down
        # while its peer still finishes, made the processes abort ("terminate called without an active
        # exception", seen twice in CI on the DDP gradient test).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args) -> None:
    """fn(rank, world, *args) on `world` processes; an exception (a failed assert) in any of them fails the test."""
    mp.spawn(_worker, args=(world, _free_port(), fn, args), nprocs=world, join=True)
