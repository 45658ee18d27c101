"""Load VAE folders (diffusers ``save_pretrained``, or our own) into our classes, by ``_class_name``:
AutoencoderKLCogVideoX -> CausalVAE3D, AutoencoderKLWan -> WanVAE3D.

Only safetensors are read: a folder that has nothing but pickled weights (``.bin``) is refused,
because unpickling runs arbitrary code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import torch

from .folders import (WEIGHTS, WEIGHTS_INDEX, assign_weights, build_from_config, load_weights, read_folder_json,
                      safetensors_files)
from .model import CausalVAE3D
from .wan_model import WanVAE3D

V = TypeVar("V")

# config.json's _class_name -> the class that loads it (diffusers' names and ours).
CLASSES: dict[str, type] = {
    "AutoencoderKLCogVideoX": CausalVAE3D,
    CausalVAE3D.__name__: CausalVAE3D,
    "AutoencoderKLWan": WanVAE3D,
    WanVAE3D.__name__: WanVAE3D,
}
CLASS_NAMES = tuple(CLASSES)

# diffusers state-dict name -> ours. Our modules are named like diffusers' (both VAEs) so the map is
# empty; this is the one place a rename would go (and the only one that may know diffusers' names).
DIFFUSERS_RENAMES: dict[str, str] = {}


def to_our_names(state: dict[str, V]) -> dict[str, V]:
    """Rename a diffusers VAE state dict (or its key -> file map) to our names."""
    out = {}
    for name, tensor in state.items():
        for old, new in DIFFUSERS_RENAMES.items():
            if name.startswith(old):
                name = new + name[len(old) :]
        out[name] = tensor
    return out


def load_vae(
    path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    variant: str | None = None,
) -> CausalVAE3D | WanVAE3D:
    """Load a VAE folder (config.json + safetensors) written by diffusers or by us; the class follows
    config.json's ``_class_name`` (``CLASSES``).

    ``path`` may also be a pipeline folder with a ``vae/`` subfolder. The model is built on the
    meta device and takes the loaded tensors as its parameters, so loading holds one copy. A corrupt
    or mismatched folder (bad JSON, wrong config types, unreadable or missing weight files, shapes
    that differ from the config's) is a ValueError naming the file.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config = read_folder_json(folder, what="a VAE folder written by save_pretrained", optional={"_class_name": str})
    cls_name = config.get("_class_name")
    if cls_name not in CLASS_NAMES:
        raise ValueError(f"{folder}/config.json names class {cls_name!r}; load_vae reads {CLASS_NAMES}")
    # pickles are refused before anything is built; `variant` ("fp16", ...): the weights save_pretrained(variant=)
    # wrote, diffusion_pytorch_model.<variant>.safetensors (or its sharded index)
    files = safetensors_files(folder, WEIGHTS, WEIGHTS_INDEX, variant=variant)
    model = build_from_config(CLASSES[cls_name], config, folder / "config.json")
    state, origin = load_weights(files, device if device is not None else "cpu")
    if torch_dtype is not None:
        state = {k: v.to(torch_dtype) for k, v in state.items()}
    assign_weights(model, to_our_names(state), to_our_names(origin), folder)
    return model.eval()
