"""The embedded demo model (dit/assets/demo): it ships, loads in both pipelines, follows its prompts.

The prompt-grid check generates the whole grid (550 prompts, seen and held-out, about two minutes on 2 cores);
`python -m dit.demo.grid` prints the same rates as JSON (README figures).
"""

import json

import numpy as np
import pytest
import torch

from bench.relay_demo import pool2, track_offset_px
from dit.cli import main
from dit.requests import DEMO_MODEL, EMBEDDED_MODEL_NAME, sampling_defaults
from dit.demo.evaluate import evaluate_clip, prompt_grid
from dit.demo.grid import grade_pipeline

PROMPT = "a red circle moving right on a blue background"



@pytest.fixture(scope="module")
def demo():
    from dit.pipeline import DiTPipeline

    pipe = DiTPipeline.from_pretrained(DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def defaults():
    from dit.requests import generation_defaults

    return generation_defaults(DEMO_MODEL)


def _generate(pipe, defaults, prompt=PROMPT, seed=0, **kw):
    args = {**sampling_defaults(defaults), **kw}  # what `dit generate` passes, unless the test says otherwise
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **args).frames[0]


def test_the_folder_ships_in_the_package_within_25_mb():
    files = [p for p in DEMO_MODEL.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MB"
    index = json.loads((DEMO_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXPipeline" and "relay_transformer" in index
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]  # safetensors only


def test_dit_generate_without_model_uses_the_demo(tmp_path, defaults):
    out = tmp_path / "demo.gif"
    assert main(["generate", PROMPT, "-o", str(out)]) == 0
    import imageio.v3 as iio

    frames = iio.imread(out)
    assert frames.shape[:3] == (defaults["num_frames"], defaults["height"], defaults["width"])
    side = json.loads((tmp_path / "demo.gif.json").read_text())
    assert side["model"] == EMBEDDED_MODEL_NAME and side["steps"] == defaults["num_inference_steps"]
    est = evaluate_clip(frames)
    assert (est.colour, est.shape, est.background, est.motion) == ("red", "circle", "blue", "right"), est


def test_dit_generate_png_gives_one_picture_of_the_asked_shape(tmp_path, defaults):
    import imageio.v3 as iio

    out = tmp_path / "square.png"
    assert main(["generate", "a yellow square on a black background", "-o", str(out)]) == 0
    image = iio.imread(out)
    assert image.shape == (defaults["height"], defaults["width"], 3)
    est = evaluate_clip(image[None])
    assert (est.colour, est.shape, est.background) == ("yellow", "square", "black"), est


def test_relay_2_doubles_the_size_and_keeps_the_base_result(tmp_path, demo, defaults):
    from dit.requests import relay_defaults

    relay = relay_defaults(defaults)
    base = _generate(demo, defaults)
    high = _generate(demo, defaults, relay=2, **relay)
    assert high.shape == (base.shape[0], 2 * base.shape[1], 2 * base.shape[2], 3)
    # Low frequencies: the relay output averaged over 2x2 blocks is close to the base result. The scale of
    # "unrelated" is another prompt on the same background (a different seed of the same prompt is not: this
    # model draws the object's path from a narrow band, so two seeds differ little; measured 0.017 against
    # 0.023 for the relay and 0.066 for the other prompt).
    low = pool2(high)
    other = _generate(demo, defaults, prompt="a red circle moving left on a blue background")
    assert np.abs(low - base).mean() < 0.5 * np.abs(other - base).mean()
    est_base, est_high = evaluate_clip(base), evaluate_clip(high)
    attributes = ("colour", "shape", "background", "motion")
    assert est_high.score(est_base.__dict__, attributes=attributes) == dict.fromkeys(attributes, True)
    # The object's track, per frame, in base pixels (measured: within 0.9 px; it travels about 13 px).
    offset = track_offset_px(base, high)
    assert offset is not None and offset < 2.0, offset
    out = tmp_path / "relay.gif"
    assert main(["generate", PROMPT, "-o", str(out), "--relay", "2"]) == 0
    side = json.loads((tmp_path / "relay.gif.json").read_text())
    assert side["relay"] == 2 and side["relay_upsample"] == defaults["relay_upsample"]


def test_diffusers_loads_the_folder_and_gives_our_frames(demo, defaults):
    from diffusers import CogVideoXPipeline, DiffusionPipeline

    ref = DiffusionPipeline.from_pretrained(DEMO_MODEL)
    assert isinstance(ref, CogVideoXPipeline)
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, num_inference_steps=defaults["num_inference_steps"], height=defaults["height"],
              width=defaults["width"], num_frames=defaults["num_frames"], guidance_scale=defaults["guidance_scale"],
              max_sequence_length=demo.transformer.config.max_text_seq_length, output_type="np")
    theirs = ref(generator=torch.Generator().manual_seed(0), **kw).frames[0]
    ours = demo(generator=torch.Generator().manual_seed(0), **kw).frames[0]
    assert np.abs(theirs - ours).max() < 1e-3


def _check_grid(demo, defaults, grid):
    result = grade_pipeline(demo, grid, **sampling_defaults(defaults))
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}))
    attributes = ("colour", "shape", "background", "motion")
    assert min(result["seen"][a] for a in attributes) >= 0.9, result
    assert min(result["heldout"][a] for a in attributes) >= 0.8, result  # combinations never trained on


def test_prompt_grid_follows_the_prompts(demo, defaults):
    # All 550 prompts (about two minutes on 2 cores): seen combinations held to >= 90% per attribute, the 55
    # held-out ones to >= 80%.
    _check_grid(demo, defaults, prompt_grid())
