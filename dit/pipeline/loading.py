"""Reading a diffusers pipeline folder: model_index.json checked against an allow-list before anything is
imported, the family's pipeline class, and each component loaded by its role (safetensors only)."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dit.convert import (LEGACY_CLASSES, TRANSFORMER_CLASSES, library_load, load_transformer, read_folder_json, resolve,
                         safetensors_files)
from dit.text import ENCODER_CLASSES, ENCODER_WEIGHTS, TOKENIZER_CLASSES, load_encoder_folder, load_tokenizer_folder
from samplers.from_diffusers import SCHEDULER_CLASSES


if TYPE_CHECKING:
    from dit.pipeline.base import DiTPipeline

logger = logging.getLogger(__name__)

PIPELINE_FAMILIES: dict[str, str] = {
    "CogVideoXPipeline": "dit.pipeline.cogvideox:CogVideoXDiTPipeline",
    "StableDiffusion3Pipeline": "dit.pipeline.image:SD3DiTPipeline",
    "CogView3PlusPipeline": "dit.pipeline.image:CogView3PlusDiTPipeline",
    "WanPipeline": "dit.pipeline.wan:WanDiTPipeline",
    "WanImageToVideoPipeline": "dit.pipeline.wan_i2v:WanImageToVideoDiTPipeline",
}

def _read_index(path: str | os.PathLike) -> dict:
    return read_folder_json(path, "model_index.json", what="a diffusers pipeline folder",
                            optional={"_class_name": str})


# What each model_index.json entry may name, as (library, class). Nothing outside this list is imported or
# loaded: a library name is a module path, so importing it would run any `<library>.py` found on sys.path (the
# model folder itself when `python -m dit` runs from its parent). Our saved folders name our modules for the
# transformer and video VAE (diffusers' own loader imports those); diffusers' folders name diffusers classes.
_TRANSFORMER_ENTRIES = frozenset({("diffusers", name) for name in (*TRANSFORMER_CLASSES, *LEGACY_CLASSES)}
                                 | {tuple(q.split(":")) for q in TRANSFORMER_CLASSES.values()})
_ENCODER_ENTRIES = frozenset(("transformers", name) for name in ENCODER_CLASSES)
_TOKENIZER_ENTRIES = frozenset(("transformers", name) for name in TOKENIZER_CLASSES)
COMPONENT_CLASSES: dict[str, frozenset[tuple[str, str]]] = {
    "transformer": _TRANSFORMER_ENTRIES,
    "transformer_2": _TRANSFORMER_ENTRIES,  # Wan 2.2 A14B's low-noise expert
    "relay_transformer": _TRANSFORMER_ENTRIES,
    "vae": frozenset({("diffusers", "AutoencoderKLCogVideoX"), ("vae3d.model", "CausalVAE3D"),
                      ("vae3d", "CausalVAE3D"), ("diffusers", "AutoencoderKL"),
                      ("diffusers", "AutoencoderKLWan")}),
    **{f"text_encoder{s}": _ENCODER_ENTRIES for s in ("", "_2", "_3")},
    **{f"tokenizer{s}": _TOKENIZER_ENTRIES for s in ("", "_2", "_3")},
    "scheduler": frozenset(("diffusers", name) for name in SCHEDULER_CLASSES),
    # Wan 2.1 I2V's CLIP vision model and its preprocessing (transformers 5's CLIPImageProcessor is the torchvision
    # backend, and falls back to CLIPImageProcessorPil where torchvision is not installed)
    "image_encoder": frozenset(("transformers", name) for name in ("CLIPVisionModel", "CLIPVisionModelWithProjection")),
    "image_processor": frozenset(("transformers", name) for name in ("CLIPImageProcessor", "CLIPImageProcessorPil")),
}
_VIDEO_VAES = ("AutoencoderKLCogVideoX", "CausalVAE3D")


def _check_index(folder: Path, index: dict) -> dict[str, tuple[str | None, str | None]]:
    """Every component entry of model_index.json checked against COMPONENT_CLASSES before anything is imported
    or loaded; returns them as {role: (library, class)} ([null, null] entries: absent optional components)."""
    file = folder / "model_index.json"
    entries = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list):  # metadata and plain settings: nothing to load
            continue
        if len(spec) != 2 or not all(v is None or isinstance(v, str) for v in spec) or (spec[0] is None) != (
                spec[1] is None):
            raise ValueError(f"{str(file)!r}: entry {name!r} is {spec!r}; expected [library, class] or [null, null]")
        library, class_name = spec
        accepted = COMPONENT_CLASSES.get(name)
        if library is not None and (accepted is None or (library, class_name) not in accepted):
            what = (f"accepted for {name!r}: {', '.join(sorted(f'{lib}.{cls}' for lib, cls in accepted))}"
                    if accepted is not None else f"accepted entries: {', '.join(COMPONENT_CLASSES)}")
            raise ValueError(f"{str(folder)!r}: model_index.json entry {name!r} names class {class_name!r} of "
                             f"library {library!r}, which is not loaded (loading it could run code); {what}")
        entries[name] = (library, class_name)
    return entries


def _settings(index: dict, target: type) -> dict[str, Any]:
    """Plain (non-component) entries of model_index.json that the pipeline's constructor takes, such as Wan 2.2's
    boundary_ratio and expand_timesteps; other plain entries are diffusers' own bookkeeping."""
    params = inspect.signature(target.__init__).parameters
    return {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list) and k in params}


def _check_roles(folder: Path, target: type, entries: dict) -> None:
    """The pipeline's required components are all named in model_index.json (checked before any load)."""
    params = inspect.signature(target.__init__).parameters
    required = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [n for n in required if n not in entries]
    if missing:
        raise ValueError(f"{str(folder / 'model_index.json')!r} has no entry for {missing} that {target.__name__} "
                         f"needs; it names {sorted(entries)}")


def _load_component(folder: Path, name: str, library: str | None, class_name: str | None,
                    torch_dtype: torch.dtype | None) -> Any:
    """One component of a pipeline folder, by its role (entries checked by _check_index first); our own modules
    for the transformer and video VAE, safetensors only everywhere."""
    if library is None:
        return None
    sub = folder / name
    if name in ("transformer", "transformer_2", "relay_transformer"):
        return load_transformer(sub, torch_dtype=torch_dtype)
    if name == "vae" and class_name in _VIDEO_VAES:
        from vae3d import load_vae

        return load_vae(sub, torch_dtype=torch_dtype)
    if name == "scheduler":
        import diffusers

        config = read_folder_json(sub, "scheduler_config.json", what=f"a {class_name} scheduler config")
        scheduler_cls = getattr(diffusers, class_name)
        return library_load(sub, f"a {class_name} scheduler", lambda: scheduler_cls.from_config(config))
    if name.startswith("tokenizer"):
        import transformers

        return load_tokenizer_folder(sub, getattr(transformers, class_name))
    if name.startswith("text_encoder"):
        return load_encoder_folder(sub, ENCODER_CLASSES[class_name], torch_dtype)
    if name in ("image_encoder", "image_processor"):  # transformers' CLIP vision model (safetensors) / its config
        import transformers

        cls = getattr(transformers, class_name)
        if name == "image_processor":
            return library_load(sub, f"a {class_name}", lambda: cls.from_pretrained(sub, local_files_only=True))
        safetensors_files(sub, *ENCODER_WEIGHTS)
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        return library_load(sub, f"a {class_name} image encoder", lambda: cls.from_pretrained(
            sub, local_files_only=True, use_safetensors=True, **kwargs))
    import diffusers  # the image VAE (AutoencoderKL): diffusers' own, from safetensors only

    safetensors_files(sub)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return library_load(sub, f"a {class_name}", lambda: getattr(diffusers, class_name).from_pretrained(
        sub, local_files_only=True, use_safetensors=True, **kwargs))


def _family(folder: Path, index: dict) -> type:
    """The pipeline class PIPELINE_FAMILIES names for model_index.json's `_class_name`."""
    family = index.get("_class_name")
    if family not in PIPELINE_FAMILIES:
        raise ValueError(f"{str(folder)!r}: unsupported pipeline {family!r}; accepted: {', '.join(PIPELINE_FAMILIES)}")
    return resolve(PIPELINE_FAMILIES[family])


def pipeline_class(folder: str | os.PathLike) -> type["DiTPipeline"]:
    """The pipeline class for a folder, from model_index.json alone: every entry is checked against the allow-list
    first, nothing is imported from the folder and no weights are read."""
    folder = Path(folder)
    index = _read_index(folder)
    _check_index(folder, index)
    return _family(folder, index)


def video_pipeline_class(folder: str | os.PathLike) -> type["DiTPipeline"]:
    """pipeline_class for `dit generate`: a video family (one with the `check_folder_request` hook), else a
    one-line error naming what the folder holds and the families accepted."""
    target = pipeline_class(folder)
    if not hasattr(target, "check_folder_request"):
        video = [name for name, q in PIPELINE_FAMILIES.items() if hasattr(resolve(q), "check_folder_request")]
        raise ValueError(f"{str(folder)!r} holds a {target.diffusers_class_name}; `dit generate` takes video "
                         f"pipeline folders ({', '.join(video)})")
    return target


def _require_family(folder: Path, target: type) -> None:
    """The folder holds `target`'s family (a family's check_folder_request called on another family's folder)."""
    found = video_pipeline_class(folder)
    if found is not target:
        raise ValueError(f"{str(folder)!r} holds a {found.diffusers_class_name}; {target.__name__} takes "
                         f"{target.diffusers_class_name} folders")

