"""Our Wan pipeline on tiny diffusers WanPipeline folders: diffusers' frames for the same seed (Wan 2.1, Wan 2.2's
two experts, TI2V's per-token timesteps), and requests diffusers would silently round refused before any work."""

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
