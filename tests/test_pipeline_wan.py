"""Our Wan pipeline on tiny diffusers WanPipeline folders: diffusers' frames for the same seed (Wan 2.1, Wan 2.2's
two experts, TI2V's per-token timesteps) with our transformer and our VAE (WanVAE3D, loaded from the folder's
AutoencoderKLWan), requests diffusers would silently round refused before any work, and our saved folders read back
by us and by diffusers."""

import json

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from dit import DiTPipeline
from tests.tiny import tiny_wan_pipeline

CALL = dict(prompt="a red circle moving right", negative_prompt="blue", num_frames=9, num_inference_steps=4,
            output_type="np", max_sequence_length=16)


def _pair(folder, **kw):
    tiny_wan_pipeline(folder, **kw)
    ours = DiTPipeline.from_pretrained(folder)
    ref = WanPipeline.from_pretrained(folder)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def _frames(pipe, **kw):
    return pipe(**{**CALL, **kw}, generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.parametrize("variant,size", [({}, 32), ({"two_experts": True}, 32), ({"ti2v": True}, 64),
                                          ({"scheduler": "euler"}, 32)])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_same_frames_as_diffusers(tmp_path, variant, size, guidance):
    ours, ref = _pair(tmp_path, **variant)
    assert type(ours).__name__ == "WanDiTPipeline"
    assert type(ours.transformer).__module__ == "dit.models.wan"
    assert type(ours.vae).__name__ == "WanVAE3D" and type(ref.vae).__name__ == "AutoencoderKLWan"
    a = _frames(ours, height=size, width=size, guidance_scale=guidance)
    b = _frames(ref, height=size, width=size, guidance_scale=guidance)
    assert a.shape == b.shape == (1, 9, size, size, 3)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_two_experts_each_run_their_steps_with_their_own_guidance(tmp_path):
    ours, ref = _pair(tmp_path, two_experts=True)
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(ours, name).register_forward_pre_hook(lambda m, a, n=name: calls.__setitem__(n, calls[n] + 1))
    a = _frames(ours, height=32, width=32, guidance_scale=4.0, guidance_scale_2=2.0)
    b = _frames(ref, height=32, width=32, guidance_scale=4.0, guidance_scale_2=2.0)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0  # both experts ran (4 steps around 875)


@pytest.mark.parametrize("kw,match", [
    (dict(height=36), "height 36 must be divisible by 16; nearest valid: 32 or 48"),
    (dict(num_frames=8), "num_frames 8 must be 1 \\+ 4n"),
    (dict(height=0), "height must be a positive integer"),
    (dict(guidance_scale_2=2.0), "guidance_scale_2 is for two-expert"),
    (dict(output_type="avi"), "output_type"),
])
def test_bad_requests_are_refused_before_any_model_runs(tmp_path, kw, match):
    tiny_wan_pipeline(tmp_path)
    pipe = DiTPipeline.from_pretrained(tmp_path)
    pipe.transformer.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(AssertionError("model ran")))
    with pytest.raises(ValueError, match=match):
        pipe(**{**CALL, "height": 32, "width": 32, **kw})


def test_saved_folder_loads_in_diffusers_with_our_modules(tmp_path):
    ours, _ = _pair(tmp_path / "src", two_experts=True)
    ours.save_pretrained(tmp_path / "ours")
    back = WanPipeline.from_pretrained(tmp_path / "ours")
    assert back.config.boundary_ratio == 0.875 and back.transformer_2 is not None


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0)


@pytest.mark.parametrize("variant,size", [({}, 32), ({"ti2v": True}, 64)])
def test_our_vae_round_trips_through_save_pretrained_and_diffusers_loads_it(tmp_path, variant, size):
    """save_pretrained names our WanVAE3D (module vae3d.wan_model) in model_index.json; we load it back (also as
    ("vae3d", "WanVAE3D")), and diffusers' WanPipeline.from_pretrained imports our class from that entry and gives
    its own frames."""
    ours, ref = _pair(tmp_path / "src", **variant)
    expected = _frames(ref, height=size, width=size, guidance_scale=4.0)
    ours.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["vae"] == ["vae3d.wan_model", "WanVAE3D"]
    assert json.loads((tmp_path / "ours" / "vae" / "config.json").read_text())["_class_name"] == "WanVAE3D"
    back = DiTPipeline.from_pretrained(tmp_path / "ours")
    assert type(back.vae).__name__ == "WanVAE3D"
    _same_weights(back.vae, ours.vae)
    back.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_frames(back, height=size, width=size, guidance_scale=4.0), expected, atol=1e-4, rtol=0)
    theirs = WanPipeline.from_pretrained(tmp_path / "ours")
    assert type(theirs).__name__ == "WanPipeline" and type(theirs.vae).__name__ == "WanVAE3D"
    theirs.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_frames(theirs, height=size, width=size, guidance_scale=4.0), expected, atol=1e-4,
                               rtol=0)
    index["vae"] = ["vae3d", "WanVAE3D"]  # the package's name for the class loads the same
    (tmp_path / "ours" / "model_index.json").write_text(json.dumps(index))
    assert type(DiTPipeline.from_pretrained(tmp_path / "ours").vae).__name__ == "WanVAE3D"


def test_vae_dtype_and_variant_load_what_diffusers_loads(tmp_path):
    """Per-component dtypes and weight variants reach our VAE as diffusers' from_pretrained applies them to its own."""
    ref = tiny_wan_pipeline(tmp_path)
    ref.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    dtype = {"vae": torch.bfloat16, "default": torch.float32}
    ours = DiTPipeline.from_pretrained(tmp_path, variant="fp16", torch_dtype=dtype)
    theirs = WanPipeline.from_pretrained(tmp_path, variant="fp16", dtype=dtype)
    assert type(ours.vae).__name__ == "WanVAE3D" and ours.vae.dtype == theirs.vae.dtype == torch.bfloat16
    assert ours.transformer.dtype == torch.float32
    _same_weights(ours.vae, theirs.vae)
    plain = DiTPipeline.from_pretrained(tmp_path, low_cpu_mem_usage=False)  # no dtype: diffusers' float32
    assert plain.vae.dtype == torch.float32
    assert not torch.equal(plain.vae.decoder.conv_in.weight, ours.vae.decoder.conv_in.weight.float())  # fp16 rounded


@pytest.mark.parametrize("entry,config_class,match", [
    (["vae3d.wan_lowmem", "WanVAE3D"], "AutoencoderKLWan", "which is not loaded"),
    (["diffusers", "AutoencoderKLWan"], "AutoencoderKLCogVideoX", "names class 'AutoencoderKLCogVideoX'"),
])
def test_vae_entries_outside_the_allow_list_or_unlike_the_config_are_refused(tmp_path, entry, config_class, match):
    tiny_wan_pipeline(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["vae"] = entry
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "_class_name": config_class}))
    with pytest.raises(ValueError, match=match):
        DiTPipeline.from_pretrained(tmp_path)


def test_vae_tiling_and_slicing_give_diffusers_frames(tmp_path):
    """diffusers' VAE switches reach our VAE as they reach its own: tiles of 24 pixels every 16 (2 x 2 tiles,
    blended over 8) and one video at a time, two videos per prompt."""
    ours, ref = _pair(tmp_path)
    for pipe in (ours, ref):
        pipe.vae.enable_tiling(tile_sample_min_height=24, tile_sample_min_width=24, tile_sample_stride_height=16,
                               tile_sample_stride_width=16)
        pipe.vae.enable_slicing()
    a = _frames(ours, height=32, width=32, guidance_scale=4.0, num_videos_per_prompt=2)
    b = _frames(ref, height=32, width=32, guidance_scale=4.0, num_videos_per_prompt=2)
    assert a.shape == b.shape == (2, 9, 32, 32, 3)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    ours.vae.disable_tiling()
    assert np.abs(_frames(ours, height=32, width=32, guidance_scale=4.0, num_videos_per_prompt=2) - a).max() > 1e-4
