"""vae3d's Wan VAE (2.1 and 2.2): parity with diffusers' AutoencoderKLWan, causality, streaming (frame batches,
depth-first pieces, tap sums) equal to the whole-clip autograd path, validation, tiling, slicing, dtypes, loading."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLWan

import vae3d
import vae3d.lowmem
from vae3d.causal_conv import ConvCache, FlatCausalConv3d

STATS = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
TINY21 = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
              **STATS)
# Wan 2.2: residual levels (AvgDown3D / DupUp3D shortcuts), 2 x 2 patches, its own decoder width.
TINY22 = dict(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
              temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
              out_channels=12, scale_factor_spatial=16, **STATS)
SIZE = {"2.1": 16, "2.2": 32}  # 2 x 2 latents


def _pair(folder, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = AutoencoderKLWan(**config).eval()
    ref.save_pretrained(folder)
    return ref, vae3d.load_vae(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """version -> (diffusers' model, ours loaded from the folder diffusers saved)."""
    return {v: _pair(tmp_path_factory.mktemp(f"wan{v}"), c) for v, c in (("2.1", TINY21), ("2.2", TINY22))}


@pytest.fixture(params=["2.1", "2.2"])
def pair(request, models):
    return (request.param, *models[request.param])


@pytest.fixture
def tiny21(models):
    return models["2.1"]


def _video(frames: int, size: int, batch: int = 1, seed: int = 0, width: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, width or size, generator=g) * 2 - 1


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> float:
    """max |a - b| / max(1, max |b|) <= tol; returns it."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item() / max(1.0, b.abs().max().item())
    assert err <= tol, err
    return err


def _not_saturated(video: torch.Tensor) -> None:
    """The clamp to [-1, 1] must not hide the comparison: most values lie strictly inside."""
    assert (video.abs() < 1).float().mean() > 0.9


# -- parity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 9, 17])
def test_parity_tiny(pair, frames):
    version, ref, ours = pair
    s = SIZE[version]
    x = _video(frames, s, batch=2, width=s + ours.spatial_compression)  # not square
    with torch.no_grad():
        theirs = ref.encode(x).latent_dist
        mine = ours.encode(x).latent_dist
        _close(mine.mean, theirs.mean)
        _close(mine.logvar, theirs.logvar)
        z = theirs.mode()
        want = ref.decode(z).sample
        got = ours.decode(z).sample
    assert got.shape == (2, 3, frames, s, s + ours.spatial_compression)
    _not_saturated(want)
    _close(got, want)


def test_parity_tiled_and_sliced(pair):
    version, ref, ours = pair
    s = SIZE[version]
    tiles = dict(tile_sample_min_height=2 * s, tile_sample_min_width=2 * s, tile_sample_stride_height=3 * s // 2,
                 tile_sample_stride_width=3 * s // 2)
    for m in (ref, ours):
        m.enable_tiling(**tiles)
        m.enable_slicing()
    try:
        x = _video(5, 3 * s, batch=2, width=4 * s)
        with torch.no_grad():
            z = ref.encode(x).latent_dist.mode()
            _close(ours.encode(x).latent_dist.mode(), z)
            _close(ours.decode(z).sample, ref.decode(z).sample)
    finally:
        for m in (ref, ours):
            m.disable_tiling()
            m.disable_slicing()


def test_parity_default_wan21():
    """diffusers' default AutoencoderKLWan (the Wan 2.1 VAE: 96 channels, 16 latent channels), one small clip."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan().eval()
    ours = vae3d.WanVAE3D().eval()
    ours.load_state_dict(ref.state_dict())  # the same parameter names
    x = _video(5, 32)
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mode()
        _close(ours.encode(x).latent_dist.mode(), z)
        want = ref.decode(z).sample
        _close(ours.decode(z).sample, want)
    _not_saturated(want)


@pytest.mark.slow
def test_parity_default_wan22():
    """The Wan 2.2 TI2V-5B VAE's configuration (48 latent channels, patches, residual levels), one small clip."""
    config = vae3d.WAN_PRESETS["wan2.2"]
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**config).eval()
    with torch.device("meta"):
        ours = vae3d.WanVAE3D(**config).eval()
    ours.load_state_dict(ref.state_dict(), assign=True)  # the same tensors: one copy of 2.8 GB
    x = _video(5, 32)
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mode()
        _close(ours.encode(x).latent_dist.mode(), z)
        _close(ours.decode(z).sample, ref.decode(z).sample)


# -- the causal convolution with a zero start ------------------------------------------------------


@pytest.mark.parametrize("slice_bytes", [None, 1, 300])
@pytest.mark.parametrize("overwrite", [False, True])
def test_zero_start_conv_streams_and_is_causal(monkeypatch, slice_bytes, overwrite):
    """Zero frames before the video (Wan's rule) on every low-memory path: an image frame alone, windows
    (forwards and, in place, backwards), tap sums; batches with the carried cache equal one call and the
    autograd path, which equals conv3d of the zero-padded video."""
    if slice_bytes is not None:
        monkeypatch.setattr(vae3d.lowmem, "SLICE_BYTES", slice_bytes)
    torch.manual_seed(0)
    conv = FlatCausalConv3d(4, 4 if overwrite else 3, 3)
    x = torch.randn(1, 4, 10, 3, 3)

    def tf(s, a, b):
        return torch.tanh(s) * (1 + torch.arange(a, b).view(1, 1, -1, 1, 1))

    padded = torch.cat([torch.zeros(1, 4, 2, 3, 3), tf(x, 0, 10)], 2)
    want = torch.nn.functional.conv3d(padded, conv.weight, conv.bias, padding=(0, 1, 1))
    with torch.enable_grad():
        _close(conv(x, None, tf).detach(), want, 1e-6)
    with torch.no_grad():
        _close(conv(x.clone(), None, tf, overwrite_input=overwrite), want, 1e-5)
        cache, parts = ConvCache(), []
        for sl in (slice(0, 1), slice(1, 2), slice(2, 6), slice(6, 10)):
            piece = lambda s, a, b, o=sl.start: tf(s, a + o, b + o)  # noqa: E731
            parts.append(conv(x[:, :, sl].clone(), cache, piece, overwrite_input=overwrite))
        _close(torch.cat(parts, 2), want, 1e-5)
        whole = conv(x, None, tf)
        y = x.clone()
        y[:, :, 6:] += 1
        out = conv(y, None, tf)  # output frame t does not depend on input frames after t
    assert torch.equal(out[:, :, :6], whole[:, :, :6])
    assert not torch.allclose(out[:, :, 6:], whole[:, :, 6:])


# -- streaming equals the whole-clip reference -------------------------------------------------------


@pytest.mark.parametrize("slice_bytes", [None, 1, 3000])
def test_streamed_decode_and_encode_equal_the_autograd_path(pair, monkeypatch, slice_bytes):
    """Frame batches of 1, 2 and all latent frames, and the depth-first pieces (one frame per piece and tap
    sums everywhere at slice_bytes 1), equal the decoder run on the whole clip with autograd; encoder batches
    of 4, 8 and all frames (diffusers' and causal batching) equal its whole-clip run."""
    if slice_bytes is not None:
        monkeypatch.setattr(vae3d.lowmem, "SLICE_BYTES", slice_bytes)
    version, _, ours = pair
    s = SIZE[version]
    x = _video(13, s)
    z = torch.randn(1, 4, 5, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():
        whole_video = ours.from_decoder(ours.decoder(ours.post_quant_conv(z))).detach()
        whole_moments = ours.quant_conv(ours.encoder(ours.to_encoder(x))).detach()
    try:
        with torch.no_grad():
            _close(ours.from_decoder(ours.decoder(ours.post_quant_conv(z))), whole_video, 1e-5)  # no cache given
            for n in (1, 2, 5):
                ours.num_latent_frames_batch_size = n
                _close(ours.decode(z).sample, whole_video, 1e-5)
            for n, mode in ((4, "causal"), (8, "diffusers"), (16, "causal")):
                ours.num_sample_frames_batch_size, ours.frame_batching = n, mode
                got = ours.encode(x).latent_dist
                _close(torch.cat([got.mean, got.logvar], 1), whole_moments, 1e-5)
    finally:
        ours.num_latent_frames_batch_size, ours.num_sample_frames_batch_size, ours.frame_batching = 1, 4, "causal"


def test_decoded_frame_counts(tiny21):
    _, ours = tiny21
    with torch.no_grad():
        for latents in (1, 2, 3, 6):
            assert ours.decode(torch.zeros(1, 4, latents, 2, 2)).sample.shape[2] == 1 + 4 * (latents - 1)


# -- causality --------------------------------------------------------------------------------------


def test_changing_a_frame_changes_no_earlier_output(pair):
    """Encoding: changing frame j changes no latent before j's own; decoding: changing latent k changes no
    frame before k's first (1 + 4 (k - 1)), and does change its own."""
    version, _, ours = pair
    x = _video(17, SIZE[version])
    z = torch.randn(1, 4, 5, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = ours.encode(x).latent_dist.mode()
        for j in (0, 1, 4, 5, 8, 16):
            y = x.clone()
            y[:, :, j] = -y[:, :, j]
            latent = ours.encode(y).latent_dist.mode()
            own = 0 if j == 0 else 1 + (j - 1) // 4
            assert torch.equal(latent[:, :, :own], base[:, :, :own]), j
            assert not torch.allclose(latent[:, :, own], base[:, :, own]), j
        video = ours.decode(z).sample
        for k in range(5):
            w = z.clone()
            w[:, :, k] += 1
            out = ours.decode(w).sample
            first = 0 if k == 0 else 1 + 4 * (k - 1)
            assert torch.equal(out[:, :, :first], video[:, :, :first]), k
            assert not torch.allclose(out[:, :, first], video[:, :, first]), k


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version,shape,words",
    [
        ("2.1", (1, 3, 6, 16, 16), ["num_frames 6 is not 1 + 4k", "5 or 9"]),
        ("2.1", (1, 3, 9, 20, 16), ["height 20", "spatial compression 8", "16 or 24"]),
        ("2.1", (1, 4, 9, 16, 16), ["4 input channels", "takes 3"]),
        ("2.2", (1, 3, 9, 40, 32), ["height 40", "spatial compression 16", "32 or 48"]),
        ("2.2", (1, 12, 9, 32, 32), ["12 input channels", "takes 3"]),
    ],
)
def test_encode_validation_names_value_and_nearest_valid(models, monkeypatch, version, shape, words):
    ours = models[version][1]
    monkeypatch.setattr(ours.encoder, "forward", lambda *a, **k: pytest.fail("encoder ran"))  # checked before
    with pytest.raises(ValueError) as err:
        ours.encode(torch.zeros(shape))
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_decode_validation(pair, monkeypatch):
    _, _, ours = pair
    monkeypatch.setattr(ours.decoder, "forward", lambda *a, **k: pytest.fail("decoder ran"))
    with pytest.raises(ValueError, match="got 16 latent channels.*has 4"):
        ours.decode(torch.zeros(1, 16, 3, 2, 2))
    with pytest.raises(ValueError, match="empty dimension"):
        ours.decode(torch.zeros(1, 4, 0, 2, 2))


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="temperal_downsample \\[False\\] needs an entry for each of the 3"):
        vae3d.WanVAE3D(temperal_downsample=[False])
    with pytest.raises(ValueError, match="in_channels 3 is not a multiple of patch_size\\^2 = 4"):
        vae3d.WanVAE3D(patch_size=2, out_channels=12)
    with pytest.raises(ValueError, match="unknown preset 'wan3'"):
        vae3d.WanVAE3D.from_preset("wan3")


# -- dtypes, loading, latents ------------------------------------------------------------------------------


def test_bf16_decode_close_to_fp32(tiny21, tmp_path, monkeypatch):
    monkeypatch.setattr(vae3d.lowmem, "SLICE_BYTES", 1)  # the tap path too: fp32 sums for bf16 inputs
    ref, ours = tiny21
    ref.save_pretrained(tmp_path)
    low = vae3d.load_vae(tmp_path, torch_dtype=torch.bfloat16)
    assert low.decoder.conv_in.weight.dtype == torch.bfloat16
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ours.decode(z).sample
        got = low.decode(z.bfloat16()).sample
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - want).norm() / want.norm() < 0.05


def test_load_round_trips_and_diffusers_reads_our_folder(pair, tmp_path):
    version, ref, ours = pair
    assert isinstance(ours, vae3d.WanVAE3D)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["_class_name"] == "WanVAE3D"
    again = vae3d.load_vae(tmp_path / "ours")
    assert again.config.patch_size == ref.config.patch_size and again.config.z_dim == 4
    theirs = AutoencoderKLWan.from_pretrained(tmp_path / "ours")
    for name, tensor in ref.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], tensor), name
        assert torch.equal(again.state_dict()[name], tensor), name
    ours.save_pretrained(tmp_path / "pipe" / "vae")
    assert isinstance(vae3d.load_vae(tmp_path / "pipe"), vae3d.WanVAE3D)
    # diffusers' own loader builds our class from a diffusers folder too (ModelMixin.from_pretrained)
    ref.save_pretrained(tmp_path / "theirs")
    mixin = vae3d.WanVAE3D.from_pretrained(tmp_path / "theirs")
    assert all(torch.equal(mixin.state_dict()[k], v) for k, v in ref.state_dict().items())
    # what the Wan pipelines read off the VAE
    assert ours.temperal_downsample == ref.temperal_downsample and ours.config.z_dim == ref.config.z_dim
    assert ours.config.scale_factor_spatial == ref.config.scale_factor_spatial == ours.spatial_compression


def test_latent_scaling_is_the_pipelines(tiny21):
    """diffusers' Wan pipelines: (z - mean) * (1 / std) before the transformer, z / (1 / std) + mean to decode."""
    _, ours = tiny21
    z = torch.randn(1, 4, 3, 2, 2)
    mean = torch.tensor(STATS["latents_mean"]).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(STATS["latents_std"]).view(1, 4, 1, 1, 1)
    scaled = ours.scale_latents(z)
    assert torch.allclose(scaled, (z - mean) * inv_std, atol=1e-6)
    assert torch.allclose(ours.unscale_latents(scaled), scaled / inv_std + mean, atol=1e-6)


def test_training_step_has_gradients(tiny21):
    _, ours = tiny21
    x = _video(5, 16)
    out = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(0)).sample
    out.square().mean().backward()
    grads = [p.grad for p in ours.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    ours.zero_grad(set_to_none=True)
