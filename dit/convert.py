"""Loading diffusers-format transformer folders into our modules; all diffusers name mapping lives here.

Our modules keep diffusers' parameter names wherever the architecture allows (so diffusers LoRA files and
`load_lora_weights` target the same names). Where a name must differ, the rule goes into RENAME_RULES and
nowhere else. A corrupt or mismatched folder (bad JSON, config values of the wrong type, unreadable or missing
safetensors, tensors of another shape) is a ValueError naming the file, never a raw traceback.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

# The one reader and checker of model folders (JSON files, safetensors shards, config types, weight shapes).
# It lives in vae3d because vae3d never imports dit; dit's loaders (this module, pipeline.py, text.py) use it
# from here.
from vae3d.folders import (WEIGHTS, WEIGHTS_INDEX, assign_weights, build_from_config, fits, library_load,
                           load_weights, read_folder_json, safetensors_files)

__all__ = ["TRANSFORMER_CLASSES", "assign_weights", "build_from_config", "fits", "library_load", "load_transformer",
           "load_safetensors_folder", "load_weights", "read_folder_json", "resolve", "safetensors_files"]

V = TypeVar("V")

# diffusers `_class_name` (or our own class name) -> "module:Class" of our implementation.
TRANSFORMER_CLASSES: dict[str, str] = {
    "CogVideoXTransformer3DModel": "dit.models.cogvideox:CogVideoXTransformer3DModel",
    "SD3Transformer2DModel": "dit.models.mmdit:SD3Transformer2DModel",
    "DiTTransformer2DModel": "dit.models.dit:DiTTransformer2DModel",
    "CogView3PlusTransformer2DModel": "dit.models.cogview3plus:CogView3PlusTransformer2DModel",
    "WanTransformer3DModel": "dit.models.wan:WanTransformer3DModel",
}

# diffusers' legacy Transformer2DModel stands for several models and its `norm_type` says which; released
# DiT checkpoints (facebook/DiT-XL-2-256, -512) still name it. diffusers remaps the same way on load.
LEGACY_CLASSES: dict[str, dict[str, str]] = {
    "Transformer2DModel": {"ada_norm_zero": "DiTTransformer2DModel"},
}

# Per class: (regex, replacement) applied in order to each diffusers key. Empty while names agree.
RENAME_RULES: dict[str, list[tuple[str, str]]] = {}

WEIGHTS_NAME, WEIGHTS_INDEX_NAME = WEIGHTS, WEIGHTS_INDEX


def resolve(qualname: str) -> type:
    """The class named "module:Class"."""
    module, _, name = qualname.partition(":")
    return getattr(importlib.import_module(module), name)


def load_safetensors_folder(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a save_pretrained folder, single-file or sharded; safetensors only, never pickles."""
    return load_weights(safetensors_files(path))[0]


def rename_state_dict(class_name: str, state: dict[str, V]) -> dict[str, V]:
    """diffusers key names -> ours (RENAME_RULES); the values (tensors, or the files they came from) are kept."""
    rules = RENAME_RULES.get(class_name, [])
    if not rules:
        return state
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def transformer_class_name(config: dict, path: str | os.PathLike) -> str:
    """The key of TRANSFORMER_CLASSES for a folder's config (a legacy class name resolved by its norm_type)."""
    class_name = config.get("_class_name")
    if class_name in LEGACY_CLASSES:
        by_norm, norm_type = LEGACY_CLASSES[class_name], config.get("norm_type")
        if norm_type not in by_norm:
            raise ValueError(
                f"{str(path)!r}: {class_name} with norm_type {norm_type!r} is not supported; accepted norm_type: "
                f"{', '.join(repr(n) for n in by_norm)} ({', '.join(by_norm.values())})"
            )
        return by_norm[norm_type]
    if class_name not in TRANSFORMER_CLASSES:
        legacy = [f"{c} (norm_type {', '.join(map(repr, n))})" for c, n in LEGACY_CLASSES.items()]
        raise ValueError(
            f"{str(path)!r}: unsupported transformer class {class_name!r}; "
            f"accepted: {', '.join([*TRANSFORMER_CLASSES, *legacy])}"
        )
    return class_name


def load_transformer(
    path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    variant: str | None = None,
) -> nn.Module:
    """Load a diffusers-format (or our own) transformer folder into our implementation.

    The class comes from config.json's `_class_name`; the architecture from the config only, never from
    tensor shapes. Every checkpoint key must be used and every parameter filled (strict load). `variant`
    ("fp16", "bf16", ...) reads the weights `save_pretrained(variant=...)` wrote, as diffusers' `variant=` does:
    diffusion_pytorch_model.<variant>.safetensors or diffusion_pytorch_model.safetensors.index.<variant>.json.
    """
    folder = Path(path)
    config = read_folder_json(folder, what="a transformer folder written by save_pretrained",
                              optional={"_class_name": str, "norm_type": str})
    class_name = transformer_class_name(config, folder)
    files = safetensors_files(folder, variant=variant)  # before building: a pickle-only folder is refused at once
    model = build_from_config(resolve(TRANSFORMER_CLASSES[class_name]), config, folder / "config.json")
    state, origin = load_weights(files)
    assign_weights(model, rename_state_dict(class_name, state), rename_state_dict(class_name, origin), folder)
    # Buffers that are not saved (e.g. precomputed positions) were created on meta: rebuild them.
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    if torch_dtype is not None and any(p.dtype != torch_dtype for p in model.parameters()):
        model = cast_keeping_fp32(model, torch_dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def cast_keeping_fp32(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype), except the tensors diffusers keeps in fp32 for the class (`_keep_in_fp32_modules`: a
    parameter or buffer whose dotted name contains one of those module names), as its from_pretrained does."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    model = model.to(dtype)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and any(k in name.split(".") for k in keep):
            tensor.data = tensor.data.float()
    return model
