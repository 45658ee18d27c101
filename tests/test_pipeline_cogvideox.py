"""Our CogVideoX pipeline on a tiny random diffusers folder gives diffusers' frames (same seed, settings)."""

import logging

import pytest
import torch

from dit.models.cogvideox import CogVideoXTransformer3DModel
from dit.pipeline import CogVideoXDiTPipeline, DiTPipeline, NonFiniteLatentsError
from tests.tiny import tiny_cogvideox_pipeline

CALL = dict(num_frames=9, height=32, width=32, num_inference_steps=4, output_type="np", max_sequence_length=16)


@pytest.fixture(scope="module", params=[("ddim", False), ("dpm", True)], ids=["ddim-sincos", "dpm-rope"])
def folders(request, tmp_path_factory):
    scheduler, rotary = request.param
    folder = tmp_path_factory.mktemp(f"cogvideox-{scheduler}")
    ref = tiny_cogvideox_pipeline(folder, rotary=rotary, scheduler=scheduler)
    return folder, ref


@pytest.mark.parametrize("guidance", [1.0, 6.0], ids=["no-cfg", "cfg"])
def test_same_frames_as_diffusers(folders, guidance):
    folder, ref = folders
    ours = DiTPipeline.from_pretrained(folder)
    assert isinstance(ours, CogVideoXDiTPipeline)
    kwargs = dict(CALL, prompt="a red circle moving left", negative_prompt="blue square", guidance_scale=guidance)
    expected = ref(generator=torch.Generator().manual_seed(0), **kwargs).frames
    got = ours(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert got.shape == expected.shape == (1, 9, 32, 32, 3)
    assert abs(got - expected).max() <= 1e-4


def test_dynamic_cfg_and_callback(folders):
    folder, ref = folders
    ours = DiTPipeline.from_pretrained(folder)
    seen = []

    def cb(pipe, i, t, kw):
        seen.append((i, int(t)))
        return {"latents": kw["latents"]}

    kwargs = dict(CALL, prompt="a green square", guidance_scale=5.0, use_dynamic_cfg=True)
    expected = ref(generator=torch.Generator().manual_seed(1), **kwargs).frames
    got = ours(generator=torch.Generator().manual_seed(1), callback_on_step_end=cb, **kwargs).frames
    assert abs(got - expected).max() <= 1e-4
    assert [i for i, _ in seen] == [0, 1, 2, 3]


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=30), r"height 30 must be divisible by 16; nearest valid: 16 or 32"),
    (dict(num_frames=8), r"num_frames 8 must be 1 \+ 4n for this VAE; nearest valid: 5 or 9"),
    (dict(num_inference_steps=0), r"num_inference_steps must be a positive integer, got 0"),
    (dict(guidance_scale=float("nan")), r"guidance scale must be a finite number"),
    (dict(prompt=""), None),
    (dict(prompt=[]), r"prompt must be a string or a non-empty list of strings"),
    (dict(output_type="gif"), r"output_type 'gif' is not one of"),
    (dict(height=0), r"height must be a positive integer, got 0"),  # 0 is not "the default"
    (dict(width=0), r"width must be a positive integer, got 0"),
    (dict(num_frames=0), r"num_frames must be a positive integer, got 0"),
    (dict(max_sequence_length=0), r"max_sequence_length must be a positive integer, got 0"),
])
def test_bad_input_is_refused_before_any_work(folders, kwargs, match):
    folder, _ = folders
    ours = DiTPipeline.from_pretrained(folder)
    call = dict(CALL, prompt="a red circle", guidance_scale=1.0, num_inference_steps=1)
    call.update(kwargs)
    if match is None:  # an empty string is a valid (unconditional) prompt
        ours(**call)
        return
    with pytest.raises(ValueError, match=match):
        ours(**call)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        DiTPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no model_index.json"):
        DiTPipeline.from_pretrained(tmp_path)


def test_saved_folder_loads_in_diffusers_and_generates(folders, tmp_path):
    from diffusers import DiffusionPipeline

    folder, ref = folders
    ours = DiTPipeline.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "saved")
    back = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(back).__name__ == "CogVideoXPipeline"
    assert type(back.transformer).__module__.startswith("dit.")
    kwargs = dict(CALL, prompt="a red circle", guidance_scale=6.0)
    a = back(generator=torch.Generator().manual_seed(0), **kwargs).frames
    b = ref(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert abs(a - b).max() <= 1e-4
    again = DiTPipeline.from_pretrained(tmp_path / "saved")  # and ours reads it back
    assert abs(again(generator=torch.Generator().manual_seed(0), **kwargs).frames - b).max() <= 1e-4


@pytest.mark.parametrize("mode", ["latent-nearest", "pixel"])
def test_relay_doubles_the_resolution(folders, mode):
    folder, _ = folders
    ours = DiTPipeline.from_pretrained(folder)
    call = dict(CALL, prompt="a red circle", guidance_scale=1.0, num_inference_steps=2)
    base = ours(generator=torch.Generator().manual_seed(0), output_type="latent", **{k: v for k, v in call.items()
                                                                                     if k != "output_type"}).frames
    out = ours(generator=torch.Generator().manual_seed(0), relay=2, relay_steps=2, relay_upsample=mode, **call).frames
    assert out.shape == (1, 9, 64, 64, 3) and base.shape[-2:] == (4, 4)
    again = ours(generator=torch.Generator().manual_seed(0), relay=2, relay_steps=2, relay_upsample=mode, **call).frames
    assert (out == again).all()  # seeded, block noise included


@pytest.mark.parametrize("kwargs,match", [
    (dict(relay=0), r"relay must be a positive integer, got 0"),
    (dict(relay=2, relay_start=1000), r"relay start T_r = 1000 is outside the schedule's training steps \[1, 999\]"),
    (dict(relay=2, relay_steps=20, relay_start=10), r"number of relay steps 20 must be an integer in \[1, T_r = 10\]"),
    (dict(relay=2, relay_upsample="bicubic"), r"relay_upsample 'bicubic' is not one of"),
])
def test_relay_bad_input(folders, kwargs, match):
    folder, _ = folders
    ours = DiTPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=match):
        ours(**dict(CALL, prompt="a cat", guidance_scale=1.0, num_inference_steps=1), **kwargs)


def test_vae_tiling_and_slicing_switches_keep_the_frames(folders):
    folder, _ = folders
    ours = DiTPipeline.from_pretrained(folder)
    kwargs = dict(CALL, prompt=["a red circle", "a blue square"], guidance_scale=1.0, num_inference_steps=2)
    plain = ours(generator=torch.Generator().manual_seed(0), **kwargs).frames
    ours.enable_vae_slicing()
    ours.enable_vae_tiling()
    tiled = ours(generator=torch.Generator().manual_seed(0), **kwargs).frames
    ours.disable_vae_tiling()
    ours.disable_vae_slicing()
    assert tiled.shape == plain.shape == (2, 9, 32, 32, 3)
    assert abs(tiled - plain).max() <= 1e-4  # frames this small fit in one tile


def test_non_finite_latents_stop_the_run(folders):
    folder, _ = folders
    ours = DiTPipeline.from_pretrained(folder)
    with pytest.raises(NonFiniteLatentsError, match=r"latents became non-finite \(NaN or inf\) at step 1 of 3; "
                                                    r"lower guidance_scale") as info:
        ours(**dict(CALL, prompt="a red circle", guidance_scale=1e308, num_inference_steps=3))
    assert isinstance(info.value, FloatingPointError) and (info.value.step, info.value.total) == (1, 3)


def test_truncated_prompt_is_warned(folders, caplog):
    folder, _ = folders
    ours = DiTPipeline.from_pretrained(folder)
    call = dict(CALL, guidance_scale=1.0, num_inference_steps=1, output_type="latent")

    def ours_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name.startswith("dit.pipeline")]

    with caplog.at_level(logging.WARNING, logger="dit.pipeline"):
        ours(prompt="a red circle", **call)
        assert not ours_warnings()
        ours(prompt="a red circle moving left on the blue background " * 2, **call)  # 18 words; 15 + </s> kept
    [message] = ours_warnings()
    assert "`max_sequence_length` is set to 16 tokens: ['the blue background']" in message


def test_rope_text_may_exceed_max_text_seq_length(folders):
    """diffusers bounds the text length only where positions cover text rows (sin-cos, learned), not with RoPE."""
    folder, ref = folders
    ours = DiTPipeline.from_pretrained(folder)
    kwargs = dict(CALL, prompt="a red circle moving left", guidance_scale=6.0, num_inference_steps=2,
                  max_sequence_length=24)  # the transformer's max_text_seq_length is 16
    if not ours.transformer.config.use_rotary_positional_embeddings:
        with pytest.raises(ValueError, match=r"longer than max_text_seq_length=16, which this model's sin-cos"):
            ours(**kwargs)
        return
    expected = ref(generator=torch.Generator().manual_seed(0), **kwargs).frames
    got = ours(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert abs(got - expected).max() <= 1e-4


def test_learned_positions_still_bound_the_text():
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        time_embed_dim=2, text_embed_dim=16, num_layers=1, sample_width=8,
                                        sample_height=8, sample_frames=9, max_text_seq_length=4,
                                        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
    with pytest.raises(ValueError, match=r"longer than max_text_seq_length=4, which this model's learned positions"):
        model(hidden_states=torch.randn(1, 3, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16), timestep=1)
