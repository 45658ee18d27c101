"""Time-sharded (context-parallel) encode/decode of the causal 3D VAE over a process group.

Every rank passes the whole clip and gets the whole result. The latent frames are split over the
ranks in order, rank 0 first (it holds the causal image frame); in pixel space a rank holds the
frames of its latents: rank 0 ``1 + r * (l_0 - 1)``, rank i ``r * l_i`` (r = 4, the time
compression). Each rank runs the encoder/decoder on its chunk, and

- every causal convolution gets the ``k_t - 1`` frames before the chunk (the *halo*: what the
  streaming cache carries from one frame batch to the next, here sent by the ranks before this one)
  through an autograd all-to-all, so their gradients go back to the rank that owns the frames
  (``ShardCache``, the ``ConvCache`` of a shard);
- the time down/upsamplers treat the first frame specially on rank 0 only, as the unsharded model
  does with the clip's first frame;
- GroupNorm statistics (``norm_stats``): "exact" (default) merges every rank's fp32 mean and
  variance, so the result equals the unsharded model on the whole clip in one batch; "parity"
  shards along the VAE's frame batches (diffusers' ``num_latent_frames_batch_size`` /
  ``num_sample_frames_batch_size``), whole batches per rank, with per-batch statistics, so the
  result equals the single-process frame-batched one, which is diffusers' ``decode``/``encode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from .blocks import group_var_mean, merge_var_mean
from .causal_conv import ConvCache, FrameTransform
from .lowmem import identity
from .streaming import frame_batches

if TYPE_CHECKING:
    from .autoencoder import CausalAutoencoder as CausalVAE3D  # either VAE
    from .causal_conv import CausalConv

NORM_STATS = ("exact", "parity")


class ParallelConfig(Protocol):
    """What the VAE needs of a ``dit.parallel.ContextParallelConfig``: how many ranks share a clip."""

    @property
    def world_size(self) -> int: ...


def split_sizes(length: int, parts: int) -> list[int]:
    """Chunk lengths differing by at most one, larger first: 5 over 4 -> [2, 1, 1, 1]."""
    base, extra = divmod(length, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _wait(y: torch.Tensor) -> torch.Tensor:
    return fc.wait_tensor(y) if hasattr(fc, "wait_tensor") else y


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x (N, ...) from every rank -> (P * N, ...), with autograd (backward: reduce-scatter)."""
    # all_gather_single_autograd is the newer name (torch 2.13 warns on the old one); same arguments.
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    return _wait(gather(x.contiguous(), 0, group))


def gather_time(y: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's (B, C, sizes[rank], H, W) chunk -> the whole (B, C, sum(sizes), H, W), with autograd."""
    if len(sizes) == 1:
        return y
    largest = max(sizes)
    y = y.movedim(2, 0)  # (T_r, B, C, H, W): the collective gathers along dim 0
    if y.shape[0] < largest:  # chunks must be equal for the collective; the padding is cut away below
        y = torch.cat([y, y.new_zeros(largest - y.shape[0], *y.shape[1:])])
    full = _all_gather(y, group)  # (P * T_max, B, C, H, W)
    return torch.cat([full[i * largest : i * largest + n] for i, n in enumerate(sizes)]).movedim(0, 2)


# -- layout -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeLayout:
    """Which latent frames each rank holds, and the norm-statistics segments inside them.

    ``segments[r]``: the lengths (in latent frames) of rank r's consecutive statistics segments;
    "exact" has one per rank, merged over all ranks, "parity" one per frame batch, each local.
    ``image_first``: the clip's first frame is an image frame (encoder: always; decoder: when the
    first frame batch has an odd latent count, diffusers' rule).
    """

    segments: list[list[int]]
    image_first: bool
    merged: bool

    @property
    def sizes(self) -> list[int]:
        return [sum(s) for s in self.segments]

    def latent_span(self, rank: int) -> tuple[int, int]:
        start = sum(self.sizes[:rank])
        return start, start + self.sizes[rank]


def plan(
    latent_frames: int, world: int, norm_stats: str, batches: list[int], image_first: bool, what: str
) -> TimeLayout:
    """The layout of ``latent_frames`` over ``world`` ranks; ``batches``: the frame-batch lengths (parity).

    ``what`` names the input in errors (e.g. "17 frames = 5 latent frames").
    """
    if norm_stats == "exact":
        if latent_frames < world:
            raise ValueError(
                f"{what} cannot be time-sharded over {world} ranks: every rank needs at least one latent "
                f"frame; use at least {world} latent frames or fewer ranks"
            )
        return TimeLayout([[n] for n in split_sizes(latent_frames, world)], image_first, merged=True)
    if len(batches) < world:
        raise ValueError(
            f"{what} make {len(batches)} frame batches; norm_stats='parity' puts whole frame batches on each "
            f"of the {world} ranks, so it needs at least {world}: use more frames, smaller batches or "
            f"norm_stats='exact'"
        )
    per_rank = list(accumulate(split_sizes(len(batches), world), initial=0))
    return TimeLayout([batches[a:b] for a, b in zip(per_rank, per_rank[1:])], image_first, merged=False)


# -- one rank's shard ---------------------------------------------------------------------------------


class TimeShard:
    """This rank's part of one encode/decode call: halo exchange and norm statistics (see ShardCache)."""

    def __init__(self, group: dist.ProcessGroup, layout: TimeLayout) -> None:
        self.group = group
        self.layout = layout
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        # Only rank 0 holds the clip's first frame (the time upsamplers read this).
        self.image_first = self.rank == 0 and layout.image_first
        self._counts: dict[tuple[int, int], list[int]] = {}

    def frame_counts(self, x: torch.Tensor, tag: str = "") -> list[int]:
        """Every rank's frame count at x's level: the ranks' chunks of one feature map (B, C, T_r, H, W).

        Time and space are resampled together, so (H, W) names the level; one tiny all-gather per level.
        ``tag`` names another time stream at the same level (Wan's time resamplers: frames before the
        time downsampling, the time upsampler's frames after the image frame).
        """
        key = (x.shape[3], x.shape[4], tag)
        if key not in self._counts:
            mine = torch.tensor([x.shape[2]], dtype=torch.int64, device=x.device)
            counts = [torch.zeros_like(mine) for _ in range(self.world)]
            dist.all_gather(counts, mine, group=self.group)
            self._counts[key] = [int(c) for c in counts]
        return self._counts[key]

    def halo(self, x: torch.Tensor, tf: FrameTransform, p: int, start: str = "replicate", tag: str = "") -> torch.Tensor:
        """The p transformed frames before this rank's chunk x (B, C, T_r, H, W): (B, C, p, H, W).

        In the clip's padded time axis (p start frames: copies of frame 0 or zeros, as ``start`` says;
        then the frames), rank j owns positions
        [p + s_j, p + s_j + T_j) and rank i needs [s_i, s_i + p); rank 0's own need is the copies. With
        fewer than p frames a rank's window reaches past its neighbour, so every rank sends each later
        rank the part of its own last p positions that the later rank needs, all in one all-to-all.
        Every rank's send and receive are in the autograd graph, even when empty: the collective's
        backward (sending the halo's gradient back to its owner) must run on all ranks or on none.
        """
        counts = self.frame_counts(x, tag)
        starts = [0, *accumulate(counts)]

        def owned(j: int) -> tuple[int, int]:  # what rank j sends: its last p positions (rank 0: copies too)
            hi = p + starts[j] + counts[j]
            return max(0 if j == 0 else p + starts[j], hi - p), hi

        def overlap(j: int, i: int) -> int:  # positions rank j sends rank i
            if i == 0:
                return 0
            lo, hi = owned(j)
            return max(0, min(hi, starts[i] + p) - max(lo, starts[i]))

        lo, _ = owned(self.rank)
        sizes_out = [overlap(self.rank, i) for i in range(self.world)]
        sizes_in = [overlap(j, self.rank) for j in range(self.world)]
        t = x.shape[2]
        first = lo - p - starts[self.rank]  # local frame of position lo (negative: a copy of frame 0)
        own = tf(x[:, :, max(first, 0) :], max(first, 0), t) if sum(sizes_out) else x[:, :, t:]  # (B, C, <= p, H, W)
        if first < 0:  # rank 0 with fewer than p frames: start frames fill the rest
            own = torch.cat([_start(x, tf, -first, start), own], dim=2)
        send = [own[:, :, max(lo, starts[i]) - lo :][:, :, :n] for i, n in enumerate(sizes_out)]
        buffer = torch.cat(send, dim=2).movedim(2, 0).contiguous()  # (sum sizes_out, B, C, H, W)
        got = _wait(fc.all_to_all_single_autograd(buffer, sizes_in, sizes_out, self.group))  # (p or 0, B, C, H, W)
        got = got.movedim(0, 2)  # (B, C, p or 0, H, W)
        if self.rank == 0:  # the causal padding: the start frames (after the empty receive)
            got = torch.cat([got, _start(x, tf, p, start)], dim=2)
        assert got.shape[2] == p, (got.shape, sizes_in)
        return got

    def _segment_frames(self, t: int) -> list[int]:
        """Frame counts of this rank's statistics segments at a level where it has t frames."""
        latents = self.layout.segments[self.rank]
        total = sum(latents)
        if self.image_first:  # frame 0 alone, then f frames per latent frame
            if total == 1:
                return [t]
            f = (t - 1) // (total - 1)
            frames = [1 + f * (latents[0] - 1)] + [f * n for n in latents[1:]]
        else:
            frames = [t // total * n for n in latents]
        assert sum(frames) == t, (frames, t, latents)
        return frames

    def norm_stats(self, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """GroupNorm (var, mean) of this rank's x (B, C, T_r, H, W): (B, G, 1) merged, or (B, G, T_r) per segment."""
        if not self.layout.merged:
            frames = self._segment_frames(x.shape[2])
            parts = [group_var_mean(s, groups) for s in x.split(frames, dim=2)]
            index = torch.tensor(frames, device=x.device)
            var = torch.stack([v for v, _ in parts], 2).repeat_interleave(index, dim=2)  # (B, G, T_r)
            mean = torch.stack([m for _, m in parts], 2).repeat_interleave(index, dim=2)
            return var, mean
        var, mean = group_var_mean(x, groups)  # (B, G)
        everyone = _all_gather(torch.stack([mean, var]), self.group).unflatten(0, (self.world, 2))  # (P, 2, B, G)
        # the ranks' counts are proportional to their frames
        w = torch.tensor(self.frame_counts(x), dtype=torch.float32, device=x.device)
        var, mean = merge_var_mean(everyone[:, 1], everyone[:, 0], w)
        return var[..., None], mean[..., None]  # (B, G, 1)


def _start(x: torch.Tensor, tf: FrameTransform, n: int, start: str) -> torch.Tensor:
    """n start frames before x (B, C, T, H, W), transformed: copies of its first frame, or zeros (any T)."""
    if start == "zeros":
        b, c, _, h, w = x.shape
        return x.new_zeros(b, c, n, h, w)
    return tf(x[:, :, :1], 0, 1).expand(-1, -1, n, -1, -1)


class ShardCache(ConvCache):
    """A time shard's ConvCache: the frames before its chunk are the halo from the ranks before it
    (rank 0: copies of its first frame), and nothing is carried on (a shard is one whole call)."""

    def __init__(self, shard: TimeShard) -> None:
        super().__init__()
        self.shard = shard
        self.at_start = shard.rank == 0

    def carried(self, conv: CausalConv, x: torch.Tensor, tf: FrameTransform | None = None) -> torch.Tensor:
        return self.shard.halo(x, tf or identity, conv.time_pad, conv.start, conv.halo_tag)

    def carry(self, conv: CausalConv, frames: torch.Tensor) -> None:
        pass


# -- the model's switch and the sharded calls -------------------------------------------------------------


@dataclass(frozen=True)
class TimeParallel:
    """What ``CausalVAE3D.enable_parallelism`` stores: the group that shares each clip, and the statistics mode."""

    group: dist.ProcessGroup
    norm_stats: str


def time_parallel(
    config: ParallelConfig, group: dist.ProcessGroup | None, norm_stats: str, device_type: str
) -> TimeParallel:
    """Validate the arguments of ``enable_parallelism`` and find the group (the whole CP group is one time axis)."""
    if norm_stats not in NORM_STATS:
        raise ValueError(f"norm_stats {norm_stats!r}; choose one of {NORM_STATS}")
    size = getattr(config, "world_size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(
            f"enable_parallelism takes a ContextParallelConfig (anything with an integer world_size >= 1), "
            f"got {config!r}"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("time sharding needs torch.distributed initialised first (torchrun / accelerate)")
    if group is None:
        world = dist.get_world_size()
        if world % size:
            raise ValueError(f"the config's world size {size} (ring x ulysses) must divide the world size {world}")
        if world == size:
            group = dist.group.WORLD
        else:  # data parallel x context parallel: consecutive ranks share a clip, as dit.parallel lays them out
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device_type, (world // size, size), mesh_dim_names=("dp", "cp"))
            group = mesh.get_group("cp")
    elif dist.get_world_size(group) != size:
        raise ValueError(f"the group has {dist.get_world_size(group)} ranks but the config's world size is {size}")
    return TimeParallel(group, norm_stats)


def _check_untiled(vae: CausalVAE3D, height: int, width: int, min_height: int, min_width: int) -> None:
    if vae.use_tiling and (width > min_width or height > min_height):
        raise ValueError(
            f"spatial tiling ({height} x {width} is above the tile size {min_height} x {min_width}) and time "
            f"sharding together are not supported; call disable_tiling() or disable_parallelism()"
        )


def encode(vae: CausalVAE3D, x: torch.Tensor) -> torch.Tensor:
    """x (B, C, 1 + r * k, H, W), whole on every rank -> moments (B, 2 * latent, 1 + k, h, w), whole on every rank."""
    if vae.use_slicing and x.shape[0] > 1:
        return torch.cat([encode(vae, xs) for xs in x.split(1)])
    tp: TimeParallel = vae.time_parallel
    _check_untiled(vae, x.shape[3], x.shape[4], vae.tile_sample_min_height, vae.tile_sample_min_width)
    r, frames = vae.temporal_compression, x.shape[2]
    latents = 1 + (frames - 1) // r

    def to_latent(pixel: int) -> int:  # batch boundaries after frame 0 fall on 1 + r * j (batch sizes are r * n)
        assert pixel == 0 or (pixel - 1) % r == 0, pixel
        return 0 if pixel == 0 else 1 + (pixel - 1) // r

    batches = [
        to_latent(sl.stop) - to_latent(sl.start)
        for sl in frame_batches(frames, vae.num_sample_frames_batch_size, vae.frame_batching)
    ]
    world = dist.get_world_size(tp.group)
    layout = plan(latents, world, tp.norm_stats, batches, True, f"{frames} frames ({latents} latent frames)")
    shard = TimeShard(tp.group, layout)
    s, e = layout.latent_span(shard.rank)
    chunk = x[:, :, to_pixel(s, r) : to_pixel(e, r)]  # rank 0: 1 + r(l_0 - 1) frames, others r * l_i
    h = vae.encoder(vae.to_encoder(chunk.contiguous()), ShardCache(shard))  # (B, 2 * latent, l_rank, h, w)
    if vae.quant_conv is not None:
        h = vae.quant_conv(h)
    return gather_time(h, layout.sizes, tp.group)


def to_pixel(latent: int, r: int) -> int:
    """First pixel frame of latent frame ``latent`` (frame 0 is the image frame, then r per latent)."""
    return 0 if latent == 0 else 1 + r * (latent - 1)


def decode(vae: CausalVAE3D, z: torch.Tensor) -> torch.Tensor:
    """z (B, latent, F, h, w), whole on every rank -> video (B, C, frames, H, W), whole on every rank."""
    if vae.use_slicing and z.shape[0] > 1:
        return torch.cat([decode(vae, zs) for zs in z.split(1)])
    tp: TimeParallel = vae.time_parallel
    _check_untiled(vae, z.shape[3], z.shape[4], vae.tile_latent_min_height, vae.tile_latent_min_width)
    latents = z.shape[2]
    world = dist.get_world_size(tp.group)
    if tp.norm_stats == "exact":  # one batch (CogVideoX: the image frame exists when the latent count is odd)
        batches = [latents]
    else:
        slices = frame_batches(latents, vae.num_latent_frames_batch_size, vae.frame_batching)
        batches = [sl.stop - sl.start for sl in slices]
    image_first = vae.first_frame_is_image(batches[0])
    layout = plan(latents, world, tp.norm_stats, batches, image_first, f"{latents} latent frames")
    shard = TimeShard(tp.group, layout)
    s, e = layout.latent_span(shard.rank)
    chunk = z[:, :, s:e].contiguous()
    if vae.post_quant_conv is not None:
        chunk = vae.post_quant_conv(chunk)
    y = vae.from_decoder(vae.decoder(chunk, ShardCache(shard)))  # (B, C, frames of this rank, H, W)
    r = vae.temporal_compression
    sizes = [r * n for n in layout.sizes]
    sizes[0] -= (r - 1) if image_first else 0  # the image frame decodes to one frame, not r
    return gather_time(y, sizes, tp.group)
