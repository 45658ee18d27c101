"""Relay stages on the image pipelines (SD3's flow path, CogView3-Plus's DDPM path) and on Wan (flow path, two
experts, image-to-video): an oracle denoiser's states equal the relay forward process exactly, the relay keeps
the base result where direct generation does not, block noise holds its statistics in latent space, and bad
relay arguments are refused before any model runs."""

import math

import numpy as np
import pytest
import torch

import samplers
from dit.pipeline import DiTPipeline
from dit.pipeline.relay import RelayStage, relay_stage, scheduler_config
from dit.pipeline.wan_i2v import WanImageToVideoDiTPipeline
from tiny import tiny_cogview3plus_pipeline, tiny_picture, tiny_sd3_pipeline, tiny_wan_i2v_pipeline, tiny_wan_pipeline

BUILD = {"sd3": tiny_sd3_pipeline, "cogview3plus": tiny_cogview3plus_pipeline, "wan21": tiny_wan_pipeline,
         "wan22": lambda f: tiny_wan_pipeline(f, two_experts=True), "ti2v": lambda f: tiny_wan_pipeline(f, ti2v=True),
         "i2v": tiny_wan_i2v_pipeline}
# Each family's base request (the relay doubles height and width); Wan's latents are (B, C, F', H', W').
BASE = {"sd3": dict(height=32, width=32), "cogview3plus": dict(height=16, width=16),
        "wan21": dict(height=32, width=32, num_frames=5)}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(name, image-to-video?) -> our pipeline on a tiny folder, built on first use."""
    folders, cache = {}, {}

    def get(name: str, image: bool = False):
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(name)
            BUILD[name](folders[name])
        if (name, image) not in cache:
            cls = WanImageToVideoDiTPipeline if image else DiTPipeline
            cache[name, image] = cls.from_pretrained(folders[name])
            cache[name, image].set_progress_bar_config(disable=True)
        return cache[name, image]

    return get


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _latents(pipe, **call) -> torch.Tensor:
    out = pipe(prompt="a red circle", output_type="latent", **call)
    return out.images if out.images is not None else out.frames


def _path_and_prediction(pipe) -> tuple[samplers.TrainPath, str]:
    config = scheduler_config(pipe.scheduler)
    return samplers.train_path_from_config(config), samplers.from_diffusers_config(config, 1, mu=0.0).prediction


def _oracle(real, path: samplers.TrainPath, prediction: str, z0: torch.Tensor, seen: list):
    """A transformer forward that, on latents of z0's size, outputs what reads (in `prediction`) as x0 = z0 at the
    training state its timestep names, and records (t, x); other sizes (the base stage) run the real model."""

    def forward(*, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs):
        if hidden_states.shape[-2:] != z0.shape[-2:]:
            return real(hidden_states=hidden_states, timestep=timestep, **kwargs)
        t = float(timestep.flatten()[0])
        seen.append((t, hidden_states.double().clone()))
        i = int((path.model_t - t).abs().argmin())
        a, s = path.alphas[i], path.sigmas[i]
        x = hidden_states.double()
        eps = (x - a * z0) / s
        return (samplers.training_target(z0, eps, a, s, prediction).to(hidden_states.dtype),)

    return forward


@pytest.mark.parametrize("name", list(BASE))
def test_oracle_relay_states_are_the_forward_process_exactly(pipes, name, monkeypatch):
    """Every relay state x_i = alpha_i F(z0, t_i) + sigma_i n with one n, the mixed block noise (block size 2)
    drawn from the call's generator after the base noise; the last state is z0."""
    pipe = pipes(name)
    call = dict(BASE[name], num_inference_steps=2, guidance_scale=1.0)
    base = _latents(pipe, generator=_seeded(0), **call)
    path, prediction = _path_and_prediction(pipe)
    z_low = samplers.upsample(base, 2).double()
    z0 = torch.randn(z_low.shape, generator=_seeded(7), dtype=torch.float64)
    seen = []
    monkeypatch.setattr(pipe.transformer, "forward", _oracle(pipe.transformer.forward, path, prediction, z0, seen))
    out = _latents(pipe, generator=_seeded(0), relay=2, relay_steps=4, relay_start=400, **call)

    g = _seeded(0)
    torch.randn(tuple(base.shape), generator=g)  # the base stage's noise; its samplers draw nothing else
    n = samplers.mixed_noise(tuple(z_low.shape), 2, alpha=0.15, generator=g, dtype=torch.float32).double()
    rs = samplers.relay_schedule(path, 400, 4)
    sched = rs.schedule
    assert [t for t, _ in seen] == pytest.approx(sched.timesteps.tolist())
    for i, (_, x) in enumerate(seen):
        ref = float(sched.alphas[i]) * samplers.relay_blur(z0, z_low, float(rs.blur[i])) + float(sched.sigmas[i]) * n
        torch.testing.assert_close(x, ref, rtol=0, atol=2e-5)
    assert out.shape == z0.shape
    torch.testing.assert_close(out.double(), z0, rtol=0, atol=2e-5)


def _psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    return 20 * math.log10(peak / (a.double() - b.double()).pow(2).mean().sqrt().item())


def test_sd3_relay_keeps_the_base_image(pipes):
    """The relay output at 2x keeps the base result and direct generation at 2x does not: its latents pooled back
    to the base size against the base latents, and its image against the upsampled base image decoded. (Pooling
    the image itself says little with a random VAE: decode(upsample(z)) pooled is ~16 dB off decode(z).)"""
    pipe = pipes("sd3")
    call = dict(num_inference_steps=6, guidance_scale=1.0)
    base = _latents(pipe, height=32, width=32, generator=_seeded(1), **call)
    direct = _latents(pipe, height=64, width=64, generator=_seeded(1), **call)
    with torch.no_grad():
        pixels = lambda z: (pipe._to_pixels(z).clamp(-1, 1) + 1) / 2  # noqa: E731
        base_up = pixels(samplers.upsample(base, 2))
        psnr = {"direct": (_psnr(torch.nn.functional.avg_pool2d(direct, 2), base, 8.0),
                           _psnr(pixels(direct), base_up, 1.0))}
        for start in (200, 500):
            out = _latents(pipe, height=32, width=32, generator=_seeded(1), relay=2, relay_steps=4,
                           relay_start=start, **call)
            psnr[start] = (_psnr(torch.nn.functional.avg_pool2d(out, 2), base, 8.0), _psnr(pixels(out), base_up, 1.0))
    print("PSNR dB (latents pooled back vs base, image vs upsampled base image):", psnr)
    for k in (0, 1):
        assert psnr[500][k] > psnr["direct"][k] + 4, psnr
        assert psnr[200][k] > psnr[500][k] + 3, psnr  # a later start keeps more of the base


def test_block_noise_statistics_hold_in_latent_space(pipes, monkeypatch):
    """The relay stage's starting noise, recovered from its first state in SD3's latent space, has unit variance,
    box-filter covariance and its low-frequency power (a weight of 10 makes the block part dominate)."""
    pipe = pipes("sd3")
    first = []

    class Stop(Exception):
        pass

    real = pipe.transformer.forward

    def record(*, hidden_states, **kwargs):
        if hidden_states.shape[-1] == 32:  # the relay stage's 2 x 16 latents
            first.append(hidden_states.double())
            raise Stop
        return real(hidden_states=hidden_states, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", record)
    with pytest.raises(Stop):
        pipe(prompt="a red circle", height=32, width=32, num_images_per_prompt=8, num_inference_steps=1,
             guidance_scale=1.0, generator=_seeded(3), relay=2, relay_steps=1, relay_start=500,
             relay_noise_alpha=10.0, output_type="latent")
    monkeypatch.setattr(pipe.transformer, "forward", real)
    base = _latents(pipe, height=32, width=32, num_images_per_prompt=8, num_inference_steps=1, guidance_scale=1.0,
                    generator=_seeded(3))
    path, _ = _path_and_prediction(pipe)
    n = (first[0] - path.alphas[500] * samplers.upsample(base, 2).double()) / path.sigmas[500]  # (8, 4, 32, 32)
    w = 100 / 101  # the block part's share of the variance
    lag = lambda dy, dx: (n * torch.roll(n, (dy, dx), (-2, -1))).mean().item()  # noqa: E731
    assert abs(n.var().item() - 1) < 0.04
    for (dy, dx), ref in {(0, 1): w / 2, (1, 0): w / 2, (1, 1): w / 4, (0, 2): 0.0}.items():
        assert abs(lag(dy, dx) - ref) < 0.04, ((dy, dx), lag(dy, dx), ref)
    pooled = torch.nn.functional.avg_pool2d(n, 2).var().item()
    assert abs(pooled - (w * 0.5625 + (1 - w) / 4)) < 0.04  # white noise would keep 1/4


def test_cogview3plus_relay_sees_the_relay_size(pipes, monkeypatch):
    """The relay stage is conditioned on the size it makes (target_size, original_size k x the base)."""
    pipe = pipes("cogview3plus")
    sizes = []
    real = pipe.transformer.forward

    def record(**kwargs):
        sizes.append((tuple(kwargs["hidden_states"].shape[-2:]), kwargs["target_size"][0].tolist(),
                      kwargs["original_size"][0].tolist()))
        return real(**kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", record)
    images = pipe(prompt="a cat", height=16, width=16, num_inference_steps=2, guidance_scale=1.0, relay=2,
                  relay_steps=2, generator=_seeded(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    assert sizes == [((8, 8), [16, 16], [16, 16])] * 2 + [((16, 16), [32, 32], [32, 32])] * 2


def test_wan22_relay_runs_the_low_noise_expert(pipes, monkeypatch):
    """Wan 2.2 A14B's relay stage runs transformer_2 at every step, even from a T_r above the boundary, with
    guidance_scale_2."""
    pipe = pipes("wan22")
    calls = []
    for name in ("transformer", "transformer_2"):
        real = getattr(pipe, name).forward
        monkeypatch.setattr(getattr(pipe, name), "forward", lambda real=real, name=name, **kw: (
            calls.append((name, kw["hidden_states"].shape[-1])), real(**kw))[1])
    frames = pipe(prompt="a red circle", height=32, width=32, num_frames=5, num_inference_steps=3,
                  guidance_scale=4.0, guidance_scale_2=2.0, relay=2, relay_steps=2, relay_start=950,
                  generator=_seeded(0)).frames
    assert frames.shape == (1, 5, 64, 64, 3)
    relay_calls = [name for name, w in calls if w == 8]
    assert relay_calls == ["transformer_2"] * 2 and {w for _, w in calls} == {4, 8}
    assert pipe._guidance(4.0, 2.0, pipe.transformer_2) == 2.0 and pipe._guidance(4.0, None, pipe.transformer_2) == 4.0


@pytest.mark.parametrize("mode", ["latent-bilinear", "pixel"])
def test_wan_ti2v_relay_text_to_video(pipes, mode):
    """TI2V-5B's per-token timesteps (expand_timesteps) at the relay's size; seeded, block noise included."""
    pipe = pipes("ti2v")
    call = dict(prompt="a red circle", height=64, width=64, num_frames=5, num_inference_steps=2, guidance_scale=4.0,
                relay=2, relay_steps=2, relay_upsample=mode)
    a = pipe(generator=_seeded(0), **call).frames
    b = pipe(generator=_seeded(0), **call).frames
    assert a.shape == (1, 5, 128, 128, 3) and (a == b).all()


def test_wan_image_to_video_relay(pipes):
    """Image-to-video: the relay stage sees the image encoded again at its size; Wan 2.1 I2V (CLIP tokens) and
    TI2V-5B (latent frame 0 held at the image's latents at 2x)."""
    pipe = pipes("i2v", image=True)
    frames = pipe(image=tiny_picture(0), prompt="a red circle", height=32, width=32, num_frames=5,
                  num_inference_steps=2, guidance_scale=4.0, relay=2, relay_steps=2, generator=_seeded(0)).frames
    assert frames.shape == (1, 5, 64, 64, 3) and np.isfinite(frames).all()
    ti2v = pipes("ti2v", image=True)
    z = ti2v(image=tiny_picture(0), prompt="a red circle", height=64, width=64, num_frames=5, num_inference_steps=2,
             guidance_scale=4.0, relay=2, relay_steps=2, generator=_seeded(0), output_type="latent").frames
    assert z.shape[-2:] == (8, 8)
    first = ti2v._encode(ti2v._pixels(tiny_picture(0), 128, 128, torch.device("cpu")))
    torch.testing.assert_close(z[:, :, :1], first, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(BASE))
@pytest.mark.parametrize("kwargs,match", [
    (dict(relay=0), r"relay must be a positive integer, got 0"),
    (dict(relay=2.0), r"relay must be a positive integer, got 2.0"),
    (dict(relay=2, relay_steps=0), r"relay_steps must be a positive integer, got 0"),
    (dict(relay=2, relay_start=1000), r"relay start T_r = 1000 is outside the schedule's training steps \[1, 999\]"),
    (dict(relay=2, relay_steps=20, relay_start=10), r"number of relay steps 20 must be an integer in \[1, T_r = 10\]"),
    (dict(relay=2, relay_upsample="bicubic"), r"relay_upsample 'bicubic' is not one of latent-nearest, "),
    (dict(relay=2, relay_noise_alpha=-0.1), r"relay_noise_alpha must be a finite number >= 0, got -0.1"),
    (dict(relay=2, relay_noise_alpha=float("nan")), r"relay_noise_alpha must be a finite number >= 0, got nan"),
    (dict(relay=2, relay_eta=-1.0), r"relay_eta must be a finite number >= 0, got -1.0"),
])
def test_bad_relay_input_is_refused_before_any_model_runs(pipes, name, kwargs, match, monkeypatch):
    pipe = pipes(name)
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("a model ran before the check"))
    with pytest.raises(ValueError, match=match):
        pipe(prompt="a cat", num_inference_steps=1, guidance_scale=1.0, **BASE[name], **kwargs)


@pytest.mark.parametrize("name,size,match", [
    ("sd3", 32, r"relay 8 makes 256x256, past the transformer's position table \(128 pixels per side\); "
                r"the largest relay at 32x32 is 4"),
    ("cogview3plus", 48, r"relay 2 makes 96x96, past the transformer's position table \(64 pixels per side\); "
                         r"drop relay"),
])
def test_relay_beyond_the_positional_table_is_refused_first(pipes, name, size, match, monkeypatch):
    pipe = pipes(name)
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("a model ran before the check"))
    with pytest.raises(ValueError, match=match):
        pipe(prompt="a cat", height=size, width=size, num_inference_steps=1, relay=8 if name == "sd3" else 2)


def test_relay_stage_helper(pipes):
    """None without relay; z_L upsamples any layout over its last two dims; "pixel" needs the VAE's functions."""
    scheduler = pipes("sd3").scheduler
    assert relay_stage(scheduler, None, steps=0, start=-1, upsample="?", noise_alpha=-1, eta=-1) is None
    stage = relay_stage(scheduler, 3, steps=5, start=500, upsample="latent-nearest", noise_alpha=0.15, eta=0.0)
    assert isinstance(stage, RelayStage) and stage.steps == 5 and stage.spec.solver == "relay"
    assert stage.spec.options == {"block_size": 3, "noise_alpha": 0.15} and stage.spec.prediction == "flow"
    for shape in ((2, 4, 5, 6), (1, 3, 4, 5, 6)):
        z = torch.randn(shape)
        up = stage.z_low(z)
        assert up.shape == (*shape[:-2], 15, 18) and torch.equal(up[..., ::3, ::3], z)
    pixel = relay_stage(scheduler, 2, steps=5, start=500, upsample="pixel", noise_alpha=0.15, eta=0.0)
    with pytest.raises(ValueError, match="relay_upsample='pixel' needs the pipeline's VAE decode and encode"):
        pixel.z_low(torch.randn(1, 4, 4, 4))
    halve = lambda x: x[..., ::2, ::2]  # noqa: E731 (a "VAE" that encodes by subsampling)
    torch.testing.assert_close(pixel.z_low(torch.full((1, 3, 4, 4), 2.0), to_pixels=lambda z: z, from_pixels=halve),
                               torch.ones(1, 3, 4, 4))  # clamped to [-1, 1] in pixels


def test_a_folder_relay_transformer_runs_the_relay_stage(pipes, tmp_path, monkeypatch):
    """An SD3 folder with a `relay_transformer` saves and loads it (diffusers' own pipeline ignores it), and the
    relay stage runs it instead of the base transformer."""
    import copy

    from diffusers import DiffusionPipeline

    from dit.pipeline import SD3DiTPipeline

    pipe = pipes("sd3")
    SD3DiTPipeline(**{**pipe.components, "relay_transformer": copy.deepcopy(pipe.transformer)}).save_pretrained(
        tmp_path / "with-relay")
    ours = DiTPipeline.from_pretrained(tmp_path / "with-relay")
    assert type(ours.relay_transformer).__module__ == "dit.models.mmdit"
    back = DiffusionPipeline.from_pretrained(tmp_path / "with-relay", text_encoder_3=None, tokenizer_3=None)
    assert type(back).__name__ == "StableDiffusion3Pipeline"
    calls = []
    for name in ("transformer", "relay_transformer"):
        real = getattr(ours, name).forward
        monkeypatch.setattr(getattr(ours, name), "forward", lambda real=real, name=name, **kw: (
            calls.append((name, kw["hidden_states"].shape[-1])), real(**kw))[1])
    ours.set_progress_bar_config(disable=True)
    ours(prompt="a cat", height=32, width=32, num_inference_steps=2, guidance_scale=1.0, relay=2, relay_steps=2,
         generator=_seeded(0), output_type="latent")
    assert calls == [("transformer", 16)] * 2 + [("relay_transformer", 32)] * 2
