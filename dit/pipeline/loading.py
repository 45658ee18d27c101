"""Reading a diffusers pipeline folder: model_index.json checked against an allow-list before anything is
imported, the family's pipeline class, and each component loaded by its role (safetensors only)."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dit.convert import (LEGACY_CLASSES, TRANSFORMER_CLASSES, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, library_load,
                         load_transformer, read_folder_json, resolve, safetensors_files)
from dit.text import ENCODER_CLASSES, ENCODER_WEIGHTS, TOKENIZER_CLASSES, load_encoder_folder, load_tokenizer_folder
from samplers.from_diffusers import SCHEDULER_CLASSES
from vae3d.folders import variant_name


if TYPE_CHECKING:
    from dit.pipeline.base import DiTPipeline

logger = logging.getLogger(__name__)

PIPELINE_FAMILIES: dict[str, str] = {
    "CogVideoXPipeline": "dit.pipeline.cogvideox:CogVideoXDiTPipeline",
    "StableDiffusion3Pipeline": "dit.pipeline.image:SD3DiTPipeline",
    "CogView3PlusPipeline": "dit.pipeline.image:CogView3PlusDiTPipeline",
    "WanPipeline": "dit.pipeline.wan:WanDiTPipeline",
    "WanImageToVideoPipeline": "dit.pipeline.wan_i2v:WanImageToVideoDiTPipeline",
    "DiTPipeline": "dit.pipeline.class_conditional:ClassConditionalDiTPipeline",  # diffusers' class-conditional DiT
}

TRANSFORMER_ROLES = ("transformer", "transformer_2", "relay_transformer")
# Components that diffusers loads with its ModelMixin (we load our own modules for the transformers and the video
# VAE): loaded in float32 unless torch_dtype says otherwise, as diffusers' from_pretrained does. transformers'
# models (text and image encoders) keep their checkpoint's dtype, as transformers 5 loads them.
DIFFUSERS_MODEL_ROLES = (*TRANSFORMER_ROLES, "vae")


def resolve_pretrained(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                       revision: str | None = None) -> Path:
    """A local folder, or a Hugging Face repository id ("owner/name") resolved in the local Hugging Face cache
    (HF_HUB_CACHE, or `cache_dir`) as diffusers resolves it; nothing is ever downloaded. A repository that is not
    in the cache is a ValueError naming it and the command that downloads it."""
    path = Path(name_or_path)
    if path.is_dir() or not _is_repo_id(str(name_or_path)):
        return path  # a folder, or a path that is not one: read_folder_json names it
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = str(name_or_path)
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
        rev = f" at revision {revision!r}" if revision is not None else ""
        option = f" --revision {revision}" if revision is not None else ""
        option += f" --cache-dir {cache_dir}" if cache_dir is not None else ""
        raise ValueError(
            f"{repo!r} is neither a local folder nor a repository in the Hugging Face cache {str(cache)!r}{rev}; "
            f"models are never downloaded here: download it first with `hf download {repo}{option}` "
            f"(`huggingface-cli download {repo}{option}` with an older huggingface_hub), or pass a local folder"
        ) from None


def _is_repo_id(name: str) -> bool:
    """Whether `name` can be a Hugging Face repository id (one "owner/name" or "name", no path syntax)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "~", "/")) or "\\" in name:  # relative, home or absolute paths; Windows separators
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _weight_names(name: str) -> tuple[str, str] | None:
    """The (single file, sharded index) weight names of a component role; None for components without weights."""
    if name in DIFFUSERS_MODEL_ROLES:
        return WEIGHTS_NAME, WEIGHTS_INDEX_NAME
    if name.startswith("text_encoder") or name == "image_encoder":
        return ENCODER_WEIGHTS
    return None


def component_variants(folder: Path, names: list[str], variant: str | None) -> dict[str, str | None]:
    """Which of the components `names` load `variant`'s weights: those whose folder holds them; the others load
    their plain weights (diffusers' rule). ValueError when no component has the variant."""
    if variant is None:
        return dict.fromkeys(names)
    if not isinstance(variant, str) or not variant or "." in variant or "/" in variant:
        raise ValueError(f"variant={variant!r} must be a weight file variant such as 'fp16' or 'bf16'")
    found = {}
    for name in names:
        weights = _weight_names(name)
        has = weights is not None and any((folder / name / variant_name(w, variant)).is_file() for w in weights)
        found[name] = variant if has else None
    if not any(found.values()):
        saved = sorted({v for name in names if _weight_names(name) for v in _saved_variants(folder / name)})
        raise ValueError(f"{str(folder)!r}: no component has weights of variant {variant!r} (e.g. transformer/"
                         f"{variant_name(WEIGHTS_NAME, variant)}); variants found: "
                         f"{', '.join(map(repr, saved)) or 'none'}. Load without variant=, or write them with "
                         f"save_pretrained(..., variant={variant!r})")
    return found


def _saved_variants(sub: Path) -> set[str]:
    """The variants of a component folder's weight files (model.fp16.safetensors, ...index.fp16.json)."""
    if not sub.is_dir():
        return set()
    out = set()
    for file in sub.iterdir():
        parts = file.name.split(".")
        if len(parts) == 3 and parts[2] == "safetensors":
            out.add(parts[1].split("-")[0])  # model.fp16-00001-of-00002.safetensors: fp16
        elif len(parts) == 5 and parts[1:3] == ["safetensors", "index"] and parts[4] == "json":
            out.add(parts[3])
    return out


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
                      ("diffusers", "AutoencoderKLWan"), ("vae3d.wan_model", "WanVAE3D"), ("vae3d", "WanVAE3D")}),
    **{f"text_encoder{s}": _ENCODER_ENTRIES for s in ("", "_2", "_3")},
    **{f"tokenizer{s}": _TOKENIZER_ENTRIES for s in ("", "_2", "_3")},
    "scheduler": frozenset(("diffusers", name) for name in SCHEDULER_CLASSES),
    # Wan 2.1 I2V's CLIP vision model and its preprocessing (transformers 5's CLIPImageProcessor is the torchvision
    # backend, and falls back to CLIPImageProcessorPil where torchvision is not installed)
    "image_encoder": frozenset(("transformers", name) for name in ("CLIPVisionModel", "CLIPVisionModelWithProjection")),
    "image_processor": frozenset(("transformers", name) for name in ("CLIPImageProcessor", "CLIPImageProcessorPil")),
}
# The video VAEs loaded as our own vae3d classes (vae3d.load_vae; diffusers' class names and ours): CogVideoX's
# (CausalVAE3D) and Wan 2.1 / 2.2's (WanVAE3D).
_VIDEO_VAES = ("AutoencoderKLCogVideoX", "CausalVAE3D", "AutoencoderKLWan", "WanVAE3D")


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


def _check_roles(folder: Path, target: type, entries: dict, passed: dict | None = None) -> None:
    """The pipeline's required components are all named in model_index.json or passed to from_pretrained (checked
    before any load)."""
    params = inspect.signature(target.__init__).parameters
    required = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [n for n in required if n not in entries and n not in (passed or {})]
    if missing:
        raise ValueError(f"{str(folder / 'model_index.json')!r} has no entry for {missing} that {target.__name__} "
                         f"needs; it names {sorted(entries)}")


def init_parameters(target: type) -> list[str]:
    """The names the pipeline's constructor takes: its components and its settings (what from_pretrained's
    keyword arguments may override, as in diffusers)."""
    params = inspect.signature(target.__init__).parameters
    return [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def component_dtype(torch_dtype: torch.dtype | dict | None, name: str) -> torch.dtype | None:
    """A component's dtype under from_pretrained's torch_dtype, as diffusers reads it: one dtype for every
    component, or a dict by component name with "default" for the others (float32 without "default"); None
    gives diffusers' models (transformers, VAE) float32 and transformers' models their checkpoint's dtype."""
    if isinstance(torch_dtype, dict):
        return torch_dtype.get(name, torch_dtype.get("default", torch.float32))
    if torch_dtype is None and name in DIFFUSERS_MODEL_ROLES:
        return torch.float32
    return torch_dtype


def check_load_options(torch_dtype: Any, dtype: Any, low_cpu_mem_usage: Any, use_safetensors: Any,
                       local_files_only: Any) -> Any:
    """from_pretrained's diffusers options checked; returns the dtype argument (`dtype`, diffusers 0.42's name, or
    `torch_dtype`, the older one)."""
    if dtype is not None and torch_dtype is not None:
        raise ValueError("pass dtype or torch_dtype (its older name), not both")
    if not isinstance(low_cpu_mem_usage, bool):
        raise ValueError(f"low_cpu_mem_usage={low_cpu_mem_usage!r} must be True or False (loading here is always "
                         "the low-memory kind, built on the meta device)")
    if use_safetensors is False:
        raise ValueError("use_safetensors=False: only safetensors weights are loaded here (unpickling .bin files can "
                         "run code); convert the weights to safetensors")
    if local_files_only not in (None, True, False):
        raise ValueError(f"local_files_only={local_files_only!r} must be True, False or None")
    return dtype if dtype is not None else torch_dtype


def check_torch_dtype(torch_dtype: Any, names: list[str]) -> None:
    """torch_dtype is None, a torch.dtype, or a dict from component names (of this folder) or "default" to dtypes."""
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return
    if not isinstance(torch_dtype, dict):
        raise ValueError(f"torch_dtype={torch_dtype!r} must be a torch.dtype or a dict of them by component name "
                         f"(with 'default' for the others)")
    bad = {k: v for k, v in torch_dtype.items() if not isinstance(v, torch.dtype)}
    unknown = sorted(set(torch_dtype) - {"default", *names})
    if bad or unknown:
        raise ValueError(f"torch_dtype: {'values ' + repr(bad) + ' are not torch dtypes' if bad else ''}"
                         f"{'; ' if bad and unknown else ''}"
                         f"{'keys ' + repr(unknown) + ' name no component' if unknown else ''}; accepted keys: "
                         f"'default', {', '.join(map(repr, names))}")


def _load_component(folder: Path, name: str, library: str | None, class_name: str | None,
                    torch_dtype: torch.dtype | None, variant: str | None = None) -> Any:
    """One component of a pipeline folder, by its role (entries checked by _check_index first); our own modules
    for the transformer and video VAE, safetensors only everywhere; `variant`: its weights' variant (fp16, ...)."""
    if library is None:
        return None
    sub = folder / name
    if name in TRANSFORMER_ROLES:
        return load_transformer(sub, torch_dtype=torch_dtype, variant=variant)
    if name == "vae" and class_name in _VIDEO_VAES:
        from vae3d import load_vae
        from vae3d.loading import CLASSES

        # config.json's _class_name picks load_vae's class: it must be the family model_index.json names
        found = read_folder_json(sub, what="a VAE folder written by save_pretrained",
                                 optional={"_class_name": str}).get("_class_name")
        if CLASSES.get(found) is not CLASSES[class_name]:
            raise ValueError(f"{str(sub / 'config.json')!r} names class {found!r}, but model_index.json's 'vae' entry "
                             f"names {class_name!r}")
        return load_vae(sub, torch_dtype=torch_dtype, variant=variant)
    if name == "scheduler":
        import diffusers

        config = read_folder_json(sub, "scheduler_config.json", what=f"a {class_name} scheduler config")
        scheduler_cls = getattr(diffusers, class_name)
        return library_load(sub, f"a {class_name} scheduler", lambda: scheduler_cls.from_config(config))
    if name.startswith("tokenizer"):
        import transformers

        return load_tokenizer_folder(sub, getattr(transformers, class_name))
    if name.startswith("text_encoder"):
        return load_encoder_folder(sub, ENCODER_CLASSES[class_name], torch_dtype, variant=variant)
    if name in ("image_encoder", "image_processor"):  # transformers' CLIP vision model (safetensors) / its config
        import transformers

        cls = getattr(transformers, class_name)
        if name == "image_processor":
            return library_load(sub, f"a {class_name}", lambda: cls.from_pretrained(sub, local_files_only=True))
        safetensors_files(sub, *ENCODER_WEIGHTS, variant=variant)
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        kwargs.update({"variant": variant} if variant is not None else {})
        return library_load(sub, f"a {class_name} image encoder", lambda: cls.from_pretrained(
            sub, local_files_only=True, use_safetensors=True, **kwargs))
    import diffusers  # the image VAE (AutoencoderKL): diffusers' own, from safetensors only

    safetensors_files(sub, variant=variant)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    kwargs.update({"variant": variant} if variant is not None else {})
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


def generate_pipeline_class(folder: str | os.PathLike) -> type["DiTPipeline"]:
    """pipeline_class for `dit generate`: a family with its hooks (`check_folder_request`, ...; video families
    and, with `output_kind = "image"`, image families), else a one-line error naming what the folder holds and
    the families accepted."""
    target = pipeline_class(folder)
    if not hasattr(target, "check_folder_request"):
        runs = [name for name, q in PIPELINE_FAMILIES.items() if hasattr(resolve(q), "check_folder_request")]
        raise ValueError(f"{str(folder)!r} holds a {target.diffusers_class_name}; `dit generate` takes "
                         f"pipeline folders of {', '.join(runs)}")
    return target


video_pipeline_class = generate_pipeline_class  # its earlier name, from when `dit generate` made videos only


def _require_family(folder: Path, target: type) -> None:
    """The folder holds `target`'s family (a family's check_folder_request called on another family's folder)."""
    found = generate_pipeline_class(folder)
    if found is not target:
        raise ValueError(f"{str(folder)!r} holds a {found.diffusers_class_name}; {target.__name__} takes "
                         f"{target.diffusers_class_name} folders")

