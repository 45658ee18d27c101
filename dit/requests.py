"""What `dit generate` is asked for, checked before any weights load: prompts and prompt files, seeds, output
paths, the model folder and its generation defaults, and whether an output on disk already answers a request.

Every refusal is a UsageError (a ValueError) whose message is one line naming the value and what is accepted;
the command line prints it as `dit: error: ...` with exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from dit.outputs import MEDIA_FORMATS, check_not_symlink, sidecar_path

FORMATS = MEDIA_FORMATS
DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "demo"
EMBEDDED_MODEL_NAME = "embedded demo (dit/assets/demo)"  # what sidecars record when no --model was given
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's range
# Sidecar keys that say how an output was made, not what was asked: a rerun that differs only in these skips.
RUN_KEYS = frozenset({"seconds", "version", "output", "context_parallel", "cfg_parallel", "cache_report"})



class UsageError(ValueError):
    """A user error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One output to generate; fields left None take the model's defaults. class_label: a class-conditional
    model's class id (DiT), from `--class N` or from the prompt naming the class."""

    prompt: str
    seed: int
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    class_label: int | None = None


_JSONL_KEYS = {"prompt", "seed", "negative_prompt", "height", "width", "frames"}


def check_seed(seed: int, where: str = "--seed") -> int:
    if not 0 <= seed <= SEED_MAX:
        raise UsageError(f"{where} {seed} is outside the seeds a generator takes: 0 to 2**64 - 1 ({SEED_MAX})")
    return seed


def _jsonl_request(item: Any, where: str, default_seed: int) -> Request:
    """One JSONL line checked as a request: every value is what it says, or a one-line error naming it."""
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise UsageError(f"{where}: each line must be an object with a string \"prompt\"")
    if not item["prompt"].strip():
        raise UsageError(f"{where}: the prompt is empty")
    unknown = set(item) - _JSONL_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown keys {sorted(unknown)}; accepted: {sorted(_JSONL_KEYS)}")
    if not isinstance(item.get("negative_prompt", ""), str):
        raise UsageError(f"{where}: negative_prompt must be a string, got {item['negative_prompt']!r}")
    for key in ("seed", "height", "width", "frames"):
        if key in item and (not isinstance(item[key], int) or isinstance(item[key], bool)):
            raise UsageError(f"{where}: {key} must be an integer, got {item[key]!r}")
        if key in item and key != "seed" and item[key] < 1:  # 0 would otherwise read as "the default"
            raise UsageError(f"{where}: {key} must be a positive integer, got {item[key]}; leave it out for the "
                             "model's default")
    request = Request(**{"seed": default_seed, **item})
    check_seed(request.seed, f"{where}: seed")
    return request


def read_prompts(path: Path, default_seed: int) -> list[Request]:
    """Prompts from a text file (one per line) or JSONL ({"prompt", "seed"?, "height"?, "width"?, "frames"?, ...})."""
    if not path.is_file():
        raise UsageError(f"prompt file {str(path)!r} does not exist")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise UsageError(f"prompt file {str(path)!r} is empty; put one prompt per line (or one JSON object per line)")
    requests = []
    for n, line in enumerate(lines, 1):
        seed = default_seed + n - 1
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            requests.append(_jsonl_request(item, f"{path}:{n}", seed))
        else:
            requests.append(Request(prompt=line.strip(), seed=check_seed(seed, f"{path}:{n}: seed (--seed + {n - 1})")))
    return requests


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "sample"


def _file_suffix(output: str | None) -> str:
    """The extension of -o when it names a file (a format, or a refused extension); "" for a folder."""
    suffix = "" if not output or output.endswith(("/", os.sep)) else Path(output).suffix.lstrip(".").lower()
    if suffix and suffix not in FORMATS and not Path(output).is_dir():
        raise UsageError(f"-o {output}: .{suffix} is not an output format; accepted: {', '.join(FORMATS)} "
                         f"(for a folder of that name, write it with a trailing '/')")
    return suffix if suffix in FORMATS else ""


def output_format(output: str | None, fmt: str | None, default: str) -> str:
    """The outputs' format: -o FILE's extension, else --format, else the model's default (mp4 for video models,
    png for image models). -o names a file when its extension is an output format and it is not written with a
    trailing slash; another extension is refused rather than taken as a folder name, unless that folder exists."""
    suffix = _file_suffix(output)
    if suffix:
        same = {"jpeg": "jpg"}
        if fmt is not None and same.get(fmt, fmt) != same.get(suffix, suffix):
            raise UsageError(f"-o {output} names a .{suffix} file but --format is {fmt}; drop --format or make the "
                             "two agree")
        return suffix
    return fmt or default


def per_prompt(requests: list[Request], count: int) -> tuple[list[Request], list[int]]:
    """`count` outputs per request (--num-images): output j of a request takes its seed + j. Returns the
    outputs' requests and, for each, the index of the prompt it came from."""
    out, index = [], []
    for i, r in enumerate(requests):
        for j in range(count):
            check_seed(r.seed + j, f"seed {r.seed} + {j} (--num-images {count})")
            out.append(replace(r, seed=r.seed + j))
            index.append(i)
    return out, index


def output_paths(requests: list[Request], output: str | None, fmt: str, *, indices: list[int] | None = None,
                 per_request: int = 1) -> list[Path]:
    """A file for a single output (-o FILE), or one file per output in a folder (-o DIR, default outputs/), named
    `NNNN-prompt-sSEED.FORMAT` with NNNN the prompt's index (`indices`; the outputs of one prompt differ in their
    seeds). A PNG clip of several frames is a folder of frames named like a file."""
    if _file_suffix(output):
        if len(requests) > 1:
            many = (f"--num-images {per_request} makes {len(requests)} outputs" if per_request > 1
                    else f"there are {len(requests)} prompts")
            raise UsageError(f"-o {output} names one file, but {many}; give a folder instead")
        return [Path(output)]
    folder = Path(output or "outputs")
    indices = indices if indices is not None else list(range(len(requests)))
    return [folder / f"{i:04d}-{_slug(r.prompt)}-s{r.seed}.{fmt}" for i, r in zip(indices, requests)]


def check_writable(folder: Path) -> None:
    """The folder, or the nearest existing folder above it (created only when the first output is written, so a
    request refused later leaves nothing behind), must be a folder we can write into."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write to output folder {str(folder)!r}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to output folder {str(folder)!r}: {str(existing)!r} is not writable")


# ----------------------------------------------------------------------------------------------------------------
# Resume: what is done, what differs
# ----------------------------------------------------------------------------------------------------------------


def _settings_differ(old: dict, new: dict) -> list[str]:
    """The request settings (not RUN_KEYS) whose values differ between a sidecar and the planned record."""
    def norm(key: str, value: Any) -> Any:
        return os.path.normpath(value) if key in ("model", "image") and isinstance(value, str) else value

    keys = (set(old) | set(new)) - RUN_KEYS
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(keys) if norm(k, old.get(k)) != norm(k, new.get(k))]


def needs_generating(path: Path, record: dict, overwrite: bool) -> bool:
    """Whether `path` must be (re)generated; a one-line error for an output we may not replace.

    Sidecars are written before their output, so an output counts as done only when both exist and the
    sidecar's settings equal the request's: a sidecar without its output is an interrupted run (redone), an
    output without a sidecar is not ours (refused), other settings are named (refused; --overwrite replaces)."""
    hint = "; remove it, or pass --overwrite to replace the link itself"
    side = sidecar_path(path)
    for p in (path, side):
        check_not_symlink(p, replace_link=overwrite, hint=hint)
    if overwrite or not os.path.lexists(path):
        return True
    if not side.is_file():
        raise UsageError(f"{path} exists but has no sidecar {side.name}, so no finished `dit generate` run wrote it; "
                         "pass --overwrite to replace it, or choose another -o")
    try:
        old = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{side}: cannot read the sidecar ({e}); pass --overwrite to regenerate {path.name}") from None
    differ = _settings_differ(old if isinstance(old, dict) else {}, record)
    if differ:
        raise UsageError(f"{path} exists with other settings ({'; '.join(differ)}); pass --overwrite to replace it, "
                         "or choose another -o")
    print(f"skip (exists): {path}", file=sys.stderr)
    return False


def model_folder(model: str | None) -> Path:
    if model is None:
        folder = DEMO_MODEL
        if not (folder / "model_index.json").is_file():
            raise UsageError("the embedded demo model is not in this build; pass --model PATH to a pipeline folder")
        return folder
    folder = Path(model)
    if not folder.is_dir():
        raise UsageError(f"model folder {model!r} does not exist")
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"model folder {model!r} has no model_index.json (expected a diffusers pipeline folder)")
    return folder


IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}  # what PIL finds in the file -> what we call it


def read_image(path: str) -> tuple[Any, str]:
    """--image: the picture (RGB, its EXIF orientation applied, as diffusers' load_image reads it) and the sha256 of
    the file (the sidecar records it, so a different picture at the same path is not taken as done)."""
    import hashlib

    from PIL import Image, ImageOps, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--image {path!r} does not exist" if not os.path.lexists(file)
                         else f"--image {path!r} is not a file")
    accepted = ", ".join(IMAGE_FORMATS.values())
    try:
        with Image.open(file) as img:
            found = img.format
            # reading the pixels here: a truncated file fails now, not after the weights load
            picture = ImageOps.exif_transpose(img).convert("RGB") if found in IMAGE_FORMATS else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--image {path!r} cannot be read as an image ({accepted}): {reason}") from None
    if picture is None:
        raise UsageError(f"--image {path!r} is a {found} image; accepted: {accepted}")
    return picture, hashlib.sha256(file.read_bytes()).hexdigest()


RELAY_DEFAULT_KEYS = ("relay_steps", "relay_start", "relay_upsample", "relay_noise_alpha")


def generation_defaults(folder: Path) -> dict[str, Any]:
    """Optional `generation_config.json` in a model folder: its recommended steps, guidance, size, fps and relay
    settings (RELAY_DEFAULT_KEYS, used with --relay)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def sampling_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """The folder's recommended steps, guidance, size and frame count as pipeline keyword arguments (steps 25 and
    guidance 4 where it names none; size and frames None: the pipeline's own defaults)."""
    return {"num_inference_steps": defaults.get("num_inference_steps", 25),
            "guidance_scale": defaults.get("guidance_scale", 4.0),
            **{k: defaults.get(k) for k in ("height", "width", "num_frames")}}


def relay_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """The relay stage's settings the model was trained for (steps, start T_r, how the base result is upsampled),
    as pipeline keyword arguments."""
    return {k: defaults[k] for k in RELAY_DEFAULT_KEYS if k in defaults}


@contextlib.contextmanager
def user_input() -> Iterator[None]:
    """ValueErrors raised inside come from checking what the user gave (arguments, files, the model folder, the
    request against the loaded model): they are reported as user errors (one line, exit 2). Elsewhere a
    ValueError is a bug and keeps its traceback."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from e
