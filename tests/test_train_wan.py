"""dit train on Wan: configs/train/wan-1.3b-lora.yaml on a tiny diffusers WanPipeline folder (shapes data, a few
CPU steps): checkpoints and an exact resume, the adapter read by diffusers' WanPipeline.load_lora_weights; a full
fine-tune whose export diffusers' WanPipeline loads; the conditioning and latents as WanPipeline computes them;
refusals; and 2-process context parallelism on gloo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dit.train.config import load_config
from tests._accelerate import fresh_accelerate_state, reset_accelerate  # noqa: F401  (autouse here)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "train" / "wan-1.3b-lora.yaml"
PROMPT = "a red circle moving right"


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from tiny import tiny_wan_pipeline

    folder = tmp_path_factory.mktemp("wan")
    tiny_wan_pipeline(folder)  # UniPC with flow_shift 3.0
    return folder


def _overrides(out: Path, folder: Path, **extra) -> dict:
    """The shipped config on the tiny folder: shapes clips of 5 frames at 32 x 32, a few steps, checkpoints at
    every step, validation at the end with 2 sampling steps, fp32 (exact comparisons)."""
    return {"output_dir": str(out), "model.pretrained": str(folder), "data.source": "shapes",
            "data.shapes": {"length": 8, "antialias": 1}, "data.height": 32, "data.width": 32, "data.frames": 5,
            "data.buckets": [], "train.steps": 3, "train.checkpoint_every": 1, "train.keep_last": 1,
            "train.log_every": 1, "train.validate_every": 3, "train.validation_steps": 2,
            "train.mixed_precision": "no", "train.tensorboard": False, "optim.lr": 2e-2,
            "optim.lr_schedule": "constant", **extra}


def _run(overrides: dict):
    from dit.train.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides=overrides))
    final = trainer.run()
    reset_accelerate()
    return trainer, final


def _losses(out: Path) -> dict[int, float]:
    return {json.loads(ln)["step"]: json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()}


def _frames(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), output_type="np").frames


def _transformer_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([700.0]),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g), return_dict=False)


# ------------------------------------------------------------------------------------------------ LoRA


def test_shipped_lora_config_resumes_exactly_and_its_adapter_loads_in_diffusers(tmp_path, wan_folder):
    from diffusers import WanPipeline
    from safetensors.torch import load_file

    from dit.pipeline import DiTPipeline

    lora = {"model.lora.rank": 4, "model.lora.alpha": 4.0}
    trainer, final = _run(_overrides(tmp_path / "full", wan_folder, **lora))
    assert [p.name for p in (tmp_path / "full" / "checkpoints").iterdir()] == ["step-00000003"]
    assert {"00.mp4", "prompts.json"} <= {p.name for p in (tmp_path / "full" / "validation" / "step-00000003").iterdir()}
    # Interrupted after step 2 (its checkpoint), started again: the same losses and adapter.
    _run(_overrides(tmp_path / "part", wan_folder, **lora, **{"train.steps": 2}))
    _, part_final = _run(_overrides(tmp_path / "part", wan_folder, **lora))
    full, part = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(full) == sorted(part) == [1, 2, 3] and all(np.isfinite(list(full.values())))
    assert max(abs(full[s] - part[s]) for s in full) <= 1e-6
    weights = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    again = load_file(part_final / "lora" / "pytorch_lora_weights.safetensors")
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert all(k.startswith("transformer.blocks.") for k in weights)
    for target in ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "ffn.net.0.proj", "ffn.net.2"):
        assert any(k.endswith(f"{target}.lora_B.weight") for k in weights), target

    ref = WanPipeline.from_pretrained(wan_folder)
    before = _frames(ref)
    ref.load_lora_weights(final / "lora")
    after = _frames(ref)
    ours = DiTPipeline.from_pretrained(wan_folder)
    ours.load_lora_weights(final / "lora")
    ours_frames = _frames(ours)
    trained = trainer.bundle.transformer.eval()  # our model with the adapter as trained (no EMA in this config)
    with torch.no_grad():
        a = ref.transformer(**_transformer_inputs())[0]
        b = trained(**_transformer_inputs())[0]
    change, model_diff = np.abs(after - before).max(), float((a - b).abs().max())
    frame_diff = np.abs(after - ours_frames).max()
    print(f"\nWan LoRA: {len(weights)} tensors; max |frame change| {change:.4f}; diffusers vs ours with the adapter: "
          f"transformer {model_diff:.2e}, frames {frame_diff:.2e}")
    assert change > 1e-3
    assert model_diff <= 1e-4 and frame_diff <= 1e-4


# ------------------------------------------------------------------------------------------------ full fine-tune


def test_full_fine_tune_with_ema_exports_a_pipeline_diffusers_wan_loads(tmp_path, wan_folder):
    from diffusers import WanPipeline

    from dit.pipeline import DiTPipeline

    trainer, final = _run(_overrides(tmp_path / "out", wan_folder, **{
        "model.lora": None, "train.ema_decay": 0.9, "train.steps": 2, "train.validate_every": 2, "optim.lr": 1e-3}))
    assert (tmp_path / "out" / "validation" / "step-00000002" / "00.mp4").is_file()
    folder = final / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    theirs = WanPipeline.from_pretrained(folder)
    ours = DiTPipeline.from_pretrained(folder)
    assert type(theirs).__name__ == "WanPipeline" and type(ours).__name__ == "WanDiTPipeline"
    assert type(theirs.scheduler).__name__ == "UniPCMultistepScheduler" and theirs.scheduler.config.flow_shift == 3.0
    exported = list(ours.transformer.parameters())  # the EMA weights, not the last step's
    assert len(exported) == len(trainer.ema.shadow)
    assert all(torch.equal(p, s) for p, s in zip(exported, trainer.ema.shadow))
    original = dict(DiTPipeline.from_pretrained(wan_folder).transformer.named_parameters())
    assert any(not torch.equal(p, original[n]) for n, p in ours.transformer.named_parameters())
    a, b = _frames(theirs), _frames(ours)
    assert a.shape == (1, 5, 32, 32, 3) and np.abs(a - b).max() <= 1e-4


def test_latent_cache_trains_like_on_the_fly_encoding(tmp_path, wan_folder):
    """`--build-cache` stores the normalised posterior and the UMT5 embeddings; a run from it draws the same noise."""
    from dit.train.cache import build_cache

    small = {"train.steps": 2, "train.validate_every": None, "model.lora.rank": 4, "model.lora.alpha": 4.0}
    _run(_overrides(tmp_path / "live", wan_folder, **small))
    cached = _overrides(tmp_path / "cached", wan_folder, **small, **{"data.cache": str(tmp_path / "cache")})
    build_cache(load_config(CONFIG, overrides=cached))
    _run(cached)
    live, from_cache = _losses(tmp_path / "live"), _losses(tmp_path / "cached")
    assert sorted(live) == sorted(from_cache) == [1, 2]
    assert max(abs(live[s] - from_cache[s]) for s in live) <= 1e-5  # batched encoding: float rounding only


# ------------------------------------------------------------------------------------------------ conditioning


def test_text_and_latents_are_what_wan_pipeline_uses(tmp_path, wan_folder):
    from diffusers import WanPipeline

    from dit.train.models import build_bundle

    cfg = load_config(CONFIG, overrides=_overrides(tmp_path / "o", wan_folder))
    assert cfg.objective.shift == 3.0  # null in the config: the folder's flow_shift
    bundle = build_bundle(cfg.model, cfg.objective)
    assert type(bundle.vae).__name__ == "WanVAE3D"  # ours, from the folder's AutoencoderKLWan
    ref = WanPipeline.from_pretrained(wan_folder)
    captions = ["a red circle moving right", ""]
    emb = bundle.encode_text(captions, torch.device("cpu"))["encoder_hidden_states"]
    want, _ = ref.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=512)
    assert emb.shape == (2, 512, 32)
    torch.testing.assert_close(emb, want, rtol=0, atol=1e-6)  # the same encode_prompt; UMT5 loaded by our loader
    assert float(emb[0, 6:].abs().max()) == 0.0 and float(emb[1, 1:].abs().max()) == 0.0  # trimmed, zero-padded

    video = torch.rand(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, F, 3, H, W)
    mean, std = bundle.encode_posterior(video)
    assert mean.shape == std.shape == (2, 16, 2, 4, 4)  # (B, C, F', H', W'): the Wan transformer's layout
    dist = ref.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist
    c = ref.vae.config
    m = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)
    s = torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(mean * s + m, dist.mean, rtol=1e-5, atol=1e-5)  # the pipeline's decode undoes it
    torch.testing.assert_close(std * s, dist.std, rtol=1e-5, atol=1e-6)


def test_shift_comes_from_the_folder_unless_set(tmp_path):
    from tiny import tiny_wan_pipeline

    euler = tmp_path / "euler"
    tiny_wan_pipeline(euler, scheduler="euler")  # FlowMatchEulerDiscreteScheduler(shift=7.0)
    assert load_config(CONFIG, overrides=_overrides(tmp_path / "o", euler)).objective.shift == 7.0
    set_ = load_config(CONFIG, overrides=_overrides(tmp_path / "o", euler, **{"objective.shift": 5.0}))
    assert set_.objective.shift == 5.0


@pytest.mark.parametrize("change, message", [
    ({"model.pretrained": None, "model.transformer_preset": "cogvideox-tiny"},
     "model.family 'wan' trains from a diffusers WanPipeline folder: set model.pretrained"),
    ({"objective.kind": "v_prediction_zero_snr"},
     "objective.kind 'v_prediction_zero_snr' does not fit model.family 'wan'; accepted: flow_matching"),
])
def test_config_refusals(tmp_path, wan_folder, change, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIG, overrides=_overrides(tmp_path / "o", wan_folder, **change))


def test_two_expert_folders_and_sizes_the_model_cannot_take_are_refused(tmp_path, wan_folder):
    from tiny import tiny_wan_pipeline

    from dit.train.models import build_bundle
    from dit.train.trainer import Trainer

    two = tmp_path / "two"
    tiny_wan_pipeline(two, two_experts=True)
    cfg = load_config(CONFIG, overrides=_overrides(tmp_path / "o", two))
    with pytest.raises(ValueError, match="two-expert Wan 2.2 folder"):
        build_bundle(cfg.model, cfg.objective)
    cfg = load_config(CONFIG, overrides=_overrides(tmp_path / "o", wan_folder, **{"data.height": 40}))
    with pytest.raises(ValueError, match=r"data: bucket \[40, 32, 5\] does not fit this Wan model: height 40 must "
                                         r"be divisible by 16; nearest valid: 32 or 48"):
        Trainer(cfg)


# ------------------------------------------------------------------------------------------------ context parallel


def _command(out: Path, folder: Path, *extra: str) -> list[str]:
    sets = {"output_dir": out, "model.pretrained": folder, "data.source": "shapes",
            "data.shapes": "{length: 16, antialias: 1}", "data.height": 32, "data.width": 32, "data.frames": 5,
            "data.buckets": "[]", "train.steps": 3, "train.checkpoint_every": 100, "train.validate_every": 3,
            "train.validation_steps": 2, "train.mixed_precision": "'no'", "train.tensorboard": "false",
            "model.lora.rank": 4, "model.lora.alpha": 4.0, "optim.lr": 1e-2}
    return ["-m", "dit", "train", str(CONFIG), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *extra]


@pytest.mark.parallel
def test_context_parallel_wan_follows_the_single_process_loss_curve(tmp_path, wan_folder):
    """2 processes as one 2-way Ulysses group see the same batches and noise as one process: the same losses;
    validation samples on both ranks of the group (the main one writes)."""
    from test_train_launch import _env, _port

    r = subprocess.run([sys.executable, *_command(tmp_path / "single", wan_folder)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs/accelerate/cpu-2proc.yaml"), "--main_process_port", str(_port())]
    r = subprocess.run([*launch, *_command(tmp_path / "cp", wan_folder, "--set", "parallel.ulysses_degree=2")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "cp")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert (tmp_path / "cp" / "validation" / "step-00000003" / "00.mp4").is_file()
    assert (tmp_path / "cp" / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
