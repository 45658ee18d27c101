"""Load AutoencoderKLCogVideoX folders (diffusers ``save_pretrained``) or our own into CausalVAE3D.

Only safetensors are read: a folder that has nothing but pickled weights (``.bin``) is refused,
because unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .model import CausalVAE3D

CLASS_NAMES = ("AutoencoderKLCogVideoX", CausalVAE3D.__name__)
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"

# diffusers state-dict name -> ours. Our modules are named like diffusers' so the map is empty;
# this is the one place a rename would go (and the only one that may know diffusers' names).
DIFFUSERS_RENAMES: dict[str, str] = {}


def to_our_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKLCogVideoX state dict to CausalVAE3D's names."""
    out = {}
    for name, tensor in state.items():
        for old, new in DIFFUSERS_RENAMES.items():
            if name.startswith(old):
                name = new + name[len(old) :]
        out[name] = tensor
    return out


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / WEIGHTS_INDEX).is_file():
        index = json.loads((folder / WEIGHTS_INDEX).read_text())
        return [folder / f for f in sorted(set(index["weight_map"].values()))]
    present = sorted(p.name for p in folder.iterdir())
    raise ValueError(
        f"no {WEIGHTS} (or {WEIGHTS_INDEX}) in {folder}; found {present}. Only safetensors are loaded, "
        "never pickled .bin files: convert them with safetensors first."
    )


def load_vae(
    path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> CausalVAE3D:
    """Load a VAE folder (config.json + safetensors) written by diffusers or by CausalVAE3D.

    ``path`` may also be a pipeline folder with a ``vae/`` subfolder. The model is built on the
    meta device and takes the loaded tensors as its parameters, so loading holds one copy.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json; expected a folder written by save_pretrained")
    config = json.loads((folder / "config.json").read_text())
    cls_name = config.get("_class_name")
    if cls_name not in CLASS_NAMES:
        raise ValueError(f"{folder}/config.json names class {cls_name!r}; load_vae reads {CLASS_NAMES}")

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        state.update(load_file(file, device=str(device) if device is not None else "cpu"))
    state = to_our_names(state)
    if torch_dtype is not None:
        state = {k: v.to(torch_dtype) for k, v in state.items()}

    with torch.device("meta"):
        model = CausalVAE3D.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the config; missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
