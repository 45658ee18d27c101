"""Reading model folders, for every loader of the project: JSON files, safetensors weights and shards,
config types, weight shapes, and library loaders' errors. Each error is a ValueError naming the file and what
is wrong. It lives in vae3d, the leaf package, so that vae3d's loader and dit's (dit.convert re-exports these)
share it: vae3d never imports dit.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

T = TypeVar("T")

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def read_folder_json(path: str | os.PathLike, name: str = "config.json", *,
                     what: str = "a folder written by save_pretrained",
                     required: Mapping[str, Any] | None = None, optional: Mapping[str, Any] | None = None) -> dict:
    """A JSON object file of a model folder; every error names the file and what is wrong.

    `required` and `optional` map keys to the type annotation their values must fit (JSON arrays stand for
    tuples and lists), so callers that read single keys get a clear error instead of a KeyError or TypeError.
    This is the one reader of folder JSON (model_index.json, configs, shard indexes).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model folder {str(folder)!r} does not exist or is not a folder")
    file = folder / name
    if not file.is_file():
        raise ValueError(f"{str(folder)!r} has no {name}; expected {what}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(file)!r} cannot be read as UTF-8 text ({err}); expected {what}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(file)!r} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                         f"expected {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(file)!r} holds a JSON {_json_kind(data)}; expected a JSON object ({what})")
    for key, hint in (required or {}).items():
        if key not in data:
            raise ValueError(f"{str(file)!r} has no {key!r} entry; expected {_describe(hint)} there ({what})")
    for key, hint in {**(optional or {}), **(required or {})}.items():
        if key in data and not fits(data[key], hint):
            raise ValueError(f"{str(file)!r}: {key}={data[key]!r} must be {_describe(hint)}")
    return data


def _json_kind(value: Any) -> str:
    kinds = ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"), ((int, float), "number"))
    return next((kind for cls, kind in kinds if isinstance(value, cls)), "null")


def fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a constructor's type annotation. bool is not taken for int or float (JSON keeps
    them apart); JSON arrays stand for tuples and lists; annotations this does not know are left to the class."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return any(fits(value, h) for h in args)
    if hint in (None, type(None)):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        items = [a for a in args if a is not Ellipsis]
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and len(items) > 1:  # fixed length, e.g. tuple[int, int]
            return len(value) == len(items) and all(map(fits, value, items))
        return not items or all(fits(v, items[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


_WORDS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), type(None): ("null", "nulls"), dict: ("a JSON object", "JSON objects")}


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return " or ".join(_describe(h) for h in args)
    if origin in (tuple, list) or hint in (tuple, list):
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(items) > 1:
            return f"a list of {len(items)} ({', '.join(_describe(a) for a in items)})"
        return f"a list of {_WORDS[items[0]][1]}" if items and items[0] in _WORDS else "a list"
    return _WORDS.get(hint, (getattr(hint, "__name__", str(hint)),))[0]


def check_config_types(config: dict, cls: type, file: Path) -> None:
    """Every config entry that is a constructor argument of `cls` fits its annotation (or its default's type:
    some diffusers annotations are looser than their defaults), before anything is built from it."""
    hints = get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters
    for key, value in config.items():
        if key not in params or key not in hints or fits(value, hints[key]):
            continue
        default = params[key].default
        if default not in (None, inspect.Parameter.empty) and type(value) is type(default):
            continue
        raise ValueError(f"{str(file)!r}: {key}={value!r} must be {_describe(hints[key])} for {cls.__name__}")


def build_from_config(cls: type, config: dict, file: Path) -> nn.Module:
    """`cls.from_config(config)` on the meta device (no memory), with the config's file named in any error."""
    check_config_types(config, cls, file)
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, RuntimeError) as err:
        raise ValueError(f"{str(file)!r} does not describe a valid {cls.__name__}: {err}") from err


def _is_hf_cache_blob(folder: Path, target: Path) -> bool:
    """Whether `target` is a blob of the Hugging Face cache repo whose snapshot holds `folder`: snapshot files
    are symlinks to ../../blobs/<hash>, the repo's own files, so they count as inside the model folder."""
    parts = folder.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            return target.is_relative_to(Path(*parts[:i]) / "blobs")
    return False


def _index_shards(folder: Path, index_name: str) -> list[Path]:
    """The shard files a sharded index names: each inside the folder (no absolute paths, no `..`, no symlink
    that leaves it, which would read files the model folder does not hold) and present."""
    index = read_folder_json(folder, index_name, what="a safetensors index (weight_map: tensor -> shard file)",
                             required={"weight_map": dict})
    file, weight_map = folder / index_name, index["weight_map"]
    bad = [v for v in weight_map.values() if not isinstance(v, str) or not v.endswith(".safetensors")]
    if not weight_map or bad:
        raise ValueError(f"{str(file)!r}: weight_map must map tensor names to .safetensors file names; got "
                         f"{bad[:3] if bad else 'an empty map'}")
    root, shards = folder.resolve(), []
    for name in sorted(set(weight_map.values())):
        shard, target = Path(name), (folder / name).resolve()
        if shard.is_absolute() or ".." in shard.parts or not (
                target.is_relative_to(root) or _is_hf_cache_blob(root, target)):
            raise ValueError(f"{str(file)!r} names shard {name!r}, outside {str(folder)!r}; accepted: files "
                             "inside the model folder")
        if not (folder / shard).is_file():
            raise ValueError(f"{str(file)!r} names shard {name!r}, which is missing from {str(folder)!r}")
        shards.append(folder / shard)
    return shards


def variant_name(name: str, variant: str | None) -> str:
    """A weight file's name for a `variant` as diffusers and transformers write it (`save_pretrained(variant=...)`):
    diffusion_pytorch_model.fp16.safetensors, model.safetensors.index.fp16.json; `name` itself for None."""
    if variant is None:
        return name
    parts = name.split(".")
    return ".".join([*parts[:-1], variant, parts[-1]])


def safetensors_files(path: str | os.PathLike, single: str = WEIGHTS,
                      index_name: str = WEIGHTS_INDEX, *, variant: str | None = None) -> list[Path]:
    """The weight files of a folder: `single`, or the shards `index_name` names (with `variant`, e.g. "fp16", the
    variant's files: `variant_name`). A folder without them (only pickled .bin files, say) is refused: unpickling
    runs arbitrary code, so pickles are never loaded."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model folder {str(folder)!r} does not exist or is not a folder")
    single, index_name = variant_name(single, variant), variant_name(index_name, variant)
    if (folder / single).is_file():
        return [folder / single]
    if (folder / index_name).is_file():
        return _index_shards(folder, index_name)
    found = sorted(p.name for p in folder.iterdir())
    raise ValueError(f"{str(folder)!r} has no {single} (or {index_name}); found {found}. Only safetensors "
                     "weights are loaded; pickles (.bin, .pt, .ckpt) are never loaded, since unpickling can run "
                     "code: convert them to safetensors")


def load_weights(files: list[Path], device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """The tensors of safetensors files, and which file each came from (for errors that name the file)."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        try:
            tensors = load_file(file, device=str(device))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{str(file)!r} is not a readable safetensors file ({err}); it is empty, truncated "
                             "or not safetensors: save or download it again") from None
        state.update(tensors)
        origin.update(dict.fromkeys(tensors, file))
    return state, origin


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], origin: dict[str, Path], folder: Path) -> None:
    """Load `state` into a meta-built model strictly (every key used, every parameter filled); a tensor whose
    shape differs from the one the config builds is named with its file, before torch's size-mismatch error."""
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        shown = "; ".join(f"{k} is {tuple(state[k].shape)} in {origin[k].name}, the config builds "
                          f"{tuple(expected[k].shape)}" for k in wrong[:4])
        raise ValueError(f"{str(origin[wrong[0]])!r}: {len(wrong)} tensor(s) do not match config.json of "
                         f"{str(folder)!r} ({type(model).__name__}): {shown}{'; ...' if len(wrong) > 4 else ''}")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)[:2]
    if missing or unexpected:
        raise ValueError(
            f"{str(folder)!r}: checkpoint does not match {type(model).__name__} built from its config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def library_load(folder: Path, what: str, load: Callable[[], T]) -> T:
    """Run a diffusers/transformers loader on a component folder; its errors (bad JSON, corrupt weights, a
    missing file) become a ValueError naming the folder. Out-of-memory errors pass through unchanged."""
    if not folder.is_dir():
        raise ValueError(f"component folder {str(folder)!r} is missing; expected {what} there")
    try:
        return load()
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - any library error means this folder could not be loaded
        raise ValueError(f"{str(folder)!r}: cannot load {what} ({type(err).__name__}: {err})") from err
