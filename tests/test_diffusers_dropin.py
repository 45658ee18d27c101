"""Our pipelines and models driven with diffusers' own idioms give diffusers' results: `from_pretrained` with
`variant`, a per-component `torch_dtype` dict, `low_cpu_mem_usage`, a repository id from the Hugging Face cache,
components passed as keyword arguments (`vae=None, transformer=None` to encode prompts alone),
`Pipeline(**pipe.components)`; and where a feature is absent by design (attention processors), an error that says
so and names what to use instead."""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import dit
from dit.layers import Attention, NoAttentionProcessorsError
from dit.pipeline import DiTPipeline
from tests.tiny import tiny_cogview3plus_pipeline, tiny_cogvideox_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline

VIDEO = dict(prompt="a red circle moving left", negative_prompt="blue", num_frames=9, height=32, width=32,
             num_inference_steps=2, max_sequence_length=16, output_type="np")
IMAGE = dict(prompt="a red cat", negative_prompt="blue", height=32, width=32, num_inference_steps=2, output_type="np")
# family: (folder builder, diffusers pipeline class, call, encode_prompt arguments as diffusers' docs pass them,
#          arguments diffusers needs for the folder's absent components)
FAMILIES = {
    "cogvideox": (tiny_cogvideox_pipeline, "CogVideoXPipeline", dict(VIDEO, guidance_scale=6.0),
                  dict(prompt="a red circle", negative_prompt="blue", do_classifier_free_guidance=True,
                       max_sequence_length=16), {}),
    "sd3": (tiny_sd3_pipeline, "StableDiffusion3Pipeline", dict(IMAGE, guidance_scale=5.0),
            dict(prompt="a red cat", prompt_2=None, prompt_3=None, negative_prompt="blue",
                 do_classifier_free_guidance=True), dict(text_encoder_3=None, tokenizer_3=None)),
    "wan": (tiny_wan_pipeline, "WanPipeline", dict(VIDEO, guidance_scale=4.0),
            dict(prompt="a red circle", negative_prompt="blue", do_classifier_free_guidance=True,
                 max_sequence_length=16), {}),
    "cogview3plus": (tiny_cogview3plus_pipeline, "CogView3PlusPipeline", dict(IMAGE, guidance_scale=5.0),
                     dict(prompt="a red cat", negative_prompt="blue", do_classifier_free_guidance=True,
                          max_sequence_length=16), {}),
}


def _diffusers(name: str):
    import diffusers

    return getattr(diffusers, name)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, (build, *_) in FAMILIES.items():
        out[name] = tmp_path_factory.mktemp(name)
        build(out[name])
    return out


def _output(pipe, call: dict) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**call, generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images if getattr(out, "images", None) is not None else out.frames)


def _same_tensors(a, b, atol: float = 0.0) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=atol, rtol=0)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same state dict, key by key (our modules keep diffusers' parameter names)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    _same_tensors([sa[k] for k in sorted(sa)], [sb[k] for k in sorted(sa)])


# -- from_pretrained: variant, torch_dtype dict, low_cpu_mem_usage ----------------------------------------------------


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory) -> Path:
    """A CogVideoX folder with plain fp32 weights and an "fp16" variant of every model, sharded (index + shards)."""
    folder = tmp_path_factory.mktemp("variant")
    ref = tiny_cogvideox_pipeline(folder)
    ref.to(torch.float16).save_pretrained(folder, variant="fp16", max_shard_size="10KB")
    return folder


def test_sharded_variant_and_dtype_dict_load_what_diffusers_loads(fp16_folder):
    files = sorted(p.name for p in (fp16_folder / "transformer").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in files and len(files) > 4  # sharded
    dtype = {"transformer": torch.bfloat16, "default": torch.float16}
    ours = DiTPipeline.from_pretrained(fp16_folder, variant="fp16", dtype=dtype)  # diffusers 0.42's name
    ref = _diffusers("CogVideoXPipeline").from_pretrained(fp16_folder, variant="fp16", dtype=dtype)
    for name in ("transformer", "vae", "text_encoder"):
        mine, theirs = getattr(ours, name), getattr(ref, name)
        assert mine.dtype == theirs.dtype == dtype.get(name, torch.float16), name
        _same_weights(mine, theirs)
    # Without a dtype, diffusers' models come in float32 (the fp16 weights upcast) and transformers' text encoder
    # in its checkpoint's fp16, as diffusers loads them.
    ours = DiTPipeline.from_pretrained(fp16_folder, variant="fp16")
    ref = _diffusers("CogVideoXPipeline").from_pretrained(fp16_folder, variant="fp16")
    assert [ours.transformer.dtype, ours.vae.dtype, ours.text_encoder.dtype] == [
        ref.transformer.dtype, ref.vae.dtype, ref.text_encoder.dtype] == [torch.float32, torch.float32, torch.float16]
    ours = DiTPipeline.from_pretrained(fp16_folder, variant="fp16", torch_dtype=torch.float32)  # the older name
    ref = _diffusers("CogVideoXPipeline").from_pretrained(fp16_folder, variant="fp16", dtype=torch.float32)
    np.testing.assert_allclose(_output(ours, FAMILIES["cogvideox"][2]), _output(ref, FAMILIES["cogvideox"][2]),
                               atol=1e-4, rtol=0)


def test_variant_falls_back_per_component_and_is_refused_when_absent(tmp_path, fp16_folder):
    folder = tmp_path / "mixed"
    shutil.copytree(fp16_folder, folder)
    for file in (folder / "text_encoder").glob("*fp16*"):
        file.unlink()  # the text encoder has no fp16 variant: its plain (fp32) weights load, as in diffusers
    ours = DiTPipeline.from_pretrained(folder, variant="fp16", torch_dtype={"default": torch.float32})
    assert ours.text_encoder.dtype == torch.float32
    ref = _diffusers("CogVideoXPipeline").from_pretrained(folder, variant="fp16", dtype={"default": torch.float32})
    _same_weights(ours.transformer, ref.transformer)
    with pytest.raises(ValueError, match=r"no component has weights of variant 'bf16'.*variants found: 'fp16'"):
        DiTPipeline.from_pretrained(folder, variant="bf16")
    with pytest.raises(ValueError, match="no such modeling files"):  # diffusers refuses it too
        _diffusers("CogVideoXPipeline").from_pretrained(folder, variant="bf16")


def test_low_cpu_mem_usage_is_accepted_and_changes_nothing(folders):
    a = DiTPipeline.from_pretrained(folders["cogvideox"], low_cpu_mem_usage=True)
    b = DiTPipeline.from_pretrained(folders["cogvideox"], low_cpu_mem_usage=False)
    _same_weights(a.transformer, b.transformer)
    with pytest.raises(ValueError, match="low_cpu_mem_usage='yes' must be True or False"):
        DiTPipeline.from_pretrained(folders["cogvideox"], low_cpu_mem_usage="yes")
    with pytest.raises(ValueError, match="use_safetensors=False: only safetensors"):
        DiTPipeline.from_pretrained(folders["cogvideox"], use_safetensors=False)
    with pytest.raises(ValueError, match=r"torch_dtype: keys \['unet'\] name no component"):
        DiTPipeline.from_pretrained(folders["cogvideox"], torch_dtype={"unet": torch.float16})
    with pytest.raises(ValueError, match="pass dtype or torch_dtype"):
        DiTPipeline.from_pretrained(folders["cogvideox"], dtype=torch.float16, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"unsupported from_pretrained arguments: \['device_map'\]"):
        DiTPipeline.from_pretrained(folders["cogvideox"], device_map="balanced")


# -- a repository id through the Hugging Face cache --------------------------------------------------------------------


def fake_hub_cache(cache: Path, repo: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The Hugging Face cache layout huggingface_hub writes: models--owner--name/{refs/main, blobs/<sha256>,
    snapshots/<commit>/<file> -> ../../blobs/<sha256> (relative symlinks)}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """HF_HUB_CACHE pointing at an empty cache in tmp_path (huggingface_hub reads the variable at import, into
    `constants.HF_HUB_CACHE`: both are set), and no network."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_repository_id_loads_from_the_hugging_face_cache(hub_cache, fp16_folder):
    fake_hub_cache(hub_cache, "someone/tiny-cogvideox", fp16_folder)
    call = FAMILIES["cogvideox"][2]
    ours = DiTPipeline.from_pretrained("someone/tiny-cogvideox", variant="fp16", dtype=torch.float32)
    ref = _diffusers("CogVideoXPipeline").from_pretrained("someone/tiny-cogvideox", variant="fp16", dtype=torch.float32)
    np.testing.assert_allclose(_output(ours, call), _output(ref, call), atol=1e-4, rtol=0)


def test_repository_missing_from_the_cache_names_the_download(hub_cache, tmp_path):
    with pytest.raises(ValueError, match=r"'someone/absent' is neither a local folder nor a repository in the "
                                         r"Hugging Face cache .*`hf download someone/absent`"):
        DiTPipeline.from_pretrained("someone/absent")
    other = tmp_path / "elsewhere"
    with pytest.raises(ValueError, match=rf"`hf download someone/absent --revision v2 --cache-dir {other}`"):
        DiTPipeline.from_pretrained("someone/absent", revision="v2", cache_dir=other)
    with pytest.raises(ValueError, match="does not exist"):  # a path, not a repository id
        DiTPipeline.from_pretrained(tmp_path / "no" / "such" / "folder")


# -- components: passed as keyword arguments, and back into the constructor --------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_encode_prompt_without_vae_and_transformer(folders, family):
    _, cls, _, prompt_args, absent = FAMILIES[family]
    # SD3 without its T5 (the tiny folder has none) reads the transformer's width for the zero T5 embeddings,
    # in diffusers too: there only the VAE is left out.
    drop = dict(vae=None) if family == "sd3" else dict(vae=None, transformer=None)
    ours = DiTPipeline.from_pretrained(folders[family], **drop)
    ref = _diffusers(cls).from_pretrained(folders[family], **drop, **absent)
    assert all(getattr(ours, name) is None for name in drop)
    with torch.no_grad():
        _same_tensors(ours.encode_prompt(**prompt_args), ref.encode_prompt(**prompt_args))


def test_a_passed_component_replaces_the_folders(folders):
    transformer = dit.load_transformer(folders["cogvideox"] / "transformer")
    scheduler = _diffusers("CogVideoXDPMScheduler").from_pretrained(folders["cogvideox"] / "scheduler")
    pipe = DiTPipeline.from_pretrained(folders["cogvideox"], transformer=transformer, scheduler=scheduler)
    assert pipe.transformer is transformer and pipe.scheduler is scheduler


@pytest.mark.parametrize("family", list(FAMILIES))
def test_components_rebuild_the_same_pipeline(folders, family):
    _, cls, call, _, _ = FAMILIES[family]
    ours = DiTPipeline.from_pretrained(folders[family])
    expected = _output(ours, call)
    again = type(ours)(**ours.components)
    np.testing.assert_array_equal(_output(again, call), expected)
    # Our components are drop-in for diffusers' own pipeline class too.
    theirs = _diffusers(cls)
    params = set(inspect.signature(theirs.__init__).parameters)
    ref = theirs(**{k: v for k, v in ours.components.items() if k in params})
    np.testing.assert_allclose(_output(ref, call), expected, atol=1e-4, rtol=0)


# -- attention processors: none by design ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["cogvideox", "sd3", "wan", "cogview3plus"])
def test_attention_processor_api_says_there_is_one_attention_function(folders, family):
    ours = dit.load_transformer(folders[family] / "transformer")
    ref_cls = getattr(_diffusers(ours.__class__.__name__), "attn_processors", None)
    assert ref_cls is not None  # diffusers' class has the processor API
    assert not hasattr(ours, "attn_processors")  # probes see a model without processors
    for use in (lambda: ours.attn_processors, lambda: ours.set_attn_processor({})):
        with pytest.raises(NoAttentionProcessorsError, match=r"no attention processors.*set_attention_backend"):
            use()
    ours.set_attention_backend("math")  # the switch that does exist
    assert {m.attn_backend for m in ours.modules() if isinstance(m, Attention)} == {"math"}
    ours.disable_xformers_memory_efficient_attention()  # diffusers' xformers switch drives the same backend
    assert {m.attn_backend for m in ours.modules() if isinstance(m, Attention)} == {None}
    with pytest.raises(ValueError, match="attention_op is not supported"):
        ours.enable_xformers_memory_efficient_attention(attention_op=lambda *a: None)
    with pytest.raises(ValueError, match="no NPU flash-attention backend"):
        ours.enable_npu_flash_attention()
