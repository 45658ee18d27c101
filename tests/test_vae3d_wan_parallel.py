"""The Wan VAE (2.1 and 2.2) time-sharded (vae3d.parallel) on 2 and 4 gloo processes equals one process.

Encode (posterior mean) and decode equal the single-process model to 1e-5 in fp32; input and weight
gradients of encode + decode (averaged over ranks, as DDP does) equal it to 1e-10 in fp64 (exact up to
the summation order; fp32 gradients differ by ~1e-5 for that reason alone). Uneven splits: 9 frames = 3 latents
([2, 1] over 2 ranks), 17 frames = 5 latents ([3, 2]; [2, 1, 1, 1] over 4), 13 frames = 4 latents over 4
ranks (rank 0 holds only the image frame, so its share of the time upsampler's stream is empty). Wan has no
statistics over frames: only the causal convolutions' halos and the time downsampler's frame cross ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

STATS = dict(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
TINY = {
    "2.1": dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                **STATS),
    "2.2": dict(base_dim=4, decoder_base_dim=6, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                out_channels=12, scale_factor_spatial=16, **STATS),
}
SIZE = {"2.1": 16, "2.2": 32}  # 2 x 2 latents


def _model(version: str):
    from vae3d import WanVAE3D

    torch.manual_seed(0)
    return WanVAE3D(**TINY[version]).eval()


def _video(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> float:
    """max |a - b| / max(1, max |b|) <= tol; returns it."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    assert err <= tol, f"{what}: max abs diff {err:.3g} relative to max(1, max |reference|)"
    return err


def _mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _check_outputs(vae, world: int, size: int, frames_list: tuple[int, ...]) -> float:
    from dit.parallel import ContextParallelConfig

    worst = 0.0
    for frames in frames_list:
        x = _video(frames, size)
        with torch.no_grad():
            ref_mean = vae.encode(x).latent_dist.mean
            ref_video = vae.decode(ref_mean).sample
            vae.enable_parallelism(ContextParallelConfig(ring_degree=world))
            worst = max(worst, _close(vae.encode(x).latent_dist.mean, ref_mean, f"encode {frames} frames"))
            worst = max(worst, _close(vae.decode(ref_mean).sample, ref_video, f"decode {frames} frames"))
            vae.disable_parallelism()
    return worst


def _check_gradients(vae, world: int, size: int, frames: int) -> float:
    """Encode + decode with autograd in fp64: input and weight gradients, averaged over ranks, equal one process's."""
    from dit.parallel import ContextParallelConfig

    vae = vae.double()
    x = _video(frames, size, seed=1).double()
    out_grad = torch.randn(1, 3, frames, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run():
        vae.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        out = vae.decode(vae.encode(leaf).latent_dist.mean).sample
        out.backward(out_grad)
        return out.detach(), leaf.grad, {n: p.grad.clone() for n, p in vae.named_parameters()}

    ref = run()
    vae.enable_parallelism(ContextParallelConfig(ulysses_degree=world))
    got = run()
    vae.disable_parallelism()
    _close(got[0], ref[0], "autograd output", 1e-10)
    worst = _close(_mean(got[1]), ref[1], "d input", 1e-10)
    for name, grad in got[2].items():
        worst = max(worst, _close(_mean(grad), ref[2][name], f"d {name}", 1e-10))
    return worst


def _check_all(rank: int, world: int) -> None:
    """Everything in one set of processes: starting them (torch and diffusers imports) is most of the time."""
    import vae3d.lowmem

    frames = (9, 17) if world == 2 else (13, 17)
    report = []
    for version in ("2.1", "2.2"):
        vae, size = _model(version), SIZE[version]
        exact = _check_outputs(vae, world, size, frames)
        if version == "2.1":  # every convolution with C' <= C on the tap path: the halo fed into the sums
            default, vae3d.lowmem.SLICE_BYTES = vae3d.lowmem.SLICE_BYTES, 1
            try:
                exact = max(exact, _check_outputs(vae, world, size, (17,)))
            finally:
                vae3d.lowmem.SLICE_BYTES = default
        grads = _check_gradients(vae, world, size, 17)
        report.append(f"Wan {version}: max|sharded - one process| {exact:.3g}, gradients {grads:.3g}")
    if world == 4:
        _check_errors(_model("2.1"), world)
    if rank == 0:  # shown with -s
        print(f"\n{world} ranks: " + "; ".join(report))


def _check_errors(vae, world: int) -> None:
    from dit.parallel import ContextParallelConfig

    vae.enable_parallelism(ContextParallelConfig(ring_degree=world))
    with torch.no_grad():
        with pytest.raises(ValueError, match="9 frames \\(3 latent frames\\) cannot be time-sharded over 4 ranks"):
            vae.encode(_video(9, 16))
        with pytest.raises(ValueError, match="3 latent frames cannot be time-sharded over 4 ranks"):
            vae.decode(torch.zeros(1, 4, 3, 2, 2))
        vae.enable_tiling(tile_sample_min_height=8, tile_sample_min_width=8)
        with pytest.raises(ValueError, match="tiling .* and time sharding together are not supported"):
            vae.decode(torch.zeros(1, 4, 5, 2, 2))
    vae.disable_parallelism()


@pytest.mark.parallel
def test_two_ranks():
    run_distributed(_check_all, 2)


@pytest.mark.parallel
def test_four_ranks():
    run_distributed(_check_all, 4)
