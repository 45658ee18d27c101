"""Context-parallel configuration and the process groups it runs on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dit.parallel.sequence import split_sizes

RING_IMPLS = ("p2p", "allgather")


@dataclass(frozen=True)
class ContextParallelConfig:
    """How a batch and its sequence are split over ranks: cfg_degree x ring_degree x ulysses_degree processes.

    ulysses_degree: DeepSpeed-Ulysses (all-to-all from sequence shards to head shards). The head count need not be
    divisible by it: rank i of a Ulysses group gets split_sizes(heads, ulysses_degree)[i] whole heads (6 over 4:
    2, 2, 1, 1; `head_plan`), through exchanges with uneven splits; it must not exceed the head count.
    ring_degree: ring attention (K/V passed round the ring, partial results merged in fp32 by log-sum-exp).
    Both > 1 is USP (Fang & Zhao 2024) on a 2-D mesh, ulysses the inner (fast) dimension.
    ring_impl: "p2p", a true ring with send/recv (memory O(L / P) per rank), or "allgather", K/V gathered once
    (simpler, memory O(L) for K/V).
    cfg_degree: CFG parallelism (as in xDiT): 2 runs the [uncond; cond] halves of a classifier-free-guidance batch on
    two groups of ring x ulysses ranks and all-gathers the batch at the end, so guidance costs no extra time.
    head_chunks: attention runs over the heads in this many chunks, each through its own all-to-alls (and ring), so
    only one chunk's head-sharded q/k/v exist at a time; None: with Ulysses one head per rank per chunk (least
    memory), without it 1; 1: all heads at once (fewest collectives). Each rank's head share is split into this many
    parts (uneven where it does not divide), so at most the largest share's head count; exact.
    ring_message_bytes: the p2p ring streams K/V in messages of at most this many bytes (but at least one token of
    one head per piece), each used as it arrives and forwarded, and merges partial outputs in query blocks of half
    that size, so a rank's attention memory is its output shard plus about three messages; "auto": on the CPU
    1/64 of the largest shard's q (at least 64 KiB; per head chunk under USP), on other devices whole blocks
    (P - 1 messages); None: whole blocks. Exact either way.
    """

    ring_degree: int = 1
    ulysses_degree: int = 1
    ring_impl: str = "p2p"
    cfg_degree: int = 1
    head_chunks: int | None = None
    ring_message_bytes: int | None | str = "auto"

    def __post_init__(self) -> None:
        for name in ("ring_degree", "ulysses_degree", "cfg_degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.ring_impl not in RING_IMPLS:
            raise ValueError(f"unknown ring_impl {self.ring_impl!r}; accepted: {', '.join(RING_IMPLS)}")
        if self.head_chunks is not None and (isinstance(self.head_chunks, bool) or not isinstance(self.head_chunks, int)
                                             or self.head_chunks < 1):
            raise ValueError(f"head_chunks must be None or an integer >= 1, got {self.head_chunks!r}")
        m = self.ring_message_bytes
        if not (m is None or m == "auto" or (isinstance(m, int) and not isinstance(m, bool) and m >= 1)):
            raise ValueError(f"ring_message_bytes must be 'auto', None or an integer >= 1 (bytes), got {m!r}")
        if self.cfg_degree not in (1, 2):  # guidance batches have two halves; more groups would have nothing to do
            raise ValueError(f"cfg_degree must be 1 or 2, got {self.cfg_degree}")

    def head_plan(self, heads: int) -> list[list[int]]:
        """How attention goes through `heads` heads: plan[k][i] = the heads Ulysses rank i gets in chunk k.

        Rank i's share is split_sizes(heads, ulysses_degree)[i] (larger first; 6 over 4: 2, 2, 1, 1), cut into
        head_chunks parts by split_sizes again; chunk k takes consecutive heads, part k of each rank's share in rank
        order. Every head is in exactly one chunk on exactly one rank. Raises for a plan with an idle rank or chunk.
        """
        u = self.ulysses_degree
        if heads < u:
            # Ulysses gives each rank whole heads: splitting one head's softmax over ranks is the ring's job.
            fit = max(d for d in range(1, heads + 1) if u % d == 0)
            raise ValueError(
                f"ulysses_degree {u} is more than the {heads} attention heads: Ulysses gives each rank whole heads, so "
                f"{u - heads} rank(s) would hold none and sit idle in every attention while the others compute it; "
                f"use ulysses_degree <= {heads} and put the rest of the ranks in ring_degree (USP), e.g. "
                f"ulysses_degree {fit} x ring_degree {u // fit} for these {u} ranks"
            )
        shares = split_sizes(heads, u)
        chunks = self.head_chunks or (shares[0] if u > 1 else 1)
        if chunks > shares[0]:
            raise ValueError(f"head_chunks {chunks} is more than the {shares[0]} heads of the largest Ulysses rank "
                             f"share ({heads} heads over ulysses_degree {u}): a chunk would hold no head on any rank")
        parts = [split_sizes(n, chunks) for n in shares]
        return [[p[k] for p in parts] for k in range(chunks)]

    @property
    def world_size(self) -> int:
        """Ranks sharing one sequence (ring x ulysses): the context-parallel group."""
        return self.ring_degree * self.ulysses_degree

    @property
    def process_count(self) -> int:
        """Ranks running one model call: cfg x ring x ulysses."""
        return self.cfg_degree * self.world_size


class ParallelContext:
    """The (dp, cfg, ring, ulysses) DeviceMesh of a config, with this rank's coordinates and groups.

    The context-parallel group is ring x ulysses consecutive ranks (so it sits on one node's fast links); cfg_degree
    such groups run the halves of one guidance batch, and the world may hold several such replicas (data parallel,
    for training), each running its own inputs. `cp_group` spans one context-parallel group; `ring_group` and
    `ulysses_group` lie inside it; `cfg_group` joins the ranks of equal ring x ulysses position across the cfg groups.
    """

    def __init__(self, config: ContextParallelConfig, *, device_type: str = "cpu",
                 device: torch.device | str | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("context parallelism needs torch.distributed initialised first (torchrun / accelerate)")
        device = torch.device(device if device is not None else device_type)
        device_type = device.type
        check_process_group(device)
        world = dist.get_world_size()
        if world % config.process_count:
            raise ValueError(
                f"cfg_degree x ring_degree x ulysses_degree = {config.cfg_degree} x {config.ring_degree} x "
                f"{config.ulysses_degree} = {config.process_count} must divide the world size {world}"
            )
        self.config = config
        self.dp_size = world // config.process_count
        self.mesh: DeviceMesh = init_device_mesh(
            device_type, (self.dp_size, config.cfg_degree, config.ring_degree, config.ulysses_degree),
            mesh_dim_names=("dp", "cfg", "ring", "ulysses"),
        )
        self.ring_group = self.mesh.get_group("ring")
        self.ulysses_group = self.mesh.get_group("ulysses")
        self.cfg_group = self.mesh.get_group("cfg")
        if config.process_count == world and config.cfg_degree == 1:
            self.cp_group = dist.group.WORLD
        else:  # the ring x ulysses sub-mesh as one group
            self.cp_group = self.mesh["ring", "ulysses"]._flatten("cp").get_group("cp")
        self.rank = dist.get_rank(self.cp_group)
        self.ring_rank = dist.get_rank(self.ring_group)
        self.ulysses_rank = dist.get_rank(self.ulysses_group)
        self.cfg_rank = dist.get_rank(self.cfg_group)
        if _device_backends().get(device_type) == "nccl":
            self.connect(device)

    def connect(self, device: torch.device) -> None:
        """One tiny all-reduce on each group, on every rank, in the same order: NCCL makes a group's communicator
        on its first collective, and a batched p2p as that first collective needs every rank of the group in it
        (torch's batch_isend_irecv note), which the ring's steps do not promise. Groups made lazily by the mesh
        are thereby made here, together, not in the middle of a forward."""
        probe = torch.zeros(1, device=device)
        for group in (self.cp_group, self.ring_group, self.ulysses_group, self.cfg_group):
            dist.all_reduce(probe, group=group)

    @property
    def world_group(self) -> dist.ProcessGroup:
        """The group that shards one sequence (kept under this name for the gather callers)."""
        return self.cp_group

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def shard_index(self) -> int:
        """Which sequence chunk this rank holds: ring-major, ulysses-minor, so that a Ulysses group's chunks
        are contiguous and its all-to-all yields the ring chunk."""
        return self.ring_rank * self.config.ulysses_degree + self.ulysses_rank


def _device_backends() -> dict[str, str]:
    """Device type -> the backend of the default process group that runs its tensors ('nccl' for CUDA, ...)."""
    config = str(dist.get_backend_config())  # "cuda:nccl", "cpu:gloo,cuda:gloo", "cpu:gloo,cuda:nccl", ...
    if ":" not in config:  # a plain backend name (custom backends)
        return {device: config for device in ("cpu", "cuda")}
    return dict(item.split(":", 1) for item in config.split(","))


def check_process_group(device: torch.device) -> None:
    """ValueError unless the default process group runs collectives on `device`'s tensors with the backend made for
    them, and, on CUDA, on this process's current GPU: NCCL for CUDA tensors (gloo would stage them through the CPU,
    or fail on the all-to-all), gloo for CPU tensors; each process on the GPU of its local rank
    (torch.cuda.set_device(LOCAL_RANK) before init_process_group), so that nothing runs on another rank's GPU or
    falls back to the CPU."""
    backends = _device_backends()
    backend = backends.get(device.type)
    expected = dist.Backend.default_device_backend_map.get(device.type)
    if backend is None:
        raise ValueError(f"the model is on {device.type} but the process group has no backend for {device.type} "
                         f"tensors ({dist.get_backend_config()}); init_process_group({expected!r}) for a model on "
                         f"{device.type}, or move the model to the device the group serves")
    if device.type == "cuda" and backend != "nccl":
        raise ValueError(f"the model is on CUDA but the process group runs CUDA tensors on {backend!r}: context "
                         "parallelism on GPUs needs init_process_group('nccl') (one process per GPU, "
                         "torch.cuda.set_device(LOCAL_RANK) first)")
    if device.type == "cuda":
        current = torch.cuda.current_device()
        if device.index is not None and device.index != current:
            raise ValueError(f"the model is on cuda:{device.index} but this process's current CUDA device is "
                             f"cuda:{current}: NCCL runs on the current device, so call "
                             "torch.cuda.set_device(int(os.environ['LOCAL_RANK'])) before init_process_group and "
                             "keep each rank's model on that GPU")
