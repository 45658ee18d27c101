"""Our Wan image-to-video pipeline on tiny diffusers WanImageToVideoPipeline folders: diffusers' frames for the same
seed and image (Wan 2.1 I2V with its CLIP image encoder, FLF2V's first and last frame, Wan 2.2 A14B's two experts
without an encoder, TI2V-5B's held first frame), and bad requests refused before any model runs."""

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline

from dit import DiTPipeline
from dit.pipeline.wan import WanDiTPipeline
from dit.pipeline.wan_i2v import WanImageToVideoDiTPipeline
from tests.tiny import tiny_picture as picture
from tests.tiny import tiny_wan_i2v_pipeline, tiny_wan_pipeline



@pytest.fixture(autouse=True)
def prompt_cleaning_without_ftfy(monkeypatch):
    """diffusers' WanImageToVideoPipeline calls ftfy unconditionally (a NameError where ftfy is not installed);
    WanPipeline's cleaning, which ours uses, skips ftfy then: the reference gets the same."""
    import diffusers.pipelines.wan.pipeline_wan as t2v
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v

    monkeypatch.setattr(i2v, "basic_clean", t2v.basic_clean)


# max_sequence_length: the default 512, as diffusers' Wan attention takes the last 512 context tokens as the text's
# and the ones before as the image's
CALL = dict(prompt="a red circle moving right", negative_prompt="blue", num_frames=9, num_inference_steps=4,
            output_type="np")


def _build(folder, variant: str):
    if variant == "ti2v":  # TI2V-5B's folder is a WanPipeline, which diffusers' image-to-video class loads too
        tiny_wan_pipeline(folder, ti2v=True)
    else:
        tiny_wan_i2v_pipeline(folder, two_experts=variant == "wan22", flf2v=variant == "flf2v",
                              projection=variant != "wan21-clipvision", scheduler="euler" if variant == "euler" else
                              "unipc")


def _pair(folder, variant: str):
    _build(folder, variant)
    ours = (WanImageToVideoDiTPipeline if variant == "ti2v" else DiTPipeline).from_pretrained(folder)
    ref = WanImageToVideoPipeline.from_pretrained(folder)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def _frames(pipe, **kw):
    return pipe(**{**CALL, "image": picture(0), **kw}, generator=torch.Generator().manual_seed(0)).frames


PARITY = [("wan21", 32, {}), ("wan21-clipvision", 32, {}), ("euler", 32, {}), ("flf2v", 32, {"last_image": picture(1)}),
          ("wan22", 32, {}), ("wan22", 32, {"last_image": picture(1)}), ("ti2v", 64, {})]


@pytest.mark.parametrize("variant,size,extra,guidance", [(*case, g) for case in PARITY for g in (1.0, 4.0)]
                         + [("wan22", 32, {"guidance_scale_2": 2.0}, 4.0)])
def test_same_frames_as_diffusers(tmp_path, variant, size, extra, guidance):
    ours, ref = _pair(tmp_path, variant)
    assert type(ours) is WanImageToVideoDiTPipeline
    assert all(type(m).__module__ == "dit.models.wan" for m in ours.denoisers())
    assert (ours.image_encoder is None) == (variant in ("wan22", "ti2v"))
    a = _frames(ours, height=size, width=size, guidance_scale=guidance, **extra)
    b = _frames(ref, height=size, width=size, guidance_scale=guidance, **extra)
    assert a.shape == b.shape == (1, 9, size, size, 3)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant,size,extra", [("wan21", 32, {}), ("flf2v", 32, {"last_image": picture(1)}),
                                                ("wan22", 32, {"last_image": picture(1)}), ("ti2v", 64, {})])
def test_the_transformer_sees_diffusers_inputs(tmp_path, variant, size, extra):
    """The frames' parity made direct: the first step's model input (noise + mask + image latents, or TI2V's held
    frame), per-token timesteps and CLIP tokens equal diffusers' conditional call; our guided call runs the
    [uncond, cond] batch at once. (Tiny random transformers react little to their input channels, so this is
    where a wrong mask or normalisation shows.)"""
    ours, ref = _pair(tmp_path, variant)
    got = {}
    for name, pipe in (("ours", ours), ("ref", ref)):
        seen = []
        hook = pipe.transformer.register_forward_pre_hook(
            lambda m, a, k, seen=seen: seen.append(dict(k)), with_kwargs=True)
        _frames(pipe, height=size, width=size, guidance_scale=4.0, num_inference_steps=1, **extra)
        hook.remove()
        got[name] = seen[0]
    a, b = got["ours"], got["ref"]
    assert a["hidden_states"].shape[0] == 2 * b["hidden_states"].shape[0]  # [uncond, cond]
    x, y = a["hidden_states"][1:].clone(), b["hidden_states"].clone()
    # The image's VAE latents: our WanVAE3D against diffusers' AutoencoderKLWan, equal to float rounding; the noise
    # and the frame mask exactly.
    z, k = ours.vae.config.z_dim, ours.vae_scale_factor_temporal
    image = (slice(None), slice(None), slice(0, 1)) if variant == "ti2v" else (slice(None), slice(z + k, None))
    torch.testing.assert_close(x[image], y[image], atol=1e-6, rtol=0)
    x[image], y[image] = 0, 0
    torch.testing.assert_close(x, y, atol=0, rtol=0)
    timestep = b["timestep"]
    torch.testing.assert_close(a["timestep"][1:].float(), timestep.float(), atol=0, rtol=0)
    if variant == "ti2v":
        assert (timestep[0, :4] == 0).all() and (timestep[0, 4:] > 0).all()  # first frame's 2x2 tokens: clean
    if b["encoder_hidden_states_image"] is None:
        assert a["encoder_hidden_states_image"] is None
    else:
        n = b["encoder_hidden_states_image"].shape[0]
        torch.testing.assert_close(a["encoder_hidden_states_image"][n:], b["encoder_hidden_states_image"], atol=0,
                                   rtol=0)
    other = []
    hook = ours.transformer.register_forward_pre_hook(lambda m, a, k: other.append(k["hidden_states"]),
                                                      with_kwargs=True)
    _frames(ours, height=size, width=size, guidance_scale=4.0, num_inference_steps=1, **{**extra, "image": picture(7)})
    hook.remove()
    assert not torch.equal(other[0], a["hidden_states"])  # another first frame: another condition


def test_latent_output_and_the_first_frame_held(tmp_path):
    """TI2V: the latents returned hold latent frame 0 at the image's normalised VAE latents, as diffusers'."""
    ours, ref = _pair(tmp_path, "ti2v")
    kw = dict(height=64, width=64, guidance_scale=4.0, output_type="latent")
    a, b = _frames(ours, **kw), _frames(ref, **kw)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    first = ours._encode(ours._pixels(picture(0), 64, 64, torch.device("cpu")))
    torch.testing.assert_close(a[:, :, :1], first, atol=1e-6, rtol=0)


def test_folders_and_classes(tmp_path):
    """A WanImageToVideoPipeline folder loads as ours; TI2V-5B's WanPipeline folder as either class; a text-only
    WanPipeline folder is refused by the image-to-video class; our saved folder loads in diffusers."""
    _build(tmp_path / "ti2v", "ti2v")
    assert type(DiTPipeline.from_pretrained(tmp_path / "ti2v")) is WanDiTPipeline
    tiny_wan_pipeline(tmp_path / "t2v")
    with pytest.raises(ValueError, match="text-to-video WanPipeline"):
        WanImageToVideoDiTPipeline.from_pretrained(tmp_path / "t2v")
    _build(tmp_path / "i2v", "wan21")
    with pytest.raises(ValueError, match="WanImageToVideoPipeline, which WanDiTPipeline cannot load"):
        WanDiTPipeline.from_pretrained(tmp_path / "i2v")
    ours = DiTPipeline.from_pretrained(tmp_path / "i2v")
    ours.save_pretrained(tmp_path / "ours")
    back = WanImageToVideoPipeline.from_pretrained(tmp_path / "ours")
    assert type(back.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert type(DiTPipeline.from_pretrained(tmp_path / "ours")) is WanImageToVideoDiTPipeline


@pytest.mark.parametrize("variant,kw,match", [
    ("wan21", dict(height=36), "height 36 must be divisible by 16; nearest valid: 32 or 48"),
    ("wan21", dict(num_frames=8), "num_frames 8 must be 1 \\+ 4n"),
    ("wan21", dict(image=None), "image is required"),
    ("wan21", dict(image="cat.png"), "image must be a PIL image or a torch.Tensor, got str"),
    ("wan21", dict(image=torch.zeros(2, 3, 32, 32)), "image must be one image"),
    ("wan21", dict(last_image=picture(1)), "last_image needs a first-last-frame transformer"),
    ("wan21", dict(guidance_scale_2=2.0), "guidance_scale_2 is for two-expert"),
    ("flf2v", {}, "pass last_image"),
    ("wan22", dict(last_image=picture(1), num_frames=1), "last_image needs num_frames of at least 5"),
    ("ti2v", dict(last_image=picture(1), height=64, width=64), "last_image is not used with expand_timesteps"),
    ("ti2v", dict(height=48, width=64), "height 48 must be divisible by 32"),
])
def test_bad_requests_are_refused_before_any_model_runs(tmp_path, variant, kw, match):
    _build(tmp_path, variant)
    pipe = WanImageToVideoDiTPipeline.from_pretrained(tmp_path)

    def ran(*a):
        raise AssertionError("a model ran")

    for m in [*pipe.denoisers(), pipe.vae.encoder, pipe.text_encoder, pipe.image_encoder]:
        if m is not None:
            m.register_forward_pre_hook(ran)
    with pytest.raises(ValueError, match=match):
        pipe(**{**CALL, "image": picture(0), "height": 32, "width": 32, **kw})
