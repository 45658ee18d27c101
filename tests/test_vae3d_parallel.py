"""vae3d time sharding (vae3d.parallel) on 2 and 4 gloo processes equals the single-process model.

"exact" statistics: encode (posterior mean) and decode equal the unsharded model on the whole clip in
one frame batch, and so do input and weight gradients (averaged over ranks, as DDP does); "parity"
statistics: decode and encode equal diffusers' AutoencoderKLCogVideoX (frame-batched). Frame counts
the world size does not divide: 17 frames = 5 latents ([3, 2] over 2 ranks, [2, 1, 1, 1] over 4, so
ranks with fewer frames than a convolution's halo), 33 frames = 9 latents, and an even latent count
(no image frame in the decoder). Also: 2 replicas x 2-way sharding on 4 processes, and the ValueErrors.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

TINY = dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
            temporal_compression_ratio=4)
WHOLE = 4096  # a frame batch larger than any clip here: the single-process reference in one batch


def _models():
    from diffusers import AutoencoderKLCogVideoX

    from vae3d import CausalVAE3D

    torch.manual_seed(0)
    ref = AutoencoderKLCogVideoX(**TINY).eval()
    ours = CausalVAE3D(**TINY).eval()
    ours.load_state_dict(ref.state_dict())  # the same parameter names as diffusers
    return ref, ours


def _video(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, 16, 16, generator=g) * 2 - 1


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    """max |a - b| / max(1, max |b|) <= 1e-5 (gradients reach ~40: fp32 sums in another order); returns it."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    assert err <= 1e-5, f"{what}: max abs diff {err:.3g} relative to max(1, max |reference|)"
    return err


def _whole(vae, on: bool) -> None:
    vae.num_sample_frames_batch_size = WHOLE if on else 8
    vae.num_latent_frames_batch_size = WHOLE if on else 2


def _mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _check_exact(vae, world: int, frames_list: tuple[int, ...]) -> float:
    from dit.parallel import ContextParallelConfig

    worst = 0.0
    for frames in frames_list:
        x = _video(frames)
        z = torch.randn(1, 4, 4, 2, 2, generator=torch.Generator().manual_seed(1))  # even: no image frame
        with torch.no_grad():
            _whole(vae, True)
            ref_mean = vae.encode(x).latent_dist.mean
            ref_video, ref_even = vae.decode(ref_mean).sample, vae.decode(z).sample
            _whole(vae, False)  # sharded: the batch sizes do not matter in exact mode
            vae.enable_parallelism(ContextParallelConfig(ring_degree=world))
            mean = vae.encode(x).latent_dist.mean
            worst = max(worst, _close(mean, ref_mean, f"encode {frames} frames"))
            worst = max(worst, _close(vae.decode(ref_mean).sample, ref_video, f"decode {frames} frames"))
            worst = max(worst, _close(vae.decode(z).sample, ref_even, "decode 4 latents"))
            vae.disable_parallelism()
    return worst


def _check_gradients(vae, world: int, frames: int) -> float:
    """Encode + decode with autograd: input and weight gradients, averaged over ranks, equal the unsharded ones."""
    from dit.parallel import ContextParallelConfig

    x = _video(frames)
    g = torch.Generator().manual_seed(2)
    out_grad = torch.randn(1, 3, frames, 16, 16, generator=g)

    def run():
        vae.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        out = vae.decode(vae.encode(leaf).latent_dist.mean).sample
        out.backward(out_grad)
        return out.detach(), leaf.grad, {n: p.grad.clone() for n, p in vae.named_parameters()}

    _whole(vae, True)
    ref = run()
    vae.enable_parallelism(ContextParallelConfig(ulysses_degree=world))
    _whole(vae, False)
    got = run()
    vae.disable_parallelism()
    _close(got[0], ref[0], "autograd output")
    worst = _close(_mean(got[1]), ref[1], "d input")
    for name, grad in got[2].items():
        worst = max(worst, _close(_mean(grad), ref[2][name], f"d {name}"))
    return worst


def _check_parity(ref, vae, world: int, frames_list: tuple[int, ...]) -> float:
    from dit.parallel import ContextParallelConfig

    vae.enable_parallelism(ContextParallelConfig(ring_degree=world), norm_stats="parity")
    worst = 0.0
    with torch.no_grad():
        for frames in frames_list:
            x = _video(frames, seed=3)
            theirs = ref.encode(x).latent_dist.mean
            worst = max(worst, _close(vae.encode(x).latent_dist.mean, theirs, f"parity encode {frames}"))
            worst = max(worst, _close(vae.decode(theirs).sample, ref.decode(theirs).sample, f"parity decode {frames}"))
    vae.disable_parallelism()
    return worst


def _check_all(rank: int, world: int, parity_frames: tuple[int, ...]) -> None:
    """Everything in one set of processes: starting them (torch and diffusers imports) is most of the time."""
    import vae3d.lowmem

    ref, vae = _models()
    exact = _check_exact(vae, world, (17, 33))
    if world == 2:  # every convolution with C' <= C on the large-frame path (time taps, halo fed into the sums)
        default, vae3d.lowmem.SLICE_BYTES = vae3d.lowmem.SLICE_BYTES, 1
        try:
            exact = max(exact, _check_exact(vae, world, (17,)))
        finally:
            vae3d.lowmem.SLICE_BYTES = default
    grads = _check_gradients(vae, world, 17)
    parity = _check_parity(ref, vae, world, parity_frames)
    if world == 4:
        _check_errors(vae, world)
        _check_data_parallel(vae, rank)
    if rank == 0:  # shown with -s
        print(f"\n{world} ranks: exact max|sharded - whole| {exact:.3g}; gradients max|sharded - whole| / "
              f"max(1, |whole|) {grads:.3g}; parity max|sharded - diffusers| {parity:.3g}")


def _check_errors(vae, world: int) -> None:
    from dit.parallel import ContextParallelConfig

    vae.enable_parallelism(ContextParallelConfig(ring_degree=world))
    with torch.no_grad():
        with pytest.raises(ValueError, match="5 frames \\(2 latent frames\\) cannot be time-sharded over 4 ranks"):
            vae.encode(_video(5))
        with pytest.raises(ValueError, match="3 latent frames cannot be time-sharded over 4 ranks"):
            vae.decode(torch.zeros(1, 4, 3, 2, 2))
        vae.enable_parallelism(ContextParallelConfig(ring_degree=world), norm_stats="parity")
        with pytest.raises(ValueError, match="5 latent frames make 2 frame batches.*at least 4"):
            vae.decode(torch.zeros(1, 4, 5, 2, 2))
        vae.enable_tiling(tile_sample_min_height=8, tile_sample_min_width=8)
        with pytest.raises(ValueError, match="tiling .* and time sharding together are not supported"):
            vae.decode(torch.zeros(1, 4, 9, 2, 2))
        vae.disable_tiling()
    with pytest.raises(ValueError, match="world size 3 .* must divide the world size 4"):
        vae.enable_parallelism(ContextParallelConfig(ring_degree=3))
    vae.disable_parallelism()


def _check_data_parallel(vae, rank: int) -> None:
    """4 processes = 2 replicas x 2-way time sharding (consecutive ranks): each replica encodes its own clip."""
    from dit.parallel import ContextParallelConfig

    x = _video(9, seed=10 + rank // 2)  # the replicas' clips differ
    with torch.no_grad():
        _whole(vae, True)
        ref = vae.encode(x).latent_dist.mean
        vae.enable_parallelism(ContextParallelConfig(ring_degree=2))
        assert dist.get_world_size(vae.time_parallel.group) == 2
        _close(vae.encode(x).latent_dist.mean, ref, f"dp x cp rank {rank}")
        vae.disable_parallelism()
        _whole(vae, False)


def test_two_ranks():
    run_distributed(_check_all, 2, (17, 33))


def test_four_ranks():  # 17 frames make only 2 of diffusers' frame batches: parity needs 4
    run_distributed(_check_all, 4, (33,))


def test_arguments_are_checked_before_any_process_group():
    from dit.parallel import ContextParallelConfig
    from vae3d import CausalVAE3D

    vae = CausalVAE3D(**TINY)
    with pytest.raises(ValueError, match="norm_stats 'batch'; choose one of"):
        vae.enable_parallelism(ContextParallelConfig(), norm_stats="batch")
    with pytest.raises(ValueError, match="takes a ContextParallelConfig"):
        vae.enable_parallelism(2)
    with pytest.raises(ValueError, match="torch.distributed initialised first"):
        vae.enable_parallelism(ContextParallelConfig())
