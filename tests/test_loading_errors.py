"""Model folders that are corrupt, mismatched or hostile: a ValueError naming the file, never a traceback, and no
code of the folder ever runs (model_index.json names only the libraries and classes we load)."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vae3d
from dit.convert import load_transformer
from dit.pipeline import COMPONENT_CLASSES, CogVideoXDiTPipeline, DiTPipeline
from dit.pipeline.loading import _check_index
from tiny import tiny_cogvideox_pipeline, tiny_cogview3plus_pipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny diffusers CogVideoXPipeline folder (sin-cos positions, DDIM); tests change copies of it."""
    folder = tmp_path_factory.mktemp("cogvideox")
    tiny_cogvideox_pipeline(folder)
    return folder


@pytest.fixture
def pipe_dir(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "pipe"))


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------- A: no folder code


PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('payload ran')\nclass Evil: pass\n"


@pytest.mark.parametrize("entry,spec", [
    ("text_encoder", ["payload", "T5EncoderModel"]),
    ("vae", ["payload", "AutoencoderKL"]),
    ("transformer", ["payload", "CogVideoXTransformer3DModel"]),
    ("safety_checker", ["payload", "Evil"]),  # a role we do not have
    ("scheduler", ["diffusers", "DiffusionPipeline"]),  # getattr(diffusers, name) goes through the list too
    ("tokenizer", ["transformers", "AutoModel"]),
])
def test_model_index_never_imports_the_folders_code(pipe_dir, tmp_path, monkeypatch, entry, spec):
    marker = tmp_path / "marker"
    for where in (pipe_dir, tmp_path):  # the model folder and the cwd, both on sys.path
        (where / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(pipe_dir))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "payload", raising=False)
    _edit_json(pipe_dir / "model_index.json", **{entry: spec})
    loaded = []
    monkeypatch.setattr("dit.pipeline.loading.load_transformer", lambda *a, **k: loaded.append(a))
    accepted = "accepted for" if entry in COMPONENT_CLASSES else "accepted entries: transformer"
    for load in (DiTPipeline.from_pretrained, lambda f: CogVideoXDiTPipeline.check_folder_request(f, None, None, None)):
        with pytest.raises(ValueError, match=rf"pipe.*entry '{entry}' names class '{spec[1]}' of library "
                                             rf"'{spec[0]}'.*{accepted}"):
            load(pipe_dir)
    assert not marker.exists() and "payload" not in sys.modules
    assert not loaded  # checked before anything was loaded


def test_folders_we_and_diffusers_write_pass_the_allow_list(saved, tmp_path):
    from dit.requests import DEMO_MODEL

    ours = tmp_path / "ours"
    DiTPipeline.from_pretrained(saved).save_pretrained(ours)  # names dit.models.cogvideox, vae3d.model
    for folder in (saved, ours, DEMO_MODEL):
        entries = _check_index(folder, json.loads((folder / "model_index.json").read_text()))
        assert entries["transformer"][1] == "CogVideoXTransformer3DModel"


# ------------------------------------------------------------------------------------------ B: transformer folder


def test_transformer_config_errors_name_the_file(pipe_dir):
    folder = pipe_dir / "transformer"
    config = folder / "config.json"
    original = config.read_text()
    _edit_json(config, num_layers="two")
    with pytest.raises(ValueError, match=r"transformer/config.json'.*num_layers='two' must be an integer"):
        load_transformer(folder)
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"transformer/config.json' holds a JSON array; expected a JSON object"):
        load_transformer(folder)
    config.write_text(original[:-5])
    with pytest.raises(ValueError, match=r"transformer/config.json' is not valid JSON \(.* at line \d+"):
        load_transformer(folder)
    config.write_text(original)
    _edit_json(config, text_embed_dim=24)  # the checkpoint's text projection is 16 wide
    with pytest.raises(ValueError, match=rf"{WEIGHTS}'.*do not match config.json.*patch_embed.text_proj.weight is "
                                         r"\(16, 16\) in .*, the config builds \(16, 24\)"):
        load_transformer(folder)


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_unreadable_safetensors_name_the_file(pipe_dir, damage):
    for sub, load in (("transformer", load_transformer), ("vae", vae3d.load_vae)):
        file = pipe_dir / sub / WEIGHTS
        data = file.read_bytes()
        file.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(512), "empty": b""}[damage])
        with pytest.raises(ValueError, match=rf"{sub}/{WEIGHTS}' is not a readable safetensors file"):
            load(pipe_dir / sub)
    with pytest.raises(ValueError, match=rf"{WEIGHTS}' is not a readable safetensors file"):
        DiTPipeline.from_pretrained(pipe_dir)


def _shard(folder: Path) -> list[str]:
    """Split the folder's weights into two shards and an index, as save_pretrained does for large models."""
    state = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    keys = sorted(state)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    halves = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names


def test_sharded_folder_loads_and_shard_errors_name_the_index(pipe_dir, tmp_path):
    folder = pipe_dir / "transformer"
    names = _shard(folder)
    assert sum(p.numel() for p in load_transformer(folder).parameters()) > 0  # a good sharded folder loads
    index = json.loads((folder / INDEX).read_text())
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / names[1], outside)
    (folder / "link.safetensors").symlink_to(outside)
    for bad, message in ((str(outside), "outside"), ("../outside.safetensors", "outside"),
                         ("link.safetensors", "outside"), ("gone.safetensors", "which is missing")):
        weight_map = {k: bad if v == names[1] else v for k, v in index["weight_map"].items()}
        (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(ValueError, match=rf"{INDEX}' names shard '{bad}'.*{message}"):
            load_transformer(folder)
    (folder / INDEX).write_text(json.dumps({"weight_map": ["not", "a", "map"]}))
    with pytest.raises(ValueError, match=rf"{INDEX}': weight_map=.* must be a JSON object"):
        load_transformer(folder)


def test_hugging_face_cache_snapshot_shards_load(pipe_dir, tmp_path):
    """A hub cache snapshot links each file to ../../blobs/<hash>: the repo's own files, so they are accepted."""
    folder = pipe_dir / "transformer"
    names = _shard(folder)
    repo = tmp_path / "hub" / "models--org--model"
    snapshot = repo / "snapshots" / "abc123" / "transformer"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate([*names, INDEX, "config.json"]):
        shutil.copy(folder / name, repo / "blobs" / f"hash{i}")
        (snapshot / name).symlink_to(Path("../../../blobs") / f"hash{i}")
    assert sum(p.numel() for p in load_transformer(snapshot).parameters()) > 0


def test_pickles_are_never_loaded(pipe_dir):
    folder = pipe_dir / "transformer"
    state = load_file(folder / WEIGHTS)
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    (folder / WEIGHTS).unlink()
    with pytest.raises(ValueError, match="transformer' has no .*pickles .* are never loaded"):
        load_transformer(folder)
    save_file(state, folder / WEIGHTS)
    encoder = pipe_dir / "text_encoder"
    torch.save(load_file(encoder / "model.safetensors"), encoder / "pytorch_model.bin")  # what transformers 4 wrote
    (encoder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="text_encoder' has no model.safetensors .*pickles .* are never loaded"):
        DiTPipeline.from_pretrained(pipe_dir)


# -------------------------------------------------------------------------------- B: VAE and library components


def test_vae_config_errors_name_the_file(pipe_dir):
    config = pipe_dir / "vae" / "config.json"
    _edit_json(config, block_out_channels=["8", "8", "8", "8"])
    with pytest.raises(ValueError, match=r"vae/config.json'.*block_out_channels=\['8'.* must be a list of integers"):
        vae3d.load_vae(pipe_dir / "vae")
    _edit_json(config, block_out_channels=[8, 8, 8, 16])
    with pytest.raises(ValueError, match=rf"vae/{WEIGHTS}'.*tensor\(s\) do not match config.json"):
        vae3d.load_vae(pipe_dir / "vae")
    config.write_text("{")
    with pytest.raises(ValueError, match=r"vae/config.json' is not valid JSON"):
        vae3d.load_vae(pipe_dir / "vae")


@pytest.mark.parametrize("sub,file,content,match", [
    (".", "model_index.json", "[]", r"model_index.json' holds a JSON array"),
    ("scheduler", "scheduler_config.json", "{oops", r"scheduler/scheduler_config.json' is not valid JSON"),
    ("text_encoder", "model.safetensors", "not safetensors",
     r"text_encoder': cannot load a T5EncoderModel text encoder \(SafetensorError"),
    ("text_encoder", "config.json", '{"model_type": "t5", "d_model": "wide"}', r"text_encoder': cannot load"),
    ("tokenizer", "tokenizer.json", "{not json", r"tokenizer': cannot load a TokenizersBackend tokenizer"),
])
def test_pipeline_component_errors_name_the_folder(pipe_dir, sub, file, content, match):
    (pipe_dir / sub / file).write_text(content)
    with pytest.raises(ValueError, match=match):
        DiTPipeline.from_pretrained(pipe_dir)


def test_image_vae_is_safetensors_only(tmp_path):
    tiny_cogview3plus_pipeline(tmp_path)
    vae = tmp_path / "vae"
    torch.save(load_file(vae / WEIGHTS), vae / "diffusion_pytorch_model.bin")
    (vae / WEIGHTS).unlink()
    with pytest.raises(ValueError, match="vae' has no .*pickles .* are never loaded"):
        DiTPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("sub,content,match", [
    ("transformer", "{", r"transformer/config.json' is not valid JSON"),
    ("transformer", {"sample_height": "60"}, r"transformer/config.json': sample_height='60' must be an integer"),
    ("transformer", {"drop": "sample_frames"}, r"transformer/config.json' has no 'sample_frames' entry"),
    ("vae", {"block_out_channels": 4}, r"vae/config.json': block_out_channels=4 must be a list of integers"),
    ("vae", [], r"vae/config.json' holds a JSON array"),
])
def test_check_folder_request_names_the_config(pipe_dir, sub, content, match):
    config = pipe_dir / sub / "config.json"
    if isinstance(content, dict) and "drop" in content:
        data = json.loads(config.read_text())
        del data[content["drop"]]
        config.write_text(json.dumps(data))
    elif isinstance(content, dict):
        _edit_json(config, **content)
    else:
        config.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=match):
        CogVideoXDiTPipeline.check_folder_request(pipe_dir, None, None, None)


def test_check_folder_request_zero_is_not_the_default(saved):
    assert CogVideoXDiTPipeline.check_folder_request(saved, None, None, None) == (64, 64, 9)
    for sizes, name in (((0, None, None), "height"), ((None, 0, None), "width"), ((None, None, 0), "num_frames")):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
            CogVideoXDiTPipeline.check_folder_request(saved, *sizes)
