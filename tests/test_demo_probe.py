"""dit.demo.probe: the VAE round trip and denoising from a noised clip, on the embedded demo model."""

from __future__ import annotations

import json

import pytest
import torch

from dit.demo import probe
from dit.demo.evaluate import prompt_grid
from dit.pipeline import DiTPipeline
from dit.requests import DEMO_MODEL


@pytest.fixture(scope="module")
def pipe():
    pipe = DiTPipeline.from_pretrained(DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_denoise_from_the_first_step_is_the_pipelines_own_generation(pipe):
    """Zero terminal SNR: the first step's state is pure noise, so the probe must give what the pipeline gives
    for that noise (same sampler, guidance and decode), whatever clip it was handed."""
    grid = prompt_grid()[::137][:2]
    clips = probe.render_grid(grid, size=32, object_size=0.3, num_frames=9)
    steps = 4
    ours = probe.denoise_from(pipe, grid, clips, start=999, steps=steps, guidance=4.0, seed=3)
    noise = torch.stack([torch.randn((3, 8, 8, 8), generator=torch.Generator().manual_seed(3 + j)) for j in range(2)])
    theirs = pipe(prompt=[g.prompt for g in grid], latents=noise, num_inference_steps=steps, guidance_scale=4.0,
                  height=32, width=32, num_frames=9, output_type="pt").frames  # (B, F, C, H, W) in [0, 1]
    ours = ours.clamp(-1, 1).add(1).div(2).permute(0, 2, 1, 3, 4)
    assert (ours - theirs).abs().max() < 1e-5


def test_denoise_from_a_late_step_keeps_the_clip_and_an_early_one_does_not(pipe):
    """Each prompt is handed another prompt's clip (the demo model redraws a prompt's own clip almost exactly
    from noise): from a late step the handed clip stays, from the first step the prompt's own drawing wins."""
    grid = prompt_grid()[::55]
    handed = probe.render_grid(grid[1:] + grid[:1], size=64, object_size=0.4, num_frames=9)
    late = probe.denoise_from(pipe, grid, handed, start=100, steps=25, guidance=4.0)
    first = probe.denoise_from(pipe, grid, handed, start=999, steps=25, guidance=4.0)
    round_trip = probe.vae_round_trip(pipe, handed)
    assert (late - round_trip).abs().mean() < (first - round_trip).abs().mean() / 2


def test_a_start_below_the_last_step_names_the_accepted_range(pipe):
    with pytest.raises(ValueError, match=r"--start 3: .* give \d+ \.\. 999"):
        probe.tail(pipe._sampler(25), 3)


def test_cli_vae_probe_prints_rates_and_shape_confusion(capsys):
    assert probe.main(["vae", "--every", "110", "--object-size", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 5 and out["size"] == 64  # the folder's generation size
    assert set(out["rates"]) >= {"colour", "shape", "background", "motion", "all", "count"}
    assert sum(sum(row.values()) for row in out["shapes"].values()) == 5


def test_cli_rejects_a_start_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        probe.main(["denoise", "--start", "1", "--every", "110"])
    assert exit_info.value.code == 2
    assert "--start 1: no sampling step" in capsys.readouterr().err
