"""The `dit` command line: `dit generate` (text to video / image) and `dit train` (under accelerate launch).

Bad input is a one-line `dit: error: ...` on stderr and exit code 2, before any model is loaded where the
check allows it. Outputs are written atomically (temporary file, then rename) with a JSON sidecar, never
overwritten without --overwrite, and a rerun skips outputs already written, so an interrupted batch resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import asdict
from collections.abc import Iterator
from pathlib import Path

from dit.outputs import atomic_write_json, remove_stale_temps, sidecar_path, write_video
from dit.requests import (EMBEDDED_MODEL_NAME, FORMATS, Request, UsageError, check_seed,
                          check_writable, generation_defaults, model_folder, needs_generating, output_paths,
                          read_image, read_prompts, relay_defaults)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ----------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------


def _check_device(device: str) -> None:
    """A device torch can run on here, or a one-line error before any weights load."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device; e.g. cpu, cuda, cuda:1") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (0 to "
                             f"{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: accepted device types are cpu, cuda and mps")


def _check_guidance(guidance: float, cfg_degree: int) -> None:
    import samplers

    samplers.check_guidance_scale(guidance)
    if guidance < 1:
        raise UsageError(f"--guidance {guidance} is below 1, which runs as 1 (no classifier-free guidance); give "
                         "--guidance 1 for that, or a scale above 1")
    if cfg_degree == 2 and not guidance > 1:  # without guidance the batch has no second half to run
        raise UsageError(f"--cfg-degree 2 runs the two halves of classifier-free guidance; it needs --guidance > 1, "
                         f"got {guidance}")


def _check_memory(folder: Path, todo: list, args: argparse.Namespace, guidance: float) -> None:
    """Refuse, before any weights load, a request whose estimated memory exceeds what is free (--force skips)."""
    from dit.estimate import GiB, available_bytes, largest_fitting, video_request_bytes, video_shape

    budget = None if args.force else available_bytes(args.device)
    if budget is None:
        return
    shape, nbytes = video_shape(folder), DTYPE_BYTES[args.dtype]
    for r, _, _ in todo:
        opts = dict(relay=args.relay, guidance=guidance, dtype_bytes=nbytes)
        need = video_request_bytes(shape, r.height, r.width, r.frames, **opts)
        if need <= budget:
            continue
        frames, size = largest_fitting(shape, r.height, r.width, r.frames, budget=budget, **opts)
        fits = [f"--frames {frames} at {r.height}x{r.width}" if frames else "",
                f"{size[0]}x{size[1]} at {r.frames} frames" if size else ""]
        fits = " or ".join(f for f in fits if f) or "no frame count or size (the weights alone do not fit)"
        raise UsageError(f"{r.height}x{r.width}, {r.frames} frames{f', relay {args.relay}x' if args.relay else ''} "
                         f"needs about {need / GiB:.1f} GiB but {budget / GiB:.1f} GiB is free on {args.device}; "
                         f"what fits: {fits} (--force tries anyway)")


def _requests(args: argparse.Namespace) -> tuple[list[Request], list[Path]]:
    """The requests (a PROMPT or a prompt file, with the command line's sizes where a line gives none) and the
    output path of each, whose folders must be writable."""
    if args.prompt is None and args.prompts_file is None:
        raise UsageError("give a PROMPT or --prompts-file FILE")
    if args.prompt is not None and args.prompts_file is not None:
        raise UsageError("give either a PROMPT or --prompts-file, not both")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("the prompt is empty")
    check_seed(args.seed)
    requests = (read_prompts(Path(args.prompts_file), args.seed) if args.prompts_file
                else [Request(prompt=args.prompt, seed=args.seed, negative_prompt=args.negative_prompt)])
    for r in requests:
        r.negative_prompt = r.negative_prompt if r.negative_prompt is not None else args.negative_prompt
        r.height, r.width, r.frames = r.height or args.height, r.width or args.width, r.frames or args.frames
    paths = output_paths(requests, args.output, args.format)
    for folder in {p.parent for p in paths}:
        check_writable(folder)
    return requests, paths


def _video_family(folder: Path, args: argparse.Namespace) -> type:
    """The folder's video pipeline class (from model_index.json; an image pipeline folder is a one-line error),
    and what the family cannot do refused before loading: --relay without a relay stage, --image on a text-only
    folder, no --image on an image-to-video folder. With --image, the class that runs the folder from an image
    (Wan 2.2 TI2V-5B's WanPipeline folder runs either way)."""
    from dit.pipeline import video_pipeline_class

    family = video_pipeline_class(folder)
    if args.image is not None:
        image_family = getattr(family, "image_family", None)
        image_family = image_family(folder) if image_family is not None else None
        if image_family is None:
            raise UsageError(f"--image: {str(folder)!r} holds a text-to-video {family.diffusers_class_name}; --image "
                             "takes image-to-video folders (WanImageToVideoPipeline, Wan 2.2 TI2V-5B)")
        family = image_family
    elif getattr(family, "requires_image", False):
        raise UsageError(f"{str(folder)!r} holds an image-to-video {family.diffusers_class_name}: give its first "
                         "frame with --image PATH (png, jpg or webp)")
    if args.relay and not family.supports_relay:
        raise UsageError(f"--relay {args.relay}: {family.diffusers_class_name} folders have no relay stage yet; drop "
                         "--relay (--height and --width set the size)")
    return family


def _plan(args: argparse.Namespace) -> tuple[Path, list[tuple[Request, Path]], dict]:
    """Every check that needs no weights: requests, output paths, the model folder, settings, the device."""
    requests, paths = _requests(args)
    folder = model_folder(args.model)
    family = _video_family(folder, args)
    defaults = {**family.generation_defaults, **generation_defaults(folder)}  # the folder's file wins
    settings = {"steps": args.steps or defaults.get("num_inference_steps", 50),
                "guidance": args.guidance if args.guidance is not None else defaults.get("guidance_scale", 6.0),
                "fps": args.fps or defaults.get("fps", 8), "relay_options": relay_defaults(defaults),
                "family": family, "image": None, "image_sha256": None}
    if args.image is not None:
        settings["image"], settings["image_sha256"] = read_image(args.image)
    _check_guidance(settings["guidance"], args.cfg_degree)
    if args.solver is not None:
        import samplers

        samplers.get_solver(args.solver)  # an unknown name: one line naming the accepted ones
    settings["world"] = _check_parallel_degrees(args)
    _check_device(args.device)
    if args.offload and not args.device.startswith("cuda"):
        raise UsageError(f"--offload moves models between CPU and GPU; it needs --device cuda, got --device "
                         f"{args.device}")
    for r in requests:  # sizes checked by the family from the folder's configs, before any weights load
        r.height = r.height or defaults.get("height")
        r.width = r.width or defaults.get("width")
        r.frames = r.frames or defaults.get("num_frames")
        r.height, r.width, r.frames = family.check_folder_request(folder, r.height, r.width, r.frames)
    return folder, list(zip(requests, paths)), settings


def _record(r: Request, args: argparse.Namespace, folder_name: str, settings: dict) -> dict:
    """The sidecar: what was asked (compared on resume) and the run keys (RUN_KEYS, filled in when written)."""
    return {
        **asdict(r), "model": folder_name, "steps": settings["steps"], "guidance": settings["guidance"],
        "fps": settings["fps"], "dtype": args.dtype, "solver": args.solver, "relay": args.relay,
        **(settings["relay_options"] if args.relay else {}),
        **({"image": args.image, "image_sha256": settings["image_sha256"]} if args.image is not None else {}),
    }


@contextlib.contextmanager
def _user_input() -> Iterator[None]:
    """ValueErrors raised inside come from checking what the user gave (arguments, files, the model folder, the
    request against the loaded model): they are reported as user errors (one line, exit 2). Elsewhere a
    ValueError is a bug and keeps its traceback."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from e


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    _quiet_libraries()  # before the pipelines are imported: transformers' import-time notices are noise here too
    with _user_input():
        folder, todo, settings = _todo(args)
        if todo:
            _check_memory(folder, todo, args, settings["guidance"])
            pipe = _load(folder, args, todo, settings["family"])
    if not todo:
        return 0
    steps, guidance = settings["steps"], settings["guidance"]
    image = {"image": settings["image"]} if settings["image"] is not None else {}  # the first frame (I2V)
    with _parallel(pipe, args, settings["world"]) as writer:
        with _user_input():
            for r, _, _ in todo:  # every request against the loaded model before generating anything
                pipe.check_request(r.prompt, r.negative_prompt, r.height, r.width, r.frames, steps, guidance, **image)
        for r, path, record in tqdm(todo, desc="prompts", unit="sample", disable=len(todo) == 1):
            start = time.perf_counter()
            _shard_vae_decode(pipe, r.frames)
            out = pipe(prompt=r.prompt, negative_prompt=r.negative_prompt, height=r.height, width=r.width,
                       num_frames=r.frames, num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator(device="cpu").manual_seed(r.seed), output_type="np", **image,
                       **({"solver": args.solver} if args.solver else {}),
                       **({"relay": args.relay, **settings["relay_options"]} if args.relay else {}))
            if writer:  # under torchrun every rank computes the same frames; rank 0 writes them
                _write_output(out.frames[0], path, {
                    **record, "seconds": round(time.perf_counter() - start, 3), "output": path.name,
                    "version": _version(), "context_parallel": [args.ring_degree, args.ulysses_degree],
                    "cfg_parallel": args.cfg_degree}, settings["fps"], args.overwrite)
    return 0


def _todo(args: argparse.Namespace) -> tuple[Path, list, dict]:
    """The checked plan and the requests whose outputs must be (re)generated, each with its sidecar record."""
    folder, requests, settings = _plan(args)
    # The embedded model by name: its install path says nothing to whoever reads the sidecar elsewhere.
    folder_name = str(folder) if args.model is not None else EMBEDDED_MODEL_NAME
    todo = [(r, p, rec) for r, p in requests
            if needs_generating(p, rec := _record(r, args, folder_name, settings), args.overwrite)]
    return folder, todo, settings


def _load(folder: Path, args: argparse.Namespace, todo: list, family: type):
    """Remove a killed run's temporaries beside the outputs, then load the folder as `family` (the pipeline
    class _plan chose) onto its device."""
    import torch

    for parent in {p.parent for _, p, _ in todo}:
        remove_stale_temps(parent)  # only those of dead processes
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.device == "cuda" and "LOCAL_RANK" in os.environ:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per torchrun process, not all on cuda:0
    pipe = family.from_pretrained(folder, torch_dtype=getattr(torch, DTYPES[args.dtype]))
    if args.offload:
        pipe.enable_model_cpu_offload(device=args.device)
    else:
        pipe.to(args.device)
    return pipe


def _write_output(frames, path: Path, record: dict, fps: int, overwrite: bool) -> None:
    """The sidecar, then the output: a kill in between leaves a sidecar without its output, which a rerun redoes."""
    import numpy as np

    if not np.isfinite(frames).all():
        raise FloatingPointError(f"the decoded frames of {path.name} are not finite (NaN or inf); nothing was written")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sidecar_path(path), record, replace_link=overwrite)
    write_video(frames, path, fps, replace_link=overwrite)
    print(str(path))


def _check_parallel_degrees(args: argparse.Namespace) -> int:
    """cfg x ring x ulysses against the torchrun world size (checked before any weights load); returns the world."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    degrees = args.cfg_degree * args.ring_degree * args.ulysses_degree
    product = (f"--cfg-degree {args.cfg_degree} x --ring-degree {args.ring_degree} x "
               f"--ulysses-degree {args.ulysses_degree}")
    if world == 1 and degrees != 1:
        raise UsageError(f"{product} = {degrees} processes; launch with "
                         "`torchrun --nproc_per_node N -m dit generate ...`")
    if world > 1 and degrees != world:
        raise UsageError(f"{product} = {degrees} must equal the torchrun world size {world}")
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

        for model in pipe.denoisers():  # Wan 2.2 A14B: both experts
            model.enable_parallelism(ContextParallelConfig(
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
    decodes the whole clip. Only our vae3d VAE shards: diffusers' (AutoencoderKLWan) decodes whole on each rank."""
    import torch.distributed as dist

    from dit.parallel import ContextParallelConfig
    from vae3d import CausalVAE3D
    from vae3d.streaming import frame_batches

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    vae = pipe.vae
    if not isinstance(vae, CausalVAE3D):
        return
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

    with _user_input():
        cfg = load_config(args.config, overrides=parse_overrides(args.set or []))
    _quiet_libraries()
    if args.build_cache:
        from dit.train.cache import build_cache

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--build-cache runs in one process: use `python -m dit train CONFIG --build-cache`")

        with _user_input():
            folder = build_cache(cfg)
        print(str(folder))
        return 0
    from dit.train import train

    # dit train checks its data, checkpoints, output folder and parallel layout before the first step, and its
    # ValueErrors are those checks (a second run on a locked output_dir, a checkpoint of another world size).
    with _user_input():
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
    gen.add_argument("--model", help="a diffusers-format video pipeline folder (CogVideoXPipeline, WanPipeline: Wan "
                     "2.1, 2.2; WanImageToVideoPipeline with --image); default: the embedded demo")
    gen.add_argument("--image", metavar="PATH", help="the first frame for image-to-video (png, jpg or webp): "
                     "WanImageToVideoPipeline folders (Wan 2.1 I2V, Wan 2.2 I2V A14B) and Wan 2.2 TI2V-5B")
    gen.add_argument("--negative-prompt", help="what to steer away from (with --guidance > 1)")
    gen.add_argument("--frames", type=_positive_int, help="frame count (1 + 4n for CogVideoX and Wan VAEs)")
    gen.add_argument("--height", type=_positive_int, help="height in pixels")
    gen.add_argument("--width", type=_positive_int, help="width in pixels")
    gen.add_argument("--steps", type=_positive_int, help="sampling steps (default: the model's, else 50)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 disables; default: the "
                     "model's, else 6 for CogVideoX, 5 for Wan)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (batch item i uses seed + i unless given)")
    gen.add_argument("--fps", type=_positive_int, help="frames per second of the written video")
    gen.add_argument("--format", choices=FORMATS, help="output format when -o is a folder (default mp4)")
    gen.add_argument("--solver", help="override the model's sampler: ddim, euler, heun, dpmpp_2m, cogvideox_dpm, "
                     "unipc")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations dtype")
    gen.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    gen.add_argument("--offload", action="store_true", help="keep models on the CPU until used (GPU memory saver)")
    gen.add_argument("--relay", type=_positive_int,
                     help="relay super-resolution factor (e.g. 2): CogVideoX folders (Wan has no relay stage yet)")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace outputs that exist (default: skip those made with the same settings)")
    gen.add_argument("--force", action="store_true",
                     help="run a request even when its estimated memory exceeds what is free")
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


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except UsageError as e:  # only what _user_input and the checks call user errors; other bugs keep a traceback
        print(f"dit: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # non-finite latents or frames: not bad input, but nothing was written
        print(f"dit: error: {_first_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dit: interrupted; finished outputs are kept, rerun to continue", file=sys.stderr)
        return 130
