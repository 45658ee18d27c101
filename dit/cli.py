"""The `dit` command line: `dit generate` (text to video / image) and `dit train` (under accelerate launch).

Bad input is a one-line `dit: error: ...` on stderr and exit code 2, before any model is loaded where the
check allows it. Outputs are written atomically (temporary file, then rename) with a JSON sidecar, never
overwritten without --overwrite, and a rerun skips outputs already written, so an interrupted batch resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMATS = ("mp4", "gif", "webp", "png")
DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "demo"
EMBEDDED_MODEL_NAME = "embedded demo (dit/assets/demo)"  # what sidecars record when no --model was given
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class CLIError(ValueError):
    """A user error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One output to generate; fields left None take the model's defaults."""

    prompt: str
    seed: int
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None


_JSONL_KEYS = {"prompt", "seed", "negative_prompt", "height", "width", "frames"}


def read_prompts(path: Path, default_seed: int) -> list[Request]:
    """Prompts from a text file (one per line) or JSONL ({"prompt", "seed"?, "height"?, "width"?, "frames"?, ...})."""
    if not path.is_file():
        raise CLIError(f"prompt file {str(path)!r} does not exist")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise CLIError(f"prompt file {str(path)!r} is empty; put one prompt per line (or one JSON object per line)")
    requests = []
    for n, line in enumerate(lines, 1):
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise CLIError(f"{path}:{n}: each line must be an object with a string \"prompt\"")
            unknown = set(item) - _JSONL_KEYS
            if unknown:
                raise CLIError(f"{path}:{n}: unknown keys {sorted(unknown)}; accepted: {sorted(_JSONL_KEYS)}")
            for key in ("seed", "height", "width", "frames"):
                if key in item and (not isinstance(item[key], int) or isinstance(item[key], bool)):
                    raise CLIError(f"{path}:{n}: {key} must be an integer, got {item[key]!r}")
            requests.append(Request(**{"seed": default_seed + n - 1, **item}))
        else:
            requests.append(Request(prompt=line.strip(), seed=default_seed + n - 1))
    return requests


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "sample"


def output_paths(requests: list[Request], output: str | None, fmt: str | None) -> list[Path]:
    """A file for a single request (-o FILE), or one file per request in a folder (-o DIR, default outputs/)."""
    if output and Path(output).suffix.lstrip(".").lower() in FORMATS:
        if len(requests) > 1:
            raise CLIError(f"-o {output} names one file, but there are {len(requests)} prompts; give a folder instead")
        return [Path(output)]
    folder = Path(output or "outputs")
    ext = fmt or "mp4"
    return [folder / f"{i:04d}-{_slug(r.prompt)}-s{r.seed}.{ext}" for i, r in enumerate(requests)]


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dit-write-check-"):
            pass
    except OSError as e:
        raise CLIError(f"cannot write to output folder {str(folder)!r}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Writing outputs
# ----------------------------------------------------------------------------------------------------------------


def _atomic(path: Path, write) -> None:
    """write(tmp_path) then rename over `path`: a crash never leaves a half-written output."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def write_video(frames, path: Path, fps: int) -> None:
    """frames: (F, H, W, 3) floats in [0, 1] -> mp4 (H.264 via imageio-ffmpeg), gif, webp, or a folder of PNGs."""
    import imageio.v3 as iio
    import numpy as np

    data = (np.clip(frames, 0, 1) * 255).round().astype("uint8")
    fmt = path.suffix.lstrip(".").lower()

    def write(tmp: Path) -> None:
        if fmt == "mp4":
            iio.imwrite(tmp, data, plugin="FFMPEG", fps=fps, codec="libx264",
                        macro_block_size=1, ffmpeg_log_level="error")
        elif fmt == "gif":
            iio.imwrite(tmp, data, extension=".gif", duration=1000 / fps, loop=0)
        elif fmt == "webp":
            iio.imwrite(tmp, data, extension=".webp", duration=1000 / fps, loop=0, lossless=True)
        else:  # png: one file per frame in a folder named like the output
            tmp.mkdir()
            for i, frame in enumerate(data):
                iio.imwrite(tmp / f"frame_{i:04d}.png", frame)

    _atomic(path, write)


def write_sidecar(path: Path, record: dict) -> None:
    side = path.with_name(path.name + ".json")
    _atomic(side, lambda tmp: tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n"))


# ----------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------


def _model_folder(model: str | None) -> Path:
    if model is None:
        folder = DEMO_MODEL
        if not (folder / "model_index.json").is_file():
            raise CLIError("the embedded demo model is not in this build; pass --model PATH to a pipeline folder")
        return folder
    folder = Path(model)
    if not folder.is_dir():
        raise CLIError(f"model folder {model!r} does not exist")
    if not (folder / "model_index.json").is_file():
        raise CLIError(f"model folder {model!r} has no model_index.json (expected a diffusers pipeline folder)")
    return folder


RELAY_DEFAULT_KEYS = ("relay_steps", "relay_start", "relay_upsample", "relay_noise_alpha")


def generation_defaults(folder: Path) -> dict[str, Any]:
    """Optional `generation_config.json` in a model folder: its recommended steps, guidance, size, fps and relay
    settings (RELAY_DEFAULT_KEYS, used with --relay)."""
    path = folder / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def relay_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """The relay stage's settings the model was trained for (steps, start T_r, how the base result is upsampled),
    as pipeline keyword arguments."""
    return {k: defaults[k] for k in RELAY_DEFAULT_KEYS if k in defaults}


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    if args.prompt is None and args.prompts_file is None:
        raise CLIError("give a PROMPT or --prompts-file FILE")
    if args.prompt is not None and args.prompts_file is not None:
        raise CLIError("give either a PROMPT or --prompts-file, not both")
    if args.prompt is not None and not args.prompt.strip():
        raise CLIError("the prompt is empty")
    requests = (read_prompts(Path(args.prompts_file), args.seed) if args.prompts_file
                else [Request(prompt=args.prompt, seed=args.seed, negative_prompt=args.negative_prompt)])
    for r in requests:
        r.negative_prompt = r.negative_prompt if r.negative_prompt is not None else args.negative_prompt
        r.height, r.width, r.frames = r.height or args.height, r.width or args.width, r.frames or args.frames
    paths = output_paths(requests, args.output, args.format)
    for folder in {p.parent for p in paths}:
        check_writable(folder)
    folder = _model_folder(args.model)
    defaults = generation_defaults(folder)
    steps = args.steps or defaults.get("num_inference_steps", 50)
    guidance = args.guidance if args.guidance is not None else defaults.get("guidance_scale", 6.0)
    fps = args.fps or defaults.get("fps", 8)
    if args.cfg_degree == 2 and not guidance > 1:  # without guidance the batch has no second half to run
        raise CLIError(f"--cfg-degree 2 runs the two halves of classifier-free guidance; it needs --guidance > 1, "
                       f"got {guidance}")
    world = _check_parallel_degrees(args)
    if world > 1 and args.device == "cuda" and "LOCAL_RANK" in os.environ:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per torchrun process, not all on cuda:0
    relay_options = relay_defaults(defaults)
    todo = []
    for r, p in zip(requests, paths):
        if args.overwrite or not p.exists():
            todo.append((r, p))
        else:
            print(f"skip (exists): {p}", file=sys.stderr)
    if not todo:
        return 0

    _quiet_libraries()  # before the pipelines are imported: transformers' import-time notices are noise here too
    from dit.pipeline import CogVideoXDiTPipeline, DiTPipeline

    # Sizes are checked from the folder's configs before any weights are loaded.
    for r, _ in todo:
        r.height = r.height or defaults.get("height")
        r.width = r.width or defaults.get("width")
        r.frames = r.frames or defaults.get("num_frames")
        r.height, r.width, r.frames = CogVideoXDiTPipeline.check_folder_request(folder, r.height, r.width, r.frames)
    if args.offload and not args.device.startswith("cuda"):
        raise CLIError(f"--offload moves models between CPU and GPU; it needs --device cuda, got --device {args.device}")
    dtype = getattr(torch, DTYPES[args.dtype])
    pipe = DiTPipeline.from_pretrained(folder, torch_dtype=dtype)
    if args.offload:
        pipe.enable_model_cpu_offload(device=args.device)
    else:
        pipe.to(args.device)
    with _parallel(pipe, args, world) as writer:
        for r, _ in todo:  # and every request against the loaded model before generating anything
            pipe.check_inputs(r.prompt, r.negative_prompt, r.height, r.width, r.frames, steps, guidance)
        batch = tqdm(todo, desc="prompts", unit="sample", disable=len(todo) == 1)
        for r, path in batch:
            start = time.perf_counter()
            generator = torch.Generator(device="cpu").manual_seed(r.seed)
            _shard_vae_decode(pipe, r.frames)
            out = pipe(prompt=r.prompt, negative_prompt=r.negative_prompt, height=r.height, width=r.width,
                       num_frames=r.frames, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                       output_type="np", **({"solver": args.solver} if args.solver else {}),
                       **({"relay": args.relay, **relay_options} if args.relay else {}))
            if not writer:  # under torchrun every rank computes the same frames; rank 0 writes them
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            write_video(out.frames[0], path, fps)
            write_sidecar(path, {
                # The embedded model by name: its install path says nothing to whoever reads the sidecar elsewhere.
                **asdict(r), "model": str(folder) if args.model is not None else EMBEDDED_MODEL_NAME,
                "steps": steps, "guidance": guidance, "fps": fps, "dtype": args.dtype, "solver": args.solver,
                "relay": args.relay,
                **(relay_options if args.relay else {}), "seconds": round(time.perf_counter() - start, 3),
                "output": path.name, "version": _version(),
                "context_parallel": [args.ring_degree, args.ulysses_degree], "cfg_parallel": args.cfg_degree,
            })
            print(str(path))
    return 0


def _check_parallel_degrees(args: argparse.Namespace) -> int:
    """cfg x ring x ulysses against the torchrun world size (checked before any weights load); returns the world."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    degrees = args.cfg_degree * args.ring_degree * args.ulysses_degree
    product = (f"--cfg-degree {args.cfg_degree} x --ring-degree {args.ring_degree} x "
               f"--ulysses-degree {args.ulysses_degree}")
    if world == 1 and degrees != 1:
        raise CLIError(f"{product} = {degrees} processes; launch with `torchrun --nproc_per_node N -m dit generate ...`")
    if world > 1 and degrees != world:
        raise CLIError(f"{product} = {degrees} must equal the torchrun world size {world}")
    return world


@contextlib.contextmanager
def _parallel(pipe, args: argparse.Namespace, world: int) -> Iterator[bool]:
    """Context parallelism under torchrun (world > 1, already checked against cfg x ring x ulysses).

    Yields whether this process writes the outputs (rank 0, or the only process). A process group this starts is
    closed at the end, also on errors, and after a barrier on success: every rank waits until rank 0 has written
    everything, so that no rank exits while another may still use its connections (gloo aborts a process whose
    peer went). A group the caller started is left open."""
    if world == 1:
        yield True
        return
    import torch
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:
        if args.device.startswith("cuda:"):
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        from dit.parallel import ContextParallelConfig

        pipe.transformer.enable_parallelism(ContextParallelConfig(
            ring_degree=args.ring_degree, ulysses_degree=args.ulysses_degree, cfg_degree=args.cfg_degree))
        pipe.set_progress_bar_config(disable=dist.get_rank() != 0)
        yield dist.get_rank() == 0
        if own_group:
            dist.barrier()
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _shard_vae_decode(pipe, num_frames: int) -> None:
    """Under torchrun, split the VAE decode along time when the clip has at least one of diffusers' frame
    batches per rank ("parity" statistics: the frames equal the single-process ones); otherwise every rank
    decodes the whole clip."""
    import torch.distributed as dist

    from dit.parallel import ContextParallelConfig
    from vae3d.streaming import frame_batches

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    vae = pipe.vae
    latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    batches = len(frame_batches(latent_frames, vae.num_latent_frames_batch_size, vae.frame_batching))
    world = dist.get_world_size()
    if batches >= world:
        vae.enable_parallelism(ContextParallelConfig(ring_degree=1, ulysses_degree=world), norm_stats="parity")
    else:
        vae.disable_parallelism()


def _quiet_libraries() -> None:
    """Our progress bars only: the libraries' weight-loading bars and notices are noise on the command line."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _version() -> str:
    from dit import __version__

    return __version__


def cmd_train(args: argparse.Namespace) -> int:
    from dit.train.config import load_config, parse_overrides

    cfg = load_config(args.config, overrides=parse_overrides(args.set or []))
    _quiet_libraries()
    if args.build_cache:
        from dit.train.cache import build_cache

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CLIError("--build-cache runs in one process: use `python -m dit train CONFIG --build-cache`")

        print(str(build_cache(cfg)))
        return 0
    from dit.train import train

    final = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # one line from the launch, not one per process
        print(str(final))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dit",
        description="Text-to-image and text-to-video generation and training with diffusion transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = sub.add_parser(
        "generate", help="generate videos or images from text prompts",
        description="Generate a video (or image) per prompt. Without --model, the embedded demo model is used.",
    )
    gen.add_argument("prompt", nargs="?", help="the text prompt (or use --prompts-file)")
    gen.add_argument("-o", "--output", help="output file (one prompt) or folder (default: outputs/)")
    gen.add_argument("--prompts-file", help="prompts, one per line (.txt) or JSON objects per line (.jsonl) with "
                     "prompt and optional seed, negative_prompt, height, width, frames")
    gen.add_argument("--model", help="a diffusers-format pipeline folder (CogVideoX); default: the embedded demo")
    gen.add_argument("--negative-prompt", help="what to steer away from (with --guidance > 1)")
    gen.add_argument("--frames", type=_positive_int, help="frame count (1 + 4n for CogVideoX VAEs)")
    gen.add_argument("--height", type=_positive_int, help="height in pixels")
    gen.add_argument("--width", type=_positive_int, help="width in pixels")
    gen.add_argument("--steps", type=_positive_int, help="sampling steps (default: the model's, else 50)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 disables)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (batch item i uses seed + i unless given)")
    gen.add_argument("--fps", type=_positive_int, help="frames per second of the written video")
    gen.add_argument("--format", choices=FORMATS, help="output format when -o is a folder (default mp4)")
    gen.add_argument("--solver", help="override the model's sampler: ddim, euler, heun, dpmpp_2m, cogvideox_dpm")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations dtype")
    gen.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    gen.add_argument("--offload", action="store_true", help="keep models on the CPU until used (GPU memory saver)")
    gen.add_argument("--relay", type=_positive_int, help="relay super-resolution factor (e.g. 2), if the model has a relay stage")
    gen.add_argument("--overwrite", action="store_true", help="replace outputs that exist (default: skip them)")
    gen.add_argument("--ulysses-degree", type=_positive_int, default=1,
                     help="context parallelism over attention heads (under torchrun; must divide the head count)")
    gen.add_argument("--ring-degree", type=_positive_int, default=1,
                     help="ring attention degree (under torchrun); cfg x ring x ulysses = number of processes")
    gen.add_argument("--cfg-degree", type=int, choices=(1, 2), default=1,
                     help="2: the unconditional and conditional halves of guidance on two process groups "
                          "(under torchrun; needs --guidance > 1)")
    gen.set_defaults(func=cmd_generate)
    train = sub.add_parser("train", help="train a model from a YAML config (run under `accelerate launch`)",
                           description="Train from a strict YAML config.")
    train.add_argument("config", help="path to a training YAML config")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.steps=10 (value read as YAML; repeatable)")
    train.add_argument("--build-cache", action="store_true",
                       help="encode the data into data.cache (latents and text embeddings) and exit")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (CLIError, ValueError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"dit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dit: interrupted; finished outputs are kept, rerun to continue", file=sys.stderr)
        return 130
