"""dit train: strict config, data sources and bucketing, objectives, smoke runs of every shipped config with a
tiny model substituted, exports (pipeline folder, diffusers-readable LoRA), cache, checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dit.train.config import load_config
from tests._accelerate import fresh_accelerate_state, reset_accelerate  # noqa: F401  (autouse here)

ROOT = Path(__file__).resolve().parent.parent
TRAIN_CONFIGS = sorted((ROOT / "configs" / "train").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cogvideox_folder(tmp_path_factory):
    from tiny import tiny_cogvideox_pipeline

    folder = tmp_path_factory.mktemp("cogvideox")
    tiny_cogvideox_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from tiny import tiny_wan_pipeline

    folder = tmp_path_factory.mktemp("wan")
    tiny_wan_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from test_mmdit import _clip_vocab
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = _clip_vocab()

    def clip(seed):
        torch.manual_seed(seed)
        cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                             num_attention_heads=4, num_hidden_layers=1, vocab_size=len(vocab), projection_dim=32,
                             max_position_embeddings=77)
        return CLIPTextModelWithProjection(cfg).eval()

    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, transformer=transformer,
        text_encoder=clip(1), tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        text_encoder_2=clip(2), tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        text_encoder_3=None, tokenizer_3=None,
    )
    folder = tmp_path_factory.mktemp("sd3")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _write_media(folder: Path) -> Path:
    """Three short videos (one too short for 9 frames at stride 2) and two images, captions in every format."""
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i, (h, w, n) in enumerate([(40, 48, 12), (48, 32, 20), (32, 32, 6)]):
        frames = (rng.random((n, h, w, 3)) * 255).astype(np.uint8)
        iio.imwrite(folder / f"clip{i}.mp4", frames, plugin="FFMPEG", fps=8, codec="libx264", macro_block_size=1,
                    ffmpeg_log_level="error")
        entries.append((f"clip{i}.mp4", f"a red circle moving {'left' if i else 'right'}"))
    for i in range(2):
        iio.imwrite(folder / f"image{i}.png", (rng.random((40, 36, 3)) * 255).astype(np.uint8))
        entries.append((f"image{i}.png", "a blue square on a white background"))
    for name, caption in entries:
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
    with (folder / "captions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "caption"])
        writer.writerows(entries)
    (folder / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in entries))
    return folder


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return _write_media(tmp_path_factory.mktemp("media") / "data")


def _tiny_overrides(path: Path, tmp: Path, cogvideox: Path, sd3: Path, media: Path, wan: Path | None = None) -> dict:
    """What a smoke run substitutes: tiny models and data, two steps, no context parallelism (one process)."""
    raw = yaml.safe_load(path.read_text())
    family = raw["model"].get("family", "cogvideox")
    image = family == "sd3"
    o = {"output_dir": str(tmp / "out"), "train.steps": 2, "train.batch_size": 1, "train.checkpoint_every": 1,
         "train.log_every": 1, "train.keep_last": 1, "parallel.ring_degree": 1, "parallel.ulysses_degree": 1,
         "train.validation_steps": 2}
    if raw["model"].get("pretrained"):
        o["model.pretrained"] = str({"sd3": sd3, "wan": wan}.get(family, cogvideox))
    if raw["data"].get("source") == "folder":
        o["data.folder"] = str(media)
        o.update({"data.height": 32, "data.width": 32, "data.frames": 1 if image else 5,
                  "data.buckets": [[32, 32, 1], [32, 48, 1]] if image else [[32, 32, 5], [48, 32, 5]]})
    if raw["data"].get("cache"):
        o["data.cache"] = str(tmp / "cache")
    if raw["train"].get("validate_every"):
        o["train.validate_every"] = 2
    return o


# ------------------------------------------------------------------------------------------------ config


def test_every_accelerate_config_parses():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"single-gpu", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3", "multi-node", "cpu-2proc"} <= names
    for path in ACCELERATE_CONFIGS:
        cfg = load_config_from_file(str(path))
        assert cfg.num_processes >= 1, path


def test_every_train_config_parses(tmp_path, cogvideox_folder, sd3_folder, media, wan_folder):
    assert {p.stem for p in TRAIN_CONFIGS} >= {"tiny-cpu", "cogvideox-2b-lora", "cogvideox-2b-full-cp",
                                               "sd3-finetune", "relay-sr"}
    for path in TRAIN_CONFIGS:
        raw = yaml.safe_load(path.read_text())
        # As shipped, only the paths are substituted (the model and data folders are the user's).
        overrides = _tiny_overrides(path, tmp_path, cogvideox_folder, sd3_folder, media, wan_folder)
        paths = {k: v for k, v in overrides.items()
                 if k in ("model.pretrained", "data.folder", "data.cache", "output_dir")}
        cfg = load_config(path, overrides=paths)
        assert cfg.train.steps == raw["train"]["steps"]
        assert cfg.objective.kind == raw["objective"]["kind"]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["train"].update(stpes=3), "unknown config key 'train.stpes'; accepted in train: steps,"),
    (lambda d: d["model"]["text_encoder"].update(width=3), "unknown config key 'model.text_encoder.width'"),
    (lambda d: d.update(extra=1), "unknown config key 'extra'"),
    (lambda d: d["train"].update(steps="ten"), "train.steps: expected an integer, got 'ten'"),
    (lambda d: d["optim"].update(lr=True), "optim.lr: expected a number, got True"),
    (lambda d: d["data"].update(source="folder", folder="/no/such/folder"),
     "data.folder: folder '/no/such/folder' does not exist"),
    (lambda d: d["model"].update(transformer_preset=None, pretrained="/no/model"),
     "model.pretrained: folder '/no/model' does not exist"),
    (lambda d: d["objective"].update(kind="eps"), "objective.kind: unknown value 'eps'; accepted: v_prediction_zero_snr"),
    (lambda d: d["optim"].update(lr_schedule="cosin"), "optim.lr_schedule: unknown value 'cosin'"),
    (lambda d: d["data"].update(shapes={"colour": ["red"]}), "data.shapes: unknown shapes config key(s) ['colour']"),
    (lambda d: d["model"].update(transformer_preset=None, transformer={"num_layer": 2}),
     "unknown config key 'model.transformer.num_layer'; accepted: num_attention_heads,"),
    (lambda d: d["objective"].update(kind="autoencoder") or d["model"].update(lora={"rank": 4}),
     "objective.kind 'autoencoder' trains a CogVideoX-style VAE"),
    (lambda d: d["objective"].update(kind="autoencoder") or d["data"].update(cache="/tmp/c"),
     "data.cache holds latents; objective.kind 'autoencoder' trains on pixels"),
    (lambda d: d["objective"].update(l2_weight=-1), "objective.l2_weight: must be >= 0, got -1.0"),
    (lambda d: d["objective"].update(kind="autoencoder") or d.update(parallel={"ulysses_degree": 2}),
     "parallel: context parallelism shards the transformer's sequence; an autoencoder run trains the VAE"),
    (lambda d: d["model"].update(vae_pretrained="/no/vae"), "model.vae_pretrained: give it alone"),
    (lambda d: d["model"].update(vae_preset=None, vae_pretrained="/no/vae"),
     "model.vae_pretrained: folder '/no/vae' does not exist"),
])
def test_bad_configs_are_one_line_errors_naming_the_key(tmp_path, capsys, mutate, message):
    from dit.cli import main

    data = yaml.safe_load((ROOT / "configs/train/tiny-cpu.yaml").read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dit: error: ") and message in err and len(err.splitlines()) == 1


def test_missing_config_file_and_bad_set(tmp_path, capsys):
    from dit.cli import main

    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", str(ROOT / "configs/train/tiny-cpu.yaml"), "--set", "train.steps"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ data


def test_folder_source_buckets_frames_and_caption_formats(media):
    from dit.train.config import DataConfig
    from dit.train.data import BatchStream, FolderSource

    for fmt, file in (("txt", None), ("csv", "captions.csv"), ("jsonl", "captions.jsonl")):
        cfg = DataConfig(source="folder", folder=str(media), captions=fmt, captions_file=file, frame_stride=2,
                         buckets=[[32, 32, 5], [48, 32, 9], [32, 32, 1]])
        src = FolderSource(cfg, seed=0)
        names = [p.name for p, _ in src.items]
        assert names == ["clip0.mp4", "clip1.mp4", "clip2.mp4", "image0.png", "image1.png"]
        # clip1 (48x32, 20 frames) fits 9 frames at stride 2 in the tall bucket; clip0 (12 frames) only 5;
        # clip2 (6 frames) fits 5 frames only at stride 1 -> 3 frames at stride 2: the 1-frame bucket; images: 1.
        assert [src.buckets[b] for b in src.bucket_of] == [(32, 32, 5), (48, 32, 9), (32, 32, 1), (32, 32, 1),
                                                           (32, 32, 1)]
        item = src[1]
        assert item["video"].shape == (9, 3, 48, 32) and item["caption"] == "a red circle moving left"
        assert -1.0 <= float(item["video"].min()) and float(item["video"].max()) <= 1.0
        torch.testing.assert_close(src[1]["video"], item["video"])  # deterministic frame sampling
    stream = BatchStream(tuple(src.bucket_of), 1, 0, 1, seed=0)
    for k in range(10):
        batch = stream.batch(k)
        assert len({src.bucket_of[i] for i in batch}) == 1


def test_batch_stream_is_deterministic_and_disjoint_across_ranks():
    from dit.train.data import BatchStream

    buckets = tuple([0] * 10 + [1] * 7)
    a = [BatchStream(buckets, 2, r, 2, seed=3) for r in range(2)]
    again = BatchStream(buckets, 2, 0, 2, seed=3)
    assert a[0].batches_per_epoch == 2 + 1
    for k in range(9):
        b0, b1 = a[0].batch(k), a[1].batch(k)
        assert len(b0) == len(b1) == 2 and not set(b0) & set(b1)
        assert len({buckets[i] for i in b0 + b1}) == 1  # one bucket per global batch
        assert b0 == again.batch(k)
    epoch = [i for k in range(3) for r in range(2) for i in a[r].batch(k)]
    assert len(set(epoch)) == len(epoch) == 12
    with pytest.raises(ValueError, match="train.batch_size: 4 x 2 data-parallel groups is more than any bucket"):
        BatchStream(tuple([0] * 7), 4, 0, 2, seed=0)


# ------------------------------------------------------------------------------------------------ objectives


def test_objectives_use_the_samplers_definitions():
    import samplers
    from dit.train.config import ObjectiveConfig
    from dit.train.objectives import Objective, vp_path

    cfg = ObjectiveConfig()
    path = vp_path(cfg)
    ref = samplers.from_diffusers_config({"_class_name": "CogVideoXDDIMScheduler", "rescale_betas_zero_snr": True,
                                          "snr_shift_scale": 3.0, "timestep_spacing": "trailing",
                                          "prediction_type": "v_prediction"}, 1000)
    # Training and sampling see the same alpha_t at every training step (trailing spacing at 1000 steps = all).
    torch.testing.assert_close(path.alphas.flip(0), ref.schedule.alphas, rtol=0, atol=1e-12)
    assert float(path.alphas[-1]) == 0.0  # zero terminal SNR

    z0 = torch.randn(64, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for kind in ("v_prediction_zero_snr", "flow_matching"):
        obj = Objective(ObjectiveConfig(kind=kind))

        def oracle(x, t):  # returns the exact target: the loss must vanish
            return _oracle_out(obj, x, t, z0)

        loss = obj.loss(oracle, z0, torch.Generator().manual_seed(1))
        assert float(loss) < 1e-8, kind
    # SD3: logit-normal then shifted; the median of sigma is shift(0.5) = 0.75 for shift 3.
    obj = Objective(ObjectiveConfig(kind="flow_matching", shift=3.0))
    ts = []
    for i in range(20):
        obj.loss(lambda x, t: (ts.append(t) or torch.zeros_like(x)), z0[:, :1], torch.Generator().manual_seed(i))
    sig = torch.cat(ts) / 1000
    assert abs(float(sig.median()) - 0.75) < 0.05


def _oracle_out(obj, x, t, z0):
    """The parameterisation's target recovered from x and the true z0."""
    import samplers

    if obj.prediction == "flow":
        s = (t / 1000).double().view(-1, *[1] * (x.ndim - 1))
        eps = (x - (1 - s) * z0) / s
        return (eps - z0).float()
    idx = t.long()
    a = obj.path.alphas[idx].view(-1, *[1] * (x.ndim - 1))
    s = obj.path.sigmas[idx].view(-1, *[1] * (x.ndim - 1))
    eps = (x - a * z0) / s
    return samplers.training_target(z0, eps.float(), a.float(), s.float(), "v_prediction")


# ------------------------------------------------------------------------------------------------ smoke runs


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_every_train_config_smoke_runs_with_a_tiny_model(path, tmp_path, cogvideox_folder, sd3_folder, media,
                                                         wan_folder):
    from dit.train.trainer import Trainer

    overrides = _tiny_overrides(path, tmp_path, cogvideox_folder, sd3_folder, media, wan_folder)
    if path.stem == "tiny-cpu":
        overrides["data.shapes"] = {"length": 8, "antialias": 1}
    cfg = load_config(path, overrides=overrides)
    if cfg.data.cache is not None:
        from dit.train.cache import build_cache

        with pytest.raises(ValueError, match="has no index.json; build it with"):
            Trainer(cfg)
        build_cache(cfg)
        # A cache built for other settings is refused, naming what differs.
        stale = load_config(path, overrides={**overrides, "train.seed": cfg.train.seed + 1})
        with pytest.raises(ValueError, match=f"does not match this config: it differs in seed: cache {cfg.train.seed}, config {cfg.train.seed + 1}; delete"):
            Trainer(stale)
    trainer = Trainer(cfg)
    final = trainer.run()
    out = Path(cfg.output_dir)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # keep_last: 1
    if cfg.model.lora is not None:
        assert (final / "lora" / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert (final / "pipeline" / "model_index.json").is_file()
    if cfg.train.validate_every:
        written = {p.name for p in (out / "validation" / "step-00000002").iterdir()}
        if cfg.objective.kind == "relay":
            assert {"00-input.mp4", "00-relay.mp4", "00-target.mp4", "captions.json"} <= written
        else:
            assert written
    if cfg.train.tensorboard:
        assert any((out / "logs").glob("events.out.tfevents.*"))


def test_cache_fingerprint_ignores_defaults_seeds_unused_and_folder_locations(tmp_path):
    import shutil

    from dit.train.data import CacheSource, _differences, cache_fingerprint

    def cfg(**overrides):
        return load_config(ROOT / "configs/train/tiny-cpu.yaml", overrides={"output_dir": str(tmp_path / "o"),
                                                                            **overrides})

    base = cache_fingerprint(cfg())
    # A default written out, and a training seed the shapes source does not use, change nothing.
    assert cache_fingerprint(cfg(**{"data.shapes": {"seed": 0, "length": 512, "antialias": 2,
                                                    "position_jitter": 1.0}, "train.seed": 7})) == base
    other = cache_fingerprint(cfg(**{"data.shapes": {"seed": 0, "length": 512, "antialias": 2,
                                                     "position_jitter": 0.3}}))
    assert _differences(base, other) == ["data.shapes.position_jitter: cache default, config 0.3"]
    # A trained VAE folder counts by what it holds, not where it is.
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text('{"scaling_factor": 0.9}')
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"0" * 64)
    here = cache_fingerprint(cfg(**{"model.vae_preset": None, "model.vae_pretrained": str(vae)}))
    shutil.copytree(vae, tmp_path / "moved")
    assert cache_fingerprint(cfg(**{"model.vae_preset": None, "model.vae_pretrained": str(tmp_path / "moved")})) == here
    (vae / "config.json").write_text('{"scaling_factor": 0.8}')  # retrained in place: a new scaling factor
    assert cache_fingerprint(cfg(**{"model.vae_preset": None, "model.vae_pretrained": str(vae)})) != here
    # A cache from before fingerprints is refused too.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text(json.dumps({"buckets": [], "files": [], "bucket_of": []}))
    with pytest.raises(ValueError, match="it records no settings"):
        CacheSource(str(tmp_path / "old"), base)


# ------------------------------------------------------------------------------------------------ exports


def test_tiny_run_exports_a_pipeline_both_loaders_read(tmp_path):
    from diffusers import DiffusionPipeline

    from dit.pipeline import DiTPipeline
    from dit.train.trainer import Trainer

    cfg = load_config(ROOT / "configs/train/tiny-cpu.yaml", overrides={
        "output_dir": str(tmp_path / "out"), "train.steps": 3, "train.validate_every": None,
        "train.checkpoint_every": 2, "data.shapes": {"length": 8, "antialias": 1}})
    trainer = Trainer(cfg)
    final = trainer.run()
    folder = final / "pipeline"
    ours = DiTPipeline.from_pretrained(folder)
    theirs = DiffusionPipeline.from_pretrained(folder)
    assert type(theirs).__name__ == "CogVideoXPipeline"
    # The exported transformer holds the EMA weights (decay 0.9), not the last step's.
    shadow = trainer.ema.shadow
    exported = [p for p in ours.transformer.parameters()]
    assert len(exported) == len(shadow)
    for p, s in zip(exported, shadow):
        torch.testing.assert_close(p, s, rtol=0, atol=0)
    kw = dict(prompt="a red circle moving right", num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
              num_frames=9, output_type="np", max_sequence_length=16)
    a = ours(generator=torch.Generator().manual_seed(0), **kw).frames
    b = theirs(generator=torch.Generator().manual_seed(0), **kw).frames
    assert a.shape == (1, 9, 32, 32, 3) and abs(a - b).max() <= 1e-4
    # Checkpoints: every 2 steps and at the end, newest 2 kept, no temporary folders left.
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000003"]


def test_lora_loads_into_diffusers_cogvideox_pipeline_and_changes_its_output(tmp_path, cogvideox_folder, media):
    from diffusers import CogVideoXPipeline
    from safetensors.torch import load_file

    from dit.train.trainer import Trainer

    path = ROOT / "configs/train/cogvideox-2b-lora.yaml"
    overrides = _tiny_overrides(path, tmp_path, cogvideox_folder, cogvideox_folder, media)
    overrides.update({"train.steps": 4, "optim.lr": 2e-2, "optim.lr_schedule": "constant", "train.validate_every": None,
                      "train.mixed_precision": "no", "model.lora.rank": 4, "model.lora.alpha": 4.0})
    final = Trainer(load_config(path, overrides=overrides)).run()
    weights = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.transformer_blocks.") for k in weights)
    assert any(k.endswith("attn1.to_q.lora_A.weight") for k in weights)
    assert any(k.endswith("attn1.to_out.0.lora_B.weight") for k in weights)

    pipe = CogVideoXPipeline.from_pretrained(cogvideox_folder)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle moving right", num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
              num_frames=5, output_type="np", max_sequence_length=16)
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    pipe.load_lora_weights(final / "lora")
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    print(f"\nLoRA: {len(weights)} tensors; max |frame change| after load_lora_weights: {np.abs(after - before).max():.4f}")
    assert np.abs(after - before).max() > 1e-3


def test_checkpoints_are_atomic_and_a_partial_one_is_ignored(tmp_path):
    from dit.train import checkpoint as ckpt

    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000004").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-00000006").mkdir()  # a run killed while writing step 6
    (out / "checkpoints" / "step-junk").mkdir()
    assert ckpt.latest_checkpoint(out).name == "step-00000004"
    ckpt.remove_partial(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-junk"]


def test_ema_is_saved_as_safetensors_and_pickled_checkpoints_are_refused(tmp_path):
    from safetensors import safe_open

    from dit.train import checkpoint as ckpt

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    ema = ckpt.EMA(params, 0.9)
    with torch.no_grad():
        params[0].add_(1.0)
    ema.update()
    ema.save(tmp_path / "ema.safetensors")
    with safe_open(tmp_path / "ema.safetensors", "pt") as f:
        assert f.metadata() == {"decay": "0.9"} and sorted(f.keys()) == ["shadow.0", "shadow.1"]
    other = ckpt.EMA([torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))], 0.9)
    other.load(tmp_path / "ema.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, other.shadow))
    with pytest.raises(ValueError, match="the checkpoint's EMA has decay 0.9, this run's train.ema_decay is 0.99"):
        ckpt.EMA([torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))], 0.99).load(
            tmp_path / "ema.safetensors")
    with pytest.raises(ValueError, match="the checkpoint's EMA has 2 tensors, the model 3"):
        ckpt.EMA([torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4)),
                  torch.nn.Parameter(torch.zeros(1))], 0.9).load(tmp_path / "ema.safetensors")
    with pytest.raises(ValueError, match=r"EMA tensor 1 has shape \(4,\), the model's \(5,\)"):
        ckpt.EMA([torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5))], 0.9).load(
            tmp_path / "ema.safetensors")

    # Refused before accelerate is asked to load anything (no accelerator needed to get the error).
    old = tmp_path / "old"
    old.mkdir()
    (old / "custom_checkpoint_0.pkl").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickles .* not loaded: they could run code"):
        ckpt.load_checkpoint(None, old, lr_scheduler=None, ema=None)
    new = tmp_path / "new"
    new.mkdir()
    (new / "lr_scheduler.json").write_text("{}")
    with pytest.raises(ValueError, match="written without an EMA and this run has train.ema_decay set"):
        ckpt.load_checkpoint(None, new, lr_scheduler=None, ema=ema)
    (new / "ema.safetensors").write_bytes((tmp_path / "ema.safetensors").read_bytes())
    with pytest.raises(ValueError, match="written with an EMA and this run has train.ema_decay null"):
        ckpt.load_checkpoint(None, new, lr_scheduler=None, ema=None)


def test_in_process_resume_with_grad_accumulation_matches_an_uninterrupted_run(tmp_path):
    """Data position (step x accumulation), per-micro-step noise, caption dropout, LR schedule and EMA all resume."""
    from safetensors.torch import load_file

    from dit.train.trainer import Trainer

    def run(out, steps):
        cfg = load_config(ROOT / "configs/train/tiny-cpu.yaml", overrides={
            "output_dir": str(out), "train.steps": steps, "train.validate_every": None, "train.checkpoint_every": 2,
            "optim.grad_accumulation": 2, "optim.warmup_steps": 3, "data.caption_dropout": 0.3,
            "data.shapes": {"length": 12, "antialias": 1}})
        Trainer(cfg).run()
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
        return {json.loads(ln)["step"]: json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()}

    full = run(tmp_path / "full", 4)
    run(tmp_path / "part", 3)  # stops after step 3 (checkpoints 2 and 3); the next start resumes from 3
    part = run(tmp_path / "part", 4)
    assert sorted(part) == [1, 2, 3, 4]
    assert max(abs(full[s] - part[s]) for s in full) <= 1e-6
    name = "final/pipeline/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "part" / name)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ the demo build


def test_demo_build_chains_vae_base_and_relay_stages_into_one_pipeline(tmp_path):
    """configs/demo/*.yaml through dit.demo.build with two steps each: the VAE stage trains the VAE (and
    measures its scaling factor), the next one trains it further, the base transformer trains on its images and
    then on clips from those weights, the relay transformer (its own, patch 4) on the same VAE, and the assembled
    folder generates with --relay in both our pipeline and diffusers'."""
    from diffusers import DiffusionPipeline

    from dit.demo import build
    from dit.pipeline import DiTPipeline

    small = {"train.steps": 2, "train.batch_size": 2, "train.validate_every": 2, "train.checkpoint_every": 2,
             "train.validation_steps": 2, "train.validation_items": 1, "data.shapes.length": 16}
    vae_final = build.run_stage("vae", tmp_path, small)
    cfg = json.loads((vae_final / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "CausalVAE3D" and cfg["scaling_factor"] != 1.0
    assert json.loads(next((tmp_path / "vae" / "validation").glob("*/metrics.json")).read_text())["psnr"]
    ft_final = build.run_stage("vae-ft", tmp_path, small)  # fine-tunes the stage-1 VAE (vae_pretrained)
    assert json.loads((ft_final / "vae" / "config.json").read_text())["latent_channels"] == cfg["latent_channels"]
    image_final = build.run_stage("base-image", tmp_path, small)
    assert json.loads((image_final / "pipeline" / "vae" / "config.json").read_text())["scaling_factor"] == \
        json.loads((ft_final / "vae" / "config.json").read_text())["scaling_factor"]
    assert build.stage_paths("base", tmp_path)["model.pretrained"] == str(image_final / "pipeline")
    base_final = build.run_stage("base", tmp_path, small)  # from the image stage's weights (model.pretrained)
    relay_final = build.run_stage("relay", tmp_path, small)
    patch = [json.loads((f / "pipeline" / "transformer" / "config.json").read_text())["patch_size"]
             for f in (base_final, relay_final)]
    assert patch == [2, 4]
    assert build.run_stage("relay", tmp_path, small) == tmp_path / "relay" / "final"  # done: skipped
    with pytest.raises(ValueError, match="holds 2 steps but configs/demo/relay.yaml asks for 3"):
        build.run_stage("relay", tmp_path, {**small, "train.steps": 3})
    target = build.assemble(tmp_path, tmp_path / "demo")
    assert json.loads((target / "generation_config.json").read_text())["relay_upsample"] == "pixel"
    pipe = DiTPipeline.from_pretrained(target)
    ft_scale = json.loads((ft_final / "vae" / "config.json").read_text())["scaling_factor"]
    assert pipe.vae.config.scaling_factor == ft_scale
    frames = pipe("a red circle", num_inference_steps=2, relay=2, relay_steps=2, relay_upsample="pixel",
                  output_type="np").frames
    assert frames.shape == (1, 9, 128, 128, 3)
    ref = DiffusionPipeline.from_pretrained(target)
    assert type(ref).__name__ == "CogVideoXPipeline" and ref.vae.config.scaling_factor == ft_scale


def test_autoencoder_run_with_gradient_checkpointing_trains_the_same_weights(tmp_path, monkeypatch):
    """train.gradient_checkpointing on an autoencoder run checkpoints the VAE's blocks: same weights after the
    steps as without it (the recomputation sees the causal convolutions' caches as the forward did)."""
    from safetensors.torch import load_file

    from dit.demo import build
    from vae3d import causal_conv

    runs = []
    pure_call = causal_conv._PureCall.__call__
    monkeypatch.setattr(causal_conv._PureCall, "__call__", lambda self, *a: runs.append(1) or pure_call(self, *a))

    small = {"train.steps": 2, "train.batch_size": 1, "train.validate_every": 2, "train.checkpoint_every": 2,
             "train.validation_items": 1, "data.shapes.length": 8, "data.buckets": [[32, 32, 9]]}
    plain = build.run_stage("vae", tmp_path / "plain", small)
    assert not runs
    ckpt = build.run_stage("vae", tmp_path / "ckpt", {**small, "train.gradient_checkpointing": True})
    assert runs  # the blocks ran through the checkpointing function
    name = "vae/diffusion_pytorch_model.safetensors"
    a, b = load_file(plain / name), load_file(ckpt / name)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_autoencoder_loss_is_l1_plus_l2_plus_kl_per_element():
    from dit.train.objectives import autoencoder_loss

    video = torch.zeros(1, 3, 1, 2, 2)
    recon = torch.full_like(video, 0.5)
    mean, logvar = torch.ones(1, 4, 1, 1, 1), torch.zeros(1, 4, 1, 1, 1)  # KL per element = 0.5 * 1

    def step(x, generator=None):
        return recon, mean, logvar

    loss = autoencoder_loss(step, video, torch.Generator(), kl_weight=0.1, l2_weight=2.0)
    assert float(loss) == pytest.approx(0.5 + 2.0 * 0.25 + 0.1 * 0.5)
