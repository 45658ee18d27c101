"""The pipeline call as diffusers' code drives it (issue #23): for CogVideoX, SD3 / SD3.5, CogView3-Plus, Wan and
Wan image-to-video, the same calls on our pipeline and on diffusers' own class (tiny random folders) give the same
result to 1e-4: prompt embeddings instead of prompts, custom sigmas / timesteps, step callbacks reading and
replacing every tensor diffusers lists, the properties callbacks read, `pipe._interrupt`, SD3.5's skip-layer
guidance; and what we refuse (a frame count diffusers would cut, a custom schedule diffusers' scheduler has no
argument for) is an error that says what diffusers would have done."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.callbacks import SD3CFGCutoffCallback

from dit import DiTPipeline
from tests.tiny import (tiny_cogvideox_pipeline, tiny_cogview3plus_pipeline, tiny_picture, tiny_sd3_pipeline,
                        tiny_wan_i2v_pipeline, tiny_wan_pipeline)

BUILD = {"cogvideox": tiny_cogvideox_pipeline, "sd3": lambda f: tiny_sd3_pipeline(f, sd35=True),
         "cogview3plus": tiny_cogview3plus_pipeline, "wan": tiny_wan_pipeline, "wan_i2v": tiny_wan_i2v_pipeline}
FAMILIES = list(BUILD)
PROMPTS = dict(prompt="a red circle moving left", negative_prompt="blue square")
# Each family's call (guided, 3 steps, latents out: the decode is tested elsewhere).
CALL = {"cogvideox": dict(num_frames=5, height=32, width=32, max_sequence_length=16, guidance_scale=6.0),
        "sd3": dict(height=32, width=32, guidance_scale=5.0),
        "cogview3plus": dict(height=32, width=32, max_sequence_length=16, guidance_scale=5.0),
        "wan": dict(num_frames=5, height=32, width=32, max_sequence_length=16, guidance_scale=4.0),
        "wan_i2v": dict(image=tiny_picture(0), num_frames=5, height=32, width=32, guidance_scale=4.0)}
# The properties diffusers' pipelines keep during a call; each family is checked on those its diffusers class has.
PROPERTIES = ("guidance_scale", "num_timesteps", "current_timestep", "interrupt", "attention_kwargs",
              "joint_attention_kwargs", "do_classifier_free_guidance", "clip_skip")


@pytest.fixture(autouse=True)
def prompt_cleaning_without_ftfy(monkeypatch):
    """diffusers' WanImageToVideoPipeline calls ftfy unconditionally (a NameError without ftfy); WanPipeline's
    cleaning, which ours uses, skips it: the reference gets the same (as in test_pipeline_wan_i2v.py)."""
    import diffusers.pipelines.wan.pipeline_wan as t2v
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v

    monkeypatch.setattr(i2v, "basic_clean", t2v.basic_clean)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """family -> (our pipeline, diffusers' pipeline) on one tiny folder, built on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            ref = BUILD[name](folder)
            ours = DiTPipeline.from_pretrained(folder)
            for pipe in (ours, ref):
                pipe.set_progress_bar_config(disable=True)
            cache[name] = ours, ref
        return cache[name]

    return get


def _out(pipe, name: str, **kw) -> torch.Tensor:
    call = {**CALL[name], "num_inference_steps": 3, "output_type": "latent", **kw}
    out = pipe(**call, generator=torch.Generator().manual_seed(0))
    return out.images if getattr(out, "images", None) is not None else out.frames


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=0)


@torch.no_grad()
def _embeds(name: str, ref) -> dict:
    """The prompts' embeddings as diffusers' own encode_prompt gives them, as the call's keyword arguments."""
    cpu = torch.device("cpu")
    if name == "sd3":
        pe, npe, ppe, nppe = ref.encode_prompt(PROMPTS["prompt"], None, None, negative_prompt=PROMPTS["negative_prompt"],
                                               do_classifier_free_guidance=True, clip_skip=1, device=cpu)
        return dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                    negative_pooled_prompt_embeds=nppe)
    length = {"wan_i2v": 512}.get(name, 16)
    pe, npe = ref.encode_prompt(PROMPTS["prompt"], PROMPTS["negative_prompt"], True, max_sequence_length=length,
                                device=cpu)
    return dict(prompt_embeds=pe, negative_prompt_embeds=npe)


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_embeddings_instead_of_prompts(pairs, name):
    """diffusers' documented use: encode once, call with prompt_embeds / negative_prompt_embeds (SD3: and the
    pooled ones; clip_skip as well). Ours with the embeddings equals diffusers' call with the prompts, and with the
    same embeddings; but CogView3-Plus, where diffusers 0.42 silently replaces negative_prompt_embeds by zeros
    (docs/diffusers.md): ours uses them, as its docstring says."""
    ours, ref = pairs(name)
    embeds = _embeds(name, ref)
    extra = {"clip_skip": 1} if name == "sd3" else {}
    expected = _out(ref, name, **PROMPTS, **extra)
    _close(_out(ours, name, **embeds), expected)
    _close(_out(ours, name, **PROMPTS, **extra), expected)
    if name != "cogview3plus":
        _close(_out(ref, name, **embeds), expected)
    else:  # without negative ones both use zeros (CogView3-Plus's unconditional input)
        alone = dict(prompt_embeds=embeds["prompt_embeds"])
        _close(_out(ours, name, **alone), _out(ref, name, **alone))
    if name == "sd3":
        assert ours.clip_skip == 1
    with pytest.raises(ValueError, match="prompt"):  # both: an error, as in diffusers
        ours(**{**CALL[name], **embeds, "prompt": "a cat", "num_inference_steps": 1})


def test_wan_image_embeds_replace_the_clip_tokens(pairs):
    """image_embeds replace what encode_image gives (diffusers' docstring); the first frame's latents still come
    from the image. diffusers 0.42 cannot take them (it refuses image with image_embeds and fails without the
    image), so the reference is its call with encode_image returning the same tokens."""
    ours, ref = pairs("wan_i2v")
    clip = ref.encode_image(tiny_picture(0), torch.device("cpu"))  # (1, M, E)
    tokens = clip.flip(1) + torch.randn(clip.shape, generator=torch.Generator().manual_seed(3))  # other tokens
    got = _out(ours, "wan_i2v", **PROMPTS, image_embeds=tokens)
    ref.encode_image = lambda image, device=None: tokens
    try:
        expected = _out(ref, "wan_i2v", **PROMPTS)
    finally:
        del ref.encode_image
    _close(got, expected)
    assert (got - _out(ours, "wan_i2v", **PROMPTS)).abs().max() > 1e-3  # the tokens took effect
    with pytest.raises(ValueError, match="image is required.*image_embeds replace only its CLIP tokens"):
        ours(**{**CALL["wan_i2v"], **PROMPTS, "image": None, "image_embeds": tokens})
    with pytest.raises(ValueError, match=r"image_embeds must be \(1, tokens, 16\)"):
        ours(**{**CALL["wan_i2v"], **PROMPTS, "image_embeds": tokens[:, :, :8]})


def test_custom_sigmas_and_timesteps(pairs):
    """SD3's `sigmas` (shifted as diffusers shifts them) give diffusers' images; `timesteps` run where diffusers'
    scheduler takes them (DPMSolverMultistepScheduler), and where it takes none (CogVideoX's schedulers) both
    pipelines refuse them."""
    ours, ref = pairs("sd3")
    sigmas = [1.0, 0.8, 0.45, 0.2]
    _close(_out(ours, "sd3", **PROMPTS, sigmas=sigmas), _out(ref, "sd3", **PROMPTS, sigmas=sigmas))
    assert ours.num_timesteps == 4

    ours, ref = pairs("cogview3plus")
    sched = DPMSolverMultistepScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012)
    ours_dpm, ref_dpm = type(ours)(**{**ours.components, "scheduler": sched}), type(ref)(
        **{**ref.components, "scheduler": sched})
    for pipe in (ours_dpm, ref_dpm):
        pipe.set_progress_bar_config(disable=True)
    timesteps = [999, 700, 400, 100]
    _close(_out(ours_dpm, "cogview3plus", **PROMPTS, timesteps=timesteps),
           _out(ref_dpm, "cogview3plus", **PROMPTS, timesteps=timesteps))
    with pytest.raises(ValueError, match=r"timesteps must be integers in \[0, 999\]"):
        _out(ours_dpm, "cogview3plus", **PROMPTS, timesteps=[999.5, 10])

    ours, ref = pairs("cogvideox")
    with pytest.raises(ValueError, match="does not support custom timestep"):
        _out(ref, "cogvideox", **PROMPTS, timesteps=[999, 500])
    with pytest.raises(ValueError, match="CogVideoXDDIMScheduler takes no custom timesteps .*diffusers' pipeline "
                                         "refuses them too"):
        _out(ours, "cogvideox", **PROMPTS, timesteps=[999, 500])


def _value(v):
    return float(v) if torch.is_tensor(v) else v


def _recording_callback(log: list, properties: list[str], interrupt_at: int | None = None):
    """Records every tensor it is given and the pipeline's properties; at step 0 replaces every tensor (the
    conditioning halved, the latents scaled), which must take effect as in diffusers; sets pipe._interrupt at
    `interrupt_at`."""

    def callback(pipe, i, t, kwargs):
        log.append({"i": i, "t": float(t), **{k: None if v is None else v.clone() for k, v in kwargs.items()},
                    **{p: _value(getattr(pipe, p)) for p in properties}})
        if i == interrupt_at:
            pipe._interrupt = True
        if i != 0:
            return kwargs
        return {k: None if v is None else v * (0.9 if k == "latents" else 0.5) for k, v in kwargs.items()}

    return callback


@pytest.mark.parametrize("name", FAMILIES)
def test_callbacks_see_and_replace_every_tensor_diffusers_lists(pairs, name):
    """callback_on_step_end_tensor_inputs = the pipeline's whole _callback_tensor_inputs: each tensor has
    diffusers' value (prompt_embeds under guidance is the [negative; positive] batch where diffusers'
    pipeline concatenates them), what the callback returns takes effect as in diffusers, and the properties a
    callback reads (guidance_scale, num_timesteps, current_timestep, interrupt, attention_kwargs /
    joint_attention_kwargs, do_classifier_free_guidance, clip_skip) are diffusers'."""
    ours, ref = pairs(name)
    assert ours._callback_tensor_inputs == type(ref)._callback_tensor_inputs
    properties = [p for p in PROPERTIES if isinstance(getattr(type(ref), p, None), property)]
    extra = ({"joint_attention_kwargs": {"scale": 1.0}} if name == "sd3" else
             {} if name == "cogview3plus" else {"attention_kwargs": {"scale": 1.0}})
    logs = {}
    for who, pipe in (("ours", ours), ("ref", ref)):
        logs[who] = []
        out = _out(pipe, name, **PROMPTS, **extra, callback_on_step_end=_recording_callback(logs[who], properties),
                   callback_on_step_end_tensor_inputs=list(ref._callback_tensor_inputs))
        logs[who + "_out"] = out
    _close(logs["ours_out"], logs["ref_out"])
    assert len(logs["ours"]) == len(logs["ref"]) == 3
    for a, b in zip(logs["ours"], logs["ref"]):
        assert a.keys() == b.keys()
        for key in a:
            if torch.is_tensor(b[key]):
                assert a[key].shape == b[key].shape, key
                _close(a[key], b[key])
            elif isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key]), key
            else:
                assert a[key] == b[key], key
    if "current_timestep" in properties:
        assert ours.current_timestep is None  # after the loop, as diffusers


@pytest.mark.parametrize("name", FAMILIES)
def test_interrupt_skips_the_steps_left_as_diffusers(pairs, name):
    """A callback setting pipe._interrupt = True at step 1 of 3: diffusers `continue`s its loop, so the latents
    after step 1 (and its callback) are the result; ours too, and no model runs for step 2."""
    ours, ref = pairs(name)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in ours.denoisers()]
    try:
        got = _out(ours, name, **PROMPTS, callback_on_step_end=_recording_callback([], [], interrupt_at=1))
    finally:
        for hook in hooks:
            hook.remove()
    expected = _out(ref, name, **PROMPTS, callback_on_step_end=_recording_callback([], [], interrupt_at=1))
    _close(got, expected)
    assert len(calls) == 2 and ours.interrupt
    _close(_out(ours, name, **PROMPTS), _out(ref, name, **PROMPTS))  # the next call starts afresh


def test_sd3_cfg_cutoff_callback(pairs):
    """diffusers' SD3CFGCutoffCallback (a PipelineCallback: it names its own tensor inputs) turns guidance off
    after 40% of the steps by setting pipe._guidance_scale = 0 and keeping the positive embeddings: the steps after
    it run the model on the un-doubled batch, in ours as in diffusers."""
    ours, ref = pairs("sd3")
    batches = []
    hook = ours.transformer.register_forward_pre_hook(lambda m, a, k: batches.append(k["hidden_states"].shape[0]),
                                                      with_kwargs=True)
    try:
        got = _out(ours, "sd3", **PROMPTS, num_inference_steps=5,
                   callback_on_step_end=SD3CFGCutoffCallback(cutoff_step_ratio=0.4))
    finally:
        hook.remove()
    expected = _out(ref, "sd3", **PROMPTS, num_inference_steps=5,
                    callback_on_step_end=SD3CFGCutoffCallback(cutoff_step_ratio=0.4))
    _close(got, expected)
    assert batches == [2, 2, 2, 1, 1] and ours.guidance_scale == 0.0 and not ours.do_classifier_free_guidance


def test_sd35_skip_layer_guidance(pairs):
    """skip_guidance_layers on our SD3 pipeline: diffusers' images, through the one guidance wrapper (a second,
    conditional call with the layers skipped on the steps i with start N < i < stop N)."""
    ours, ref = pairs("sd3")
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.2,
               skip_layer_guidance_stop=0.8, num_inference_steps=5)
    skipped = []
    hook = ours.transformer.register_forward_pre_hook(
        lambda m, a, k: skipped.append(k.get("skip_layers")) if k.get("skip_layers") else None, with_kwargs=True)
    try:
        got = _out(ours, "sd3", **PROMPTS, **slg)
    finally:
        hook.remove()
    _close(got, _out(ref, "sd3", **PROMPTS, **slg))
    assert skipped == [[0], [0]] and ours.skip_guidance_layers == [0]  # steps 2 and 3 of 5
    assert (got - _out(ours, "sd3", **PROMPTS, num_inference_steps=5)).abs().max() > 1e-3
    for bad in ([2], [], "0"):  # past the last block diffusers skips nothing: a silent no-op
        with pytest.raises(ValueError, match="skip_guidance_layers must be a non-empty list of block indices 0 to 1"):
            _out(ours, "sd3", **PROMPTS, skip_guidance_layers=bad)
    with pytest.raises(ValueError, match="IP-Adapter is not supported"):
        _out(ours, "sd3", **PROMPTS, ip_adapter_image=tiny_picture(0))


@pytest.mark.parametrize("name,frames,returned", [("cogvideox", 6, 8), ("cogvideox", 10, 9), ("wan", 8, 9),
                                                   ("wan", 11, 9)])
def test_refused_frame_counts_say_what_diffusers_would_return(pairs, name, frames, returned):
    """A frame count that is not 1 + 4n is refused; the error says how many frames diffusers' pipeline returns for
    it (which it does: Wan rounds to 1 + 4n; CogVideoX's VAE decodes an even number of latent frames without its
    causal first frame, so 6 frames ask for 2 latent frames and get 8)."""
    ours, ref = pairs(name)
    cls = type(ref).__name__
    with pytest.raises(ValueError, match=rf"num_frames {frames} must be 1 \+ 4n .*\(diffusers' {cls} silently "
                                         rf"returns {returned} frames"):
        _out(ours, name, **PROMPTS, num_frames=frames)
    video = ref(**{**CALL[name], **PROMPTS, "num_frames": frames, "num_inference_steps": 1, "output_type": "np"},
                generator=torch.Generator().manual_seed(0)).frames
    assert np.asarray(video).shape[1] == returned
