"""Loading diffusers-format transformer folders into our modules; all diffusers name mapping lives here.

Our modules keep diffusers' parameter names wherever the architecture allows (so diffusers LoRA files and
`load_lora_weights` target the same names). Where a name must differ, the rule goes into RENAME_RULES and
nowhere else.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

# diffusers `_class_name` (or our own class name) -> "module:Class" of our implementation.
TRANSFORMER_CLASSES: dict[str, str] = {
    "CogVideoXTransformer3DModel": "dit.models.cogvideox:CogVideoXTransformer3DModel",
    "SD3Transformer2DModel": "dit.models.mmdit:SD3Transformer2DModel",
    "DiTTransformer2DModel": "dit.models.dit:DiTTransformer2DModel",
    "CogView3PlusTransformer2DModel": "dit.models.cogview3plus:CogView3PlusTransformer2DModel",
}

# diffusers' legacy Transformer2DModel stands for several models and its `norm_type` says which; released
# DiT checkpoints (facebook/DiT-XL-2-256, -512) still name it. diffusers remaps the same way on load.
LEGACY_CLASSES: dict[str, dict[str, str]] = {
    "Transformer2DModel": {"ada_norm_zero": "DiTTransformer2DModel"},
}

# Per class: (regex, replacement) applied in order to each diffusers key. Empty while names agree.
RENAME_RULES: dict[str, list[tuple[str, str]]] = {}

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def resolve(qualname: str) -> type:
    """The class named "module:Class"."""
    module, _, name = qualname.partition(":")
    return getattr(importlib.import_module(module), name)


def read_folder_json(path: str | os.PathLike, name: str = "config.json", *, what: str = "a folder written by "
                     "save_pretrained") -> dict:
    """A JSON file of a model folder, with a clear error for a missing folder or file."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model folder {str(folder)!r} does not exist or is not a folder")
    file = folder / name
    if not file.is_file():
        raise ValueError(f"{str(folder)!r} has no {name}; expected {what}")
    return json.loads(file.read_text())


def load_safetensors_folder(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a save_pretrained folder, single-file or sharded; safetensors only, never pickles."""
    folder = Path(path)
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    found = sorted(p.name for p in folder.iterdir())
    raise ValueError(
        f"{str(folder)!r} has no {WEIGHTS_NAME} (or sharded index); found {found}. "
        "Only safetensors weights are loaded (pickled .bin files never are)."
    )


def rename_state_dict(class_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
) -> nn.Module:
    """Load a diffusers-format (or our own) transformer folder into our implementation.

    The class comes from config.json's `_class_name`; the architecture from the config only, never from
    tensor shapes. Every checkpoint key must be used and every parameter filled (strict load).
    """
    config = read_folder_json(path)
    class_name = transformer_class_name(config, path)
    cls = resolve(TRANSFORMER_CLASSES[class_name])
    with torch.device("meta"):
        model = cls.from_config(config)
    state = rename_state_dict(class_name, load_safetensors_folder(path))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)[:2]
    if missing or unexpected:
        raise ValueError(
            f"{str(path)!r}: checkpoint does not match {cls.__name__} built from its config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    # Buffers that are not saved (e.g. precomputed positions) were created on meta: rebuild them.
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    if torch_dtype is not None and any(p.dtype != torch_dtype for p in model.parameters()):
        model = model.to(torch_dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()
