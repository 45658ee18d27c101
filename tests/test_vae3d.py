"""vae3d: parity with diffusers' AutoencoderKLCogVideoX, causality, streaming, validation, dtypes, loading."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX

import vae3d
import vae3d.lowmem
from vae3d.causal_conv import CausalConv3d, ConvCache
from vae3d.streaming import frame_batches

# diffusers' own test config for AutoencoderKLCogVideoX (tests/models/autoencoders).
TINY = dict(
    block_out_channels=(8, 8, 8, 8),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=2,
    temporal_compression_ratio=4,
)
TILES = dict(
    tile_sample_min_height=32, tile_sample_min_width=32, tile_overlap_factor_height=0.25, tile_overlap_factor_width=0.25
)


def _pair(folder, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = AutoencoderKLCogVideoX(**config).eval()
    ref.save_pretrained(folder)
    return ref, vae3d.load_vae(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("tiny_vae"), TINY)


def _video(frames: int, size: int = 16, batch: int = 1, seed: int = 0, width: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, width or size, generator=g) * 2 - 1


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# -- parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 9, 17])
def test_parity_tiny(tiny, frames):
    ref, ours = tiny
    x = _video(frames, size=16, batch=2, width=24)
    with torch.no_grad():
        z_ref = ref.encode(x).latent_dist.mode()
        z = ours.encode(x).latent_dist.mode()
        assert _max_diff(z, z_ref) < 1e-4
        assert _max_diff(ours.decode(z_ref).sample, ref.decode(z_ref).sample) < 1e-4


@pytest.mark.parametrize("frames", [1, 9, pytest.param(17, marks=pytest.mark.slow)])
def test_parity_tiny_tiled(tiny, frames):
    ref, ours = tiny
    ref.enable_tiling(**TILES)
    ours.enable_tiling(**TILES)
    try:
        x = _video(frames, size=64)
        with torch.no_grad():
            z_ref = ref.encode(x).latent_dist.mode()
            z = ours.encode(x).latent_dist.mode()
            assert z.shape == (1, 4, 1 + (frames - 1) // 4, 8, 8)
            assert _max_diff(z, z_ref) < 1e-4
            assert _max_diff(ours.decode(z_ref).sample, ref.decode(z_ref).sample) < 1e-4
            # tiling really changes the result (otherwise the test above proves nothing)
            ours.disable_tiling()
            assert _max_diff(ours.decode(z_ref).sample, ref.decode(z_ref).sample) > 1e-4
    finally:
        ref.disable_tiling()
        ours.disable_tiling()


def test_parity_slicing_and_posterior_sample(tiny):
    ref, ours = tiny
    ours.enable_slicing()
    try:
        x = _video(5, batch=3)
        with torch.no_grad():
            post_ref, post = ref.encode(x).latent_dist, ours.encode(x).latent_dist
            assert _max_diff(post.mean, post_ref.mean) < 1e-4
            assert _max_diff(post.std, post_ref.std) < 1e-4
            s_ref = post_ref.sample(torch.Generator().manual_seed(3))
            s = post.sample(torch.Generator().manual_seed(3))
            assert _max_diff(s, s_ref) < 1e-4
            (out,) = ours.decode(s, return_dict=False)
            assert _max_diff(out, ref.decode(s).sample) < 1e-4
    finally:
        ours.disable_slicing()


@pytest.mark.slow
@pytest.mark.parametrize("tiled", [False, True])
def test_parity_default_config(tmp_path, tiled):
    ref, ours = _pair(tmp_path, {})
    if tiled:  # default overlap factors (1/6, 1/5) give consistent tile sizes at 48 x 40
        for m in (ref, ours):
            m.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=40)
    size = (96, 80) if tiled else (16, 16)
    for frames in (1, 9, 17):
        x = _video(frames, size=size[0], width=size[1])
        with torch.no_grad():
            z_ref = ref.encode(x).latent_dist.mode()
            assert _max_diff(ours.encode(x).latent_dist.mode(), z_ref) < 1e-4
            assert _max_diff(ours.decode(z_ref).sample, ref.decode(z_ref).sample) < 1e-4


# -- causality --------------------------------------------------------------------------------------


@pytest.mark.parametrize("slice_bytes", [None, 1, 300])
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("identity", [False, True])
def test_causal_conv_streaming_equals_whole_and_is_causal(monkeypatch, slice_bytes, overwrite, identity):
    """Frame batches with the carried cache == one call == the plain autograd path; causal. Also with
    no transform, where the convolution reads views of the very frames it overwrites (in place)."""
    if slice_bytes is not None:  # 1: one frame per call (time taps where C' <= C); 300: a few frames per call
        monkeypatch.setattr(vae3d.lowmem, "SLICE_BYTES", slice_bytes)
    torch.manual_seed(0)
    conv = CausalConv3d(4, 4 if overwrite else 5, kernel_size=3)
    x = torch.randn(1, 4, 11, 3, 3)

    def transform(s, a, b):  # a frame-wise transform, fused into the convolution
        if identity:
            return s
        return torch.tanh(s) * (1 + torch.arange(a, b).view(1, 1, -1, 1, 1))

    def run(v, cache=None, tf=transform):
        return conv(v.clone(), cache, tf, overwrite_input=overwrite)

    with torch.no_grad():
        whole = run(x)
        cache = ConvCache()
        parts = []  # frame indices passed to a transform are relative to the batch: shift them back
        for sl in (slice(0, 1), slice(1, 2), slice(2, 7), slice(7, 11)):
            parts.append(run(x[:, :, sl], cache, lambda s, a, b, o=sl.start: transform(s, a + o, b + o)))
    assert _max_diff(torch.cat(parts, 2), whole) < 1e-5
    with torch.enable_grad():  # the plain (autograd) path computes the same
        assert _max_diff(conv(x, None, transform).detach(), whole) < 1e-5
    # output frame t does not depend on input frames after t
    y = x.clone()
    y[:, :, 6:] += 1
    with torch.no_grad():
        out = run(y)
    assert torch.equal(out[:, :, :6], whole[:, :, :6])
    assert not torch.allclose(out[:, :, 6:], whole[:, :, 6:])


def test_causal_prefix_encodes_to_latent_prefix(tiny):
    """Causal batching, one latent frame per batch: 4k+1 frames give the first k+1 latents."""
    _, ours = tiny
    ours.frame_batching, ours.num_sample_frames_batch_size = "causal", 4
    try:
        x = _video(17)
        with torch.no_grad():
            full = ours.encode(x).latent_dist.mode()
            for k in range(5):
                prefix = ours.encode(x[:, :, : 4 * k + 1]).latent_dist.mode()
                assert prefix.shape[2] == k + 1
                assert _max_diff(prefix, full[:, :, : k + 1]) < 1e-5
    finally:
        ours.frame_batching, ours.num_sample_frames_batch_size = "diffusers", 8


@pytest.mark.parametrize("mode", ["diffusers", "causal"])
def test_changing_a_frame_changes_no_earlier_latent(tiny, mode):
    """Changing frame j changes no latent before the frame batch that holds j (GroupNorm statistics
    are per batch); with causal batching of one latent frame per batch that is every earlier latent."""
    _, ours = tiny
    ours.frame_batching = mode
    ours.num_sample_frames_batch_size = 4 if mode == "causal" else 8
    try:
        x = _video(17)
        batches = frame_batches(17, ours.num_sample_frames_batch_size, mode)
        with torch.no_grad():
            base = ours.encode(x).latent_dist.mode()
            for j in (0, 1, 4, 5, 8, 9, 12, 16):  # batch and latent boundaries on both sides
                y = x.clone()
                y[:, :, j] = -y[:, :, j]
                z = ours.encode(y).latent_dist.mode()
                start = next(sl.start for sl in batches if sl.start <= j < sl.stop)  # first frame of j's batch
                first_latent = 0 if start == 0 else 1 + (start - 1) // 4
                assert torch.equal(z[:, :, :first_latent], base[:, :, :first_latent]), j
                own = 0 if j == 0 else 1 + (j - 1) // 4
                assert not torch.allclose(z[:, :, own], base[:, :, own]), j
                if mode == "causal":
                    assert first_latent == own
    finally:
        ours.frame_batching, ours.num_sample_frames_batch_size = "diffusers", 8


def test_diffusers_batching_prefix_at_batch_boundary(tiny):
    ref, ours = tiny
    x = _video(17)
    with torch.no_grad():
        full = ours.encode(x).latent_dist.mode()
        prefix = ours.encode(x[:, :, :9]).latent_dist.mode()  # 9 frames = the first batch of 17
    assert _max_diff(prefix, full[:, :, :3]) < 1e-5


# -- the memory-lean pieces: tap streaming, phase upsampling, lazy upsampled frames -------------------


def test_tap_streaming_carries_output_channels_and_refuses_autograd_afterwards(monkeypatch):
    """Large frames (here: every frame, SLICE_BYTES = 1) carry k_t - 1 running sums of the *output*
    channels between batches, not input frames; continuing such a video with autograd is an error."""
    monkeypatch.setattr(vae3d.lowmem, "SLICE_BYTES", 1)
    torch.manual_seed(0)
    conv = CausalConv3d(6, 2, kernel_size=3)
    x = torch.randn(1, 6, 7, 4, 5)
    with torch.no_grad():
        whole = conv(x)
        cache = ConvCache()
        parts = [conv(x[:, :, sl], cache) for sl in (slice(0, 1), slice(1, 4), slice(4, 7))]
        assert [tuple(s.shape) for s in cache.partials[conv]] == [(1, 2, 4, 5)] * 2
        assert conv not in cache.frames
    assert _max_diff(torch.cat(parts, 2), whole) < 1e-5
    with torch.no_grad(), pytest.raises(ValueError, match="does not continue the cached one"):
        conv(x[:, :, :2, :3], cache)
    with torch.enable_grad():
        assert _max_diff(conv(x).detach(), whole) < 1e-5  # the plain path: conv3d of the padded video
        with pytest.raises(RuntimeError, match="without autograd"):
            conv(x[:, :, :2], cache)


@pytest.mark.parametrize("compress_time", [False, True])
@pytest.mark.parametrize("image_first", [False, True])
def test_phase_upsampling_and_lazy_frames_equal_interpolate_then_conv(compress_time, image_first):
    """The 4-phase 2x2 form of conv3x3(nearest 2x) equals the two steps; UpsampledFrames gives any
    frame range of the materialised output (repeated frames in time included)."""
    from vae3d.blocks import Upsample3D

    torch.manual_seed(0)
    up = Upsample3D(4, 6, compress_time=compress_time)
    x = torch.randn(1, 4, 3, 5, 7)
    f = x[:, :, 0]
    with torch.enable_grad():
        reference = up.conv(torch.nn.functional.interpolate(f, scale_factor=2.0, mode="nearest")).detach()
    with torch.no_grad():
        assert _max_diff(up.upsample(f), reference) < 1e-5
        whole = up(x, image_first)
        lazy = up.lazy(x, image_first)
        assert lazy.shape == whole.shape
        t = whole.shape[2]
        for a, b in [(0, t), (0, 1), (1, 3), (t - 2, t)]:
            assert _max_diff(lazy.frames(a, b), whole[:, :, a:b]) < 1e-6
    with torch.enable_grad():  # the autograd path materialises the upsampling as diffusers does
        assert _max_diff(up(x, image_first).detach(), whole) < 1e-5
        with pytest.raises(ValueError, match="FrameSource input needs autograd disabled"):
            CausalConv3d(6, 2)(lazy)


@pytest.mark.parametrize("compress_time", [False, True])
@pytest.mark.parametrize("slice_bytes", [None, 1])
def test_upsample_equals_diffusers_upsampler(monkeypatch, compress_time, slice_bytes):
    """Upsample3D (phase kernels without autograd, frames in time written twice) and UpsampledFrames read
    one frame at a time in order equal diffusers' CogVideoXUpsample3D, and so do the gradients; fp64 too."""
    from diffusers.models.upsampling import CogVideoXUpsample3D

    from vae3d.blocks import Upsample3D

    if slice_bytes is not None:
        monkeypatch.setattr(vae3d.lowmem, "SLICE_BYTES", slice_bytes)
    torch.manual_seed(0)
    ours = Upsample3D(4, 6, compress_time=compress_time).double()
    ref = CogVideoXUpsample3D(4, 6, compress_time=compress_time).double()
    ref.load_state_dict(ours.state_dict())
    for t in (1, 2, 3, 4):
        x = torch.randn(2, 4, t, 5, 7, dtype=torch.float64)
        with torch.no_grad():
            want = ref(x)
            assert _max_diff(ours(x, image_first=t % 2 == 1), want) < 1e-12
            lazy = ours.lazy(x, image_first=t % 2 == 1)
            frames = torch.cat([lazy.frames(j, j + 1) for j in range(want.shape[2])], 2)
            assert _max_diff(frames, want) < 1e-12
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn_like(want)
        ours(xa, image_first=t % 2 == 1).backward(g)
        ref(xb).backward(g)
        assert _max_diff(xa.grad, xb.grad) < 1e-12
        assert _max_diff(ours.conv.weight.grad, ref.conv.weight.grad) < 1e-10
        ours.zero_grad(), ref.zero_grad()


def test_resnet_block_reads_a_frame_source_like_its_tensor(monkeypatch):
    """A ResNet block fed UpsampledFrames (statistics streamed and merged, conv1 and shortcut reading
    frames on request) equals the block fed the materialised tensor."""
    from vae3d.blocks import ResnetBlock3D, Upsample3D, group_var_mean, streamed_var_mean

    monkeypatch.setattr(vae3d.lowmem, "SLICE_BYTES", 5000)  # 2 frames of 2 KB per step: parts 2, 2, 2, 2, 1
    torch.manual_seed(0)
    up = Upsample3D(8, 8)
    block = ResnetBlock3D(8, 4, groups=2, spatial_norm_dim=3).eval()
    x, zq = torch.randn(1, 8, 9, 4, 4), torch.randn(1, 3, 3, 4, 4)
    with torch.no_grad():
        lazy = up.lazy(x, image_first=True)
        whole = up(x, image_first=True)
        for got, want in zip(streamed_var_mean(lazy, 2), group_var_mean(whole, 2)):
            assert _max_diff(got, want) < 1e-6
        assert _max_diff(block(lazy, zq, ConvCache()), block(whole, zq, ConvCache())) < 1e-5
        # statistics stay on the source's device (a CPU count tensor would not mix with GPU statistics)
        var, mean = streamed_var_mean(up.to("meta").lazy(x.to("meta"), image_first=True), 2)
        assert var.device.type == mean.device.type == "meta"


# -- streaming, single frame ------------------------------------------------------------------------


@pytest.mark.parametrize("slice_bytes", [None, 1, 3000])
def test_streamed_path_equals_plain_path(tiny, monkeypatch, slice_bytes):
    """The memory-lean path (frame slices, in-place, fused norms) equals the plain autograd path
    and diffusers, also when convolutions run one or a few frames per call (as on large frames)."""
    ref, ours = tiny
    if slice_bytes is not None:
        monkeypatch.setattr(vae3d.lowmem, "SLICE_BYTES", slice_bytes)
    x = _video(9, size=16, width=32, batch=2)
    with torch.no_grad():
        z_ref = ref.encode(x).latent_dist.mode()
        assert _max_diff(ours.encode(x).latent_dist.mode(), z_ref) < 1e-4
        assert _max_diff(ours.decode(z_ref).sample, ref.decode(z_ref).sample) < 1e-4
    with torch.no_grad():
        z = ours.encode(x).latent_dist.mode()
        video = ours.decode(z).sample
    with torch.enable_grad():
        z_plain = ours.encode(x).latent_dist.mode()
        video_plain = ours.decode(z_plain).sample
    assert _max_diff(z, z_plain) < 1e-5
    assert _max_diff(video, video_plain) < 1e-5


def test_single_frame_is_an_image(tiny):
    ref, ours = tiny
    x = _video(1, size=32)
    with torch.no_grad():
        z = ours.encode(x).latent_dist.mode()
        assert z.shape == (1, 4, 1, 4, 4)
        video = ours.decode(z).sample
        assert video.shape == (1, 3, 1, 32, 32)
        assert _max_diff(z, ref.encode(x).latent_dist.mode()) < 1e-4
        assert _max_diff(video, ref.decode(z).sample) < 1e-4
        # the image path (2D conv, kernel summed over time) equals the padded 3D convolution
        conv = ours.encoder.conv_in
        padded = torch.cat([x] * 3, dim=2)
        assert _max_diff(conv(x), conv.conv(padded)) < 1e-5


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 4, 13])
def test_decoded_frame_counts(tiny, latent_frames):
    ref, ours = tiny
    z = torch.randn(1, 4, latent_frames, 2, 2)
    with torch.no_grad():
        out, expected = ours.decode(z).sample, ref.decode(z).sample
    assert _max_diff(out, expected) < 1e-4


# -- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, words",
    [
        ((1, 3, 8, 16, 16), ["num_frames 8", "5 or 9"]),
        ((1, 3, 0, 16, 16), ["num_frames 0", "1"]),
        ((1, 3, 9, 20, 16), ["height 20", "16 or 24"]),
        ((1, 3, 9, 16, 4), ["width 4", "8"]),
        ((1, 4, 9, 16, 16), ["4 input channels", "takes 3"]),
        ((3, 9, 16, 16), ["(B, C, F, H, W)", "(3, 9, 16, 16)"]),
    ],
)
def test_encode_validation_names_value_and_valid_ones(tiny, shape, words):
    _, ours = tiny
    with pytest.raises(ValueError) as err:
        ours.encode(torch.zeros(shape))
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_decode_validation(tiny):
    _, ours = tiny
    with pytest.raises(ValueError, match="got 16 latent channels.*has 4"):
        ours.decode(torch.zeros(1, 16, 3, 2, 2))


def test_validation_happens_before_compute(tiny, monkeypatch):
    _, ours = tiny
    monkeypatch.setattr(ours.encoder, "forward", lambda *a, **k: pytest.fail("encoder ran"))
    with pytest.raises(ValueError):
        ours.encode(torch.zeros(1, 3, 6, 16, 16))


# -- dtypes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_ours")
    tiny[1].save_pretrained(folder)
    return folder


@pytest.mark.parametrize("slice_bytes", [None, 1])
def test_bf16_decode_close_to_fp32(tiny, tiny_folder, monkeypatch, slice_bytes):
    """Also on the tap path (slice_bytes 1), whose running sums are fp32 for bf16 inputs."""
    if slice_bytes is not None:
        monkeypatch.setattr(vae3d.lowmem, "SLICE_BYTES", slice_bytes)
    _, ours = tiny
    low = vae3d.load_vae(tiny_folder, torch_dtype=torch.bfloat16)
    assert low.decoder.conv_in.conv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        z = ours.encode(_video(9, size=32)).latent_dist.mode()
        ref = ours.decode(z).sample
        out = low.decode(z.bfloat16()).sample
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_fp16_has_no_nan_or_black_frames(tiny_folder):
    half = vae3d.load_vae(tiny_folder, torch_dtype=torch.float16)
    fp32 = vae3d.load_vae(tiny_folder)
    # large latents stress the norms: fp16 statistics of such inputs would overflow
    z = torch.randn(1, 4, 5, 4, 4) * 300
    with torch.no_grad():
        out = half.decode(z.half()).sample
        ref = fp32.decode(z).sample
        enc = half.encode(_video(9, size=32).half() * 200).latent_dist.mode()
    assert torch.isfinite(out).all() and torch.isfinite(enc).all()
    per_frame_std = out.float().std(dim=(0, 1, 3, 4))
    assert (per_frame_std > 0.5 * ref.std(dim=(0, 1, 3, 4))).all(), per_frame_std
    assert (out.float() - ref).norm() / ref.norm() < 0.05


# -- loading, presets, training --------------------------------------------------------------------


def test_load_round_trips_and_diffusers_reads_our_folder(tiny, tiny_folder, tmp_path):
    ref, ours = tiny
    assert json.loads((tiny_folder / "config.json").read_text())["_class_name"] == "CausalVAE3D"
    again = vae3d.load_vae(tiny_folder)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))
    assert again.config.block_out_channels == ours.config.block_out_channels
    theirs = AutoencoderKLCogVideoX.from_pretrained(tiny_folder)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], tensor), name
    # a pipeline folder with a vae/ subfolder
    ours.save_pretrained(tmp_path / "pipe" / "vae")
    assert isinstance(vae3d.load_vae(tmp_path / "pipe"), vae3d.CausalVAE3D)


def test_load_refuses_pickles_and_other_classes(tiny, tmp_path):
    ref, _ = tiny
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ValueError, match="safetensors"):
        vae3d.load_vae(tmp_path / "bin")
    ref.save_pretrained(tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    config["_class_name"] = "AutoencoderKL"
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="AutoencoderKL'"):
        vae3d.load_vae(tmp_path / "other")


def test_presets_and_scaling():
    vae = vae3d.CausalVAE3D.from_preset("tiny").eval()
    x = _video(9, size=16)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))
        assert z.shape == (1, vae.config.latent_channels, 3, 2, 2)
        assert vae.decode(z).sample.shape == x.shape
        # an even latent count: diffusers' batching decodes 4F frames, causal batching 1 + 4(F - 1)
        assert vae.decode(z[:, :, :2]).sample.shape[2] == 8
        vae.frame_batching = "causal"
        assert vae.decode(z[:, :, :2]).sample.shape[2] == 5
    assert torch.allclose(vae.unscale_latents(vae.scale_latents(z)), z, atol=1e-6)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        vae3d.CausalVAE3D.from_preset("huge")
    assert set(vae3d.PRESETS) >= {"cogvideox", "tiny", "small"}


def test_training_step_has_gradients():
    torch.manual_seed(0)
    vae = vae3d.CausalVAE3D(**TINY).train()
    x = _video(9, size=16)
    post = vae.encode(x).latent_dist
    out = vae.decode(post.sample(torch.Generator().manual_seed(0))).sample
    loss = (out - x).pow(2).mean() + 1e-6 * post.kl().mean()
    loss.backward()
    grads = [p.grad for p in vae.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert vae.encoder.conv_in.conv.weight.grad.abs().sum() > 0
