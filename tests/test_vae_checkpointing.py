"""Gradient checkpointing on the causal VAEs (diffusers' enable_gradient_checkpointing idiom): the same gradients
as without it and as diffusers', across frame batches whose conv caches a recomputation must see as the forward
saw them; fewer saved activations; the flags; inference untouched; refusals."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

import vae3d
from vae3d import parallel

# The tiny configurations of tests/test_vae3d.py and tests/test_vae3d_wan.py.
COGVIDEOX = dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                 temporal_compression_ratio=4)
STATS = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
WAN21 = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
             **STATS)
WAN22 = dict(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
             temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
             scale_factor_spatial=16, **STATS)
# name -> (diffusers' class, ours, config, clip (frames, height, width)). CogVideoX (4 frames per encoder call, set
# on both): 13 frames encode in three frame batches (5 + 4 + 4) to 4 latents, decoded in two (2 + 2); Wan: 9 frames
# in three (1 + 4 + 4), 3 latents one at a time. Every cache is carried from batch to batch.
MODELS = {
    "cogvideox": (AutoencoderKLCogVideoX, vae3d.CausalVAE3D, COGVIDEOX, (13, 16, 16)),
    "wan2.1": (AutoencoderKLWan, vae3d.WanVAE3D, WAN21, (9, 16, 24)),
    "wan2.2": (AutoencoderKLWan, vae3d.WanVAE3D, WAN22, (9, 32, 32)),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors are tiny: on the shared 2-core machine more threads only wait on each other (~30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(name: str):
    ref_cls, cls, config, _ = MODELS[name]
    torch.manual_seed(0)
    ref = ref_cls(**config)
    ours = cls(**config)
    ours.load_state_dict(ref.state_dict())
    if name == "cogvideox":
        ref.num_sample_frames_batch_size = ours.num_sample_frames_batch_size = 4  # diffusers' attribute (8)
    return ref, ours


def _clip(name: str) -> torch.Tensor:
    frames, h, w = MODELS[name][3]
    return torch.rand(1, 3, frames, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _loss(vae, x: torch.Tensor) -> torch.Tensor:
    """encode + decode (a posterior sample: the mean and the variance both get gradients), weighted fixedly."""
    z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(2))
    y = vae.decode(z).sample
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    return (y * w).sum()


def _gradients(vae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    vae.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    _loss(vae, x).backward()
    grads = {n: p.grad.clone() for n, p in vae.named_parameters()}
    grads["<input>"] = x.grad
    vae.zero_grad(set_to_none=True)
    return grads


def _err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest max |a - b| / max(1, max |b|) over the gradients (same names)."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() / max(1.0, b[k].abs().max().item()) for k in b)


class _Counting:
    """Counts diffusers' default gradient-checkpointing function's calls to torch.utils.checkpoint.checkpoint."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = torch.utils.checkpoint.checkpoint

        def checkpoint(*args, **kwargs):
            self.calls += 1
            assert kwargs.get("use_reentrant") is False
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)


@pytest.fixture(scope="module")
def runs():
    """name -> gradients of ours without and with checkpointing, and of diffusers' (checkpointed where it can)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            ref, ours = _pair(name)
            x = _clip(name)
            ours.train()
            off = _gradients(ours, x)
            ours.enable_gradient_checkpointing()  # diffusers' idiom
            ours.train()
            on = _gradients(ours, x)
            ours.disable_gradient_checkpointing()
            if ref._supports_gradient_checkpointing:
                ref.enable_gradient_checkpointing()
            ref.train()
            cache[name] = off, on, _gradients(ref, x), ref
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointed_gradients_equal_plain_ones(runs, name):
    """(a) Parameters and input, fp32, across several frame batches (caches carried) in encode and decode."""
    off, on, _, _ = runs(name)
    assert _err(on, off) <= 1e-6
    assert all(g.abs().max() > 0 for k, g in off.items() if k == "<input>" or "conv" in k)


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointed_gradients_equal_diffusers(runs, name):
    """(b) The same gradients as diffusers' class with the same weights, checkpointed as its users do it
    (`enable_gradient_checkpointing(); train()`). diffusers' AutoencoderKLWan refuses checkpointing (its
    `_supports_gradient_checkpointing` is False): there its plain gradients are the reference."""
    _, on, theirs, ref = runs(name)
    assert _err(on, theirs) <= 1e-4
    if not ref._supports_gradient_checkpointing:
        assert isinstance(ref, AutoencoderKLWan)
        with pytest.raises(ValueError, match="does not support gradient checkpointing"):
            ref.enable_gradient_checkpointing()


@pytest.mark.parametrize("name", ["cogvideox", "wan2.1"])
def test_tiled_and_sliced_gradients_equal_plain_ones(name):
    """Tiles (one cache per tile) and batch slicing under checkpointing: the plain gradients, and diffusers'."""
    ref, ours = _pair(name)
    if name == "cogvideox":
        tiles = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_overlap_factor_height=0.25,
                     tile_overlap_factor_width=0.25)
    else:
        tiles = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                     tile_sample_stride_width=24)
    x = torch.rand(2, 3, 9, 40, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1  # 2 x 2 tiles
    for m in (ref, ours):
        m.enable_tiling(**tiles)
        m.enable_slicing()
        m.train()
    off = _gradients(ours, x)
    ours.enable_gradient_checkpointing()
    assert _err(_gradients(ours, x), off) <= 1e-6
    assert _err(off, _gradients(ref, x)) <= 1e-4


def _saved_bytes(vae, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward during a forward with grad."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(vae, x.clone().requires_grad_(True))
    return sum(storages.values())


@pytest.mark.parametrize("name", ["cogvideox", "wan2.1"])
def test_checkpointing_saves_fewer_activations(name, monkeypatch):
    """(c) A property, not a timing: the tensors saved for backward shrink (the blocks keep only their inputs)."""
    _, ours = _pair(name)
    x = _clip(name)
    ours.train()
    off = _saved_bytes(ours, x)
    counting = _Counting(monkeypatch)
    ours.enable_gradient_checkpointing()
    on = _saved_bytes(ours, x)
    assert counting.calls > 0
    assert on < 0.5 * off, (on, off)  # measured: cogvideox 0.22, wan2.1 0.24 (wan2.2 0.24)


@pytest.mark.parametrize("name", ["cogvideox", "wan2.1", "wan2.2"])
def test_flags_are_diffusers(name):
    """(d) is_gradient_checkpointing and the modules that carry the flag (those of diffusers' class)."""
    ref, ours = _pair(name)
    assert ours._supports_gradient_checkpointing and not ours.is_gradient_checkpointing
    flagged = sorted(n for n, m in ours.named_modules() if hasattr(m, "gradient_checkpointing"))
    assert flagged == sorted(n for n, m in ref.named_modules() if hasattr(m, "gradient_checkpointing"))
    assert "encoder" in flagged and "decoder.mid_block" in flagged
    ours.enable_gradient_checkpointing()
    assert ours.is_gradient_checkpointing
    assert all(ours.get_submodule(n).gradient_checkpointing for n in flagged)
    assert all(callable(ours.get_submodule(n)._gradient_checkpointing_func) for n in flagged)
    ours.disable_gradient_checkpointing()
    assert not ours.is_gradient_checkpointing


@pytest.mark.parametrize("name", ["cogvideox", "wan2.1"])
def test_inference_is_unaffected(name, monkeypatch):
    """Without autograd the flag changes nothing: no checkpoint call, the low-memory path, the same output."""
    _, ours = _pair(name)
    ours.eval()
    x = _clip(name)
    with torch.no_grad():
        plain = ours(x).sample
    counting = _Counting(monkeypatch)
    ours.enable_gradient_checkpointing()
    with torch.no_grad():
        again = ours(x).sample
    assert counting.calls == 0 and torch.equal(again, plain)


def test_custom_function_is_used_and_a_reentrant_one_is_refused():
    """enable_gradient_checkpointing(func): func is what runs the blocks. A reentrant one would run them without
    autograd (our low-memory path) and give wrong gradients (diffusers' give wrong ones silently): refused."""
    _, ours = _pair("wan2.1")
    x = _clip("wan2.1")
    seen = []

    def func(module, *args):
        seen.append(module)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    ours.enable_gradient_checkpointing(func)
    ours.train()
    _loss(ours, x[:, :, :5]).backward()
    assert len(seen) > 0

    ours.enable_gradient_checkpointing(
        lambda module, *args: torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=True))
    with pytest.raises(ValueError, match="use_reentrant=False"):
        _loss(ours, x[:, :, :5])


def test_time_sharding_with_checkpointing_is_refused(monkeypatch):
    """A time shard's halo exchanges would be recomputed inside backward: refused before any compute, naming both."""
    _, ours = _pair("cogvideox")
    ours.enable_gradient_checkpointing()
    monkeypatch.setattr(ours, "time_parallel", parallel.TimeParallel(group=None, norm_stats="exact"))
    x = _clip("cogvideox")
    with pytest.raises(ValueError, match="disable_gradient_checkpointing.*disable_parallelism"):
        ours.encode(x)
    with pytest.raises(ValueError, match="disable_gradient_checkpointing.*disable_parallelism"):
        ours.decode(torch.zeros(1, 4, 2, 2, 3))
