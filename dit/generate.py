"""`dit generate`: text (or an image, or a class) to videos and images, for every pipeline family with the
generation hooks (dit.pipeline.generate_pipeline_class): the video families, and the image families
(`output_kind = "image"`: SD3 / SD3.5, CogView3-Plus, class-conditional DiT), whose requests are one picture each.

Every check that needs no weights runs first (`_plan`): requests, the folder's family, sizes, formats, devices,
parallel degrees, memory. Bad input is a UsageError (one line, exit 2 from the command line). Outputs are written
atomically with a JSON sidecar, never overwritten without --overwrite, and a rerun skips outputs already written,
so an interrupted batch resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from dit.outputs import STILL_FORMATS, atomic_write_json, remove_stale_temps, sidecar_path, write_image, write_video
from dit.requests import (EMBEDDED_MODEL_NAME, Request, UsageError, check_seed, check_writable, generation_defaults,
                          model_folder, needs_generating, output_format, output_paths, per_prompt, read_image,
                          read_prompts, relay_defaults, user_input)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


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


def _check_memory(folder: Path, todo: list, args: argparse.Namespace, guidance: float, family: type) -> None:
    """Refuse, before any weights load, a request whose estimated memory exceeds what is free (--force skips)."""
    from dit.estimate import GiB, available_bytes, largest_fitting, video_request_bytes, video_shape

    budget = None if args.force else available_bytes(args.device)
    if budget is None:
        return
    shape, nbytes = video_shape(folder), DTYPE_BYTES[args.dtype]
    for r, _, _ in todo:
        opts = dict(relay=args.relay, guidance=guidance, dtype_bytes=nbytes, vae_tile=getattr(args, "vae_tile", None))
        need = video_request_bytes(shape, r.height, r.width, r.frames, **opts)
        if need <= budget:
            continue
        frames, size = largest_fitting(shape, r.height, r.width, r.frames, budget=budget, **opts)
        if getattr(family, "fixed_size", False):  # a model of one size (DiT): no other size to offer
            size = None
        fits = [f"--frames {frames} at {r.height}x{r.width}" if frames and r.frames > 1 else "",
                f"{size[0]}x{size[1]}" + (f" at {r.frames} frames" if r.frames > 1 else "") if size else ""]
        fits = " or ".join(f for f in fits if f) or ("no frame count or size (the weights alone do not fit)"
                                                    if r.frames > 1 else "no size (the weights alone do not fit)")
        asked = f"{r.height}x{r.width}" + (f", {r.frames} frames" if r.frames > 1 else "")
        raise UsageError(f"{asked}{f', relay {args.relay}x' if args.relay else ''} "
                         f"needs about {need / GiB:.1f} GiB but {budget / GiB:.1f} GiB is free on {args.device}; "
                         f"what fits: {fits} (--force tries anyway)")


def _requests(args: argparse.Namespace) -> list[Request]:
    """The requests: a PROMPT, a prompt file, or class ids (--class, for class-conditional models), with the
    command line's sizes where a line gives none."""
    given = [what for what, value in (("a PROMPT", args.prompt), ("--prompts-file", args.prompts_file),
                                      ("--class", args.class_labels)) if value is not None]
    if not given:
        raise UsageError("give a PROMPT or --prompts-file FILE (or, for a class-conditional DiT, --class N)")
    if len(given) > 1:
        raise UsageError(f"give one of {' or '.join(given)}, not both")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("the prompt is empty")
    check_seed(args.seed)
    if args.prompts_file:
        requests = read_prompts(Path(args.prompts_file), args.seed)
    elif args.class_labels is not None:  # the prompt becomes the class's name once the folder is read
        requests = [Request(prompt="", seed=check_seed(args.seed + i, f"--seed {args.seed} + {i} (--class {n})"),
                            class_label=n) for i, n in enumerate(args.class_labels)]
    else:
        requests = [Request(prompt=args.prompt, seed=args.seed, negative_prompt=args.negative_prompt)]
    for r in requests:
        r.negative_prompt = r.negative_prompt if r.negative_prompt is not None else args.negative_prompt
        r.height, r.width, r.frames = r.height or args.height, r.width or args.width, r.frames or args.frames
    return requests


def _is_image_family(family: type) -> bool:
    return getattr(family, "output_kind", "video") == "image"


def _family(folder: Path, args: argparse.Namespace) -> type:
    """The folder's pipeline class (from model_index.json; a folder of a family `dit generate` does not run is a
    one-line error), and what the family cannot do refused before loading: --relay without a relay stage, --image
    on a text-only folder, no --image on an image-to-video folder. With --image, the class that runs the folder
    from an image (Wan 2.2 TI2V-5B's WanPipeline folder runs either way)."""
    from dit.pipeline import generate_pipeline_class

    family = generate_pipeline_class(folder)
    kind = "text-to-image" if _is_image_family(family) else "text-to-video"
    if args.image is not None:
        image_family = getattr(family, "image_family", None)
        image_family = image_family(folder) if image_family is not None else None
        if image_family is None:
            raise UsageError(f"--image: {str(folder)!r} holds a {kind} {family.diffusers_class_name}; --image "
                             "takes image-to-video folders (WanImageToVideoPipeline, Wan 2.2 TI2V-5B)")
        family = image_family
    elif getattr(family, "requires_image", False):
        raise UsageError(f"{str(folder)!r} holds an image-to-video {family.diffusers_class_name}: give its first "
                         "frame with --image PATH (png, jpg or webp)")
    if args.relay and not family.supports_relay:
        raise UsageError(f"--relay {args.relay}: {family.diffusers_class_name} folders have no relay stage yet; drop "
                         "--relay (--height and --width set the size)")
    return family


def _classes(requests: list[Request], folder: Path, family: type) -> None:
    """A class-conditional family reads each request's class (a name of the folder's id2label, or --class N) from
    the folder's files; the other families take text, so --class is refused there."""
    check = getattr(family, "check_folder_prompt", None)
    for r in requests:
        if check is not None:
            r.prompt, r.class_label = check(folder, r.prompt, r.negative_prompt, r.class_label)
        elif r.class_label is not None:
            raise UsageError(f"--class {r.class_label}: {str(folder)!r} holds a {family.diffusers_class_name}, which "
                             "takes a text PROMPT; --class is for class-conditional DiT folders (DiTPipeline)")


def _output_format(args: argparse.Namespace, family: type) -> str:
    """The outputs' format (-o's extension, --format, else png for image models and mp4 for video models); an
    image model writes pictures only."""
    fmt = output_format(args.output, args.format, "png" if _is_image_family(family) else "mp4")
    if _is_image_family(family) and fmt not in STILL_FORMATS:
        where = f"-o {args.output}" if args.output and Path(args.output).suffix.lstrip(".").lower() == fmt \
            else f"--format {fmt}"
        raise UsageError(f"{where}: a {family.diffusers_class_name} folder makes images; accepted: "
                         f"{', '.join(STILL_FORMATS)}")
    return fmt


def _sizes(requests: list[Request], folder: Path, family: type, fmt: str, defaults: dict, relay: int | None) -> None:
    """Each request's size and frame count, filled from the defaults and checked by the family against the
    folder's configs. A picture format (png, jpg) asked of a video model without a frame count is one frame."""
    for r in requests:
        if r.frames is None and fmt in ("png", "jpg", "jpeg") and not _is_image_family(family):
            r.frames = 1  # `-o image.png` from a video model: an image, i.e. --frames 1
        r.height = r.height or defaults.get("height")
        r.width = r.width or defaults.get("width")
        r.frames = r.frames or defaults.get("num_frames")
        r.height, r.width, r.frames = family.check_folder_request(folder, r.height, r.width, r.frames)
        if fmt in ("jpg", "jpeg") and r.frames > 1:
            raise UsageError(f"{fmt} holds one picture, but the request has {r.frames} frames; give --frames 1, or "
                             "a video format (mp4, gif, webp, or png: a folder of frames)")
        check_relay = getattr(family, "check_folder_relay", None)
        if relay and check_relay is not None:
            check_relay(folder, r.height, r.width, relay)


def _check_parallel_support(folder: Path, family: type) -> None:
    """Under torchrun every denoiser runs context parallel: its class (from the folder's config) must have our
    enable_parallelism (dit.parallel; diffusers' ModelMixin has another of that name), or the run is refused
    before any weights load."""
    from dit.convert import TRANSFORMER_CLASSES, read_folder_json, resolve, transformer_class_name
    from dit.parallel.model import ContextParallelMixin

    for role in ("transformer", "transformer_2"):
        if not (folder / role / "config.json").is_file():
            continue
        config = read_folder_json(folder / role, what="a transformer config")
        name = transformer_class_name(config, folder / role)
        if not issubclass(resolve(TRANSFORMER_CLASSES[name]), ContextParallelMixin):
            raise UsageError(f"{family.diffusers_class_name}: the {name} has no context parallelism yet; run in one "
                             "process (without torchrun)")


def _plan(args: argparse.Namespace) -> tuple[Path, list[tuple[Request, Path]], dict]:
    """Every check that needs no weights: requests, the model folder, output paths, settings, the device."""
    requests = _requests(args)
    folder = model_folder(args.model)
    family = _family(folder, args)
    _classes(requests, folder, family)
    fmt = _output_format(args, family)
    defaults = {**family.generation_defaults, **generation_defaults(folder)}  # the folder's file wins
    settings = {"steps": args.steps or defaults.get("num_inference_steps", 50),
                "guidance": args.guidance if args.guidance is not None else defaults.get("guidance_scale", 6.0),
                "fps": args.fps or defaults.get("fps", 8), "relay_options": relay_defaults(defaults),
                "family": family, "image": None, "image_sha256": None}
    if args.image is not None:
        settings["image"], settings["image_sha256"] = read_image(args.image)
    _check_guidance(settings["guidance"], args.cfg_degree)
    settings["cache"] = _cache(args.cache, defaults)
    if args.solver is not None:
        import samplers

        samplers.get_solver(args.solver)  # an unknown name: one line naming the accepted ones
    settings["world"] = _check_parallel_degrees(args)
    if settings["world"] > 1:
        _check_parallel_support(folder, family)
    _check_device(args.device)
    _check_attention(getattr(args, "attention", None), args.device)
    if args.offload and not args.device.startswith("cuda"):
        raise UsageError(f"--offload moves models between CPU and GPU; it needs --device cuda, got --device "
                         f"{args.device}")
    _check_vae_tile(getattr(args, "vae_tile", None), folder, settings["world"])
    _sizes(requests, folder, family, fmt, defaults, args.relay)  # before any weights load
    requests, indices = per_prompt(requests, args.num_images)
    paths = output_paths(requests, args.output, fmt, indices=indices, per_request=args.num_images)
    for parent in {p.parent for p in paths}:
        check_writable(parent)
    return folder, list(zip(requests, paths)), settings


def _check_vae_tile(tile: tuple[int, int] | None, folder: Path, world: int) -> None:
    """--vae-tile: exact tiles are the Wan VAE's (a folder's AutoencoderKLWan, which we load as WanVAE3D), in
    multiples of its spatial compression, in one process (under torchrun the decode is time-sharded instead)."""
    if tile is None:
        return
    from dit.convert import read_folder_json
    from vae3d.streaming import nearest_multiples
    from vae3d.wan_model import spatial_factor

    config = read_folder_json(folder / "vae", what="a VAE config")
    name = config.get("_class_name")
    if name != "AutoencoderKLWan":
        raise UsageError(f"--vae-tile: exact tiles are the Wan VAE's (AutoencoderKLWan); this model's VAE is {name}, "
                         "whose normalisation spans the frame")
    if world > 1:
        raise UsageError("--vae-tile decodes in one process; under torchrun the VAE decode is time-sharded instead: "
                         "drop --vae-tile or run without torchrun")
    scale = spatial_factor(config.get("dim_mult", (1, 2, 4, 4)), config.get("patch_size"))  # WanVAE3D's
    for name, v in zip(("height", "width"), tile):
        if v % scale:
            near = " or ".join(map(str, nearest_multiples(v, scale)))
            raise UsageError(f"--vae-tile {tile[0]}x{tile[1]}: the tile {name} {v} is not a multiple of the VAE's "
                             f"spatial compression {scale}; nearest valid: {near}")


def _check_attention(backend: str | None, device: str) -> None:
    """--attention: a kernel that is installed here and runs on --device (its dtype and head size are checked at
    the first step, with the same error naming what would run)."""
    if backend is None:
        return
    from dit.attention import KERNELS, canonical, resolve_backend

    try:
        name = resolve_backend(backend)
    except ValueError as e:
        raise UsageError(f"--attention {backend}: {e}") from None
    devices = KERNELS[name].devices if name in KERNELS else ("cpu", "cuda")
    if device.split(":")[0] not in devices:
        raise UsageError(f"--attention {backend}: the {canonical(backend)} kernel runs on "
                         f"{' / '.join(d for d in devices if d != 'meta')}, not --device {device}; use --attention "
                         "auto or sdpa")


def _cache(spec: str | None, defaults: dict):
    """--cache as a dit.cache config (MagCache takes the model's `mag_ratios` from generation_config.json)."""
    if spec is None:
        return None
    from dit.cache import parse_cache

    try:
        return parse_cache(spec, defaults.get("mag_ratios"))
    except ValueError as e:
        raise UsageError(f"--cache {spec}: {e}") from None


def _is_still(path: Path, frames: int) -> bool:
    """Whether an output is one picture file: a picture format and a request of one frame."""
    return frames == 1 and path.suffix.lstrip(".").lower() in STILL_FORMATS


def _record(r: Request, path: Path, args: argparse.Namespace, folder_name: str, settings: dict) -> dict:
    """The sidecar: what was asked (compared on resume) and the run keys (RUN_KEYS, filled in when written). A
    picture has no fps; a class-conditional request records its class id."""
    request = {k: v for k, v in asdict(r).items() if k != "class_label" or v is not None}
    return {
        **request, "model": folder_name, "steps": settings["steps"], "guidance": settings["guidance"],
        **({} if _is_still(path, r.frames) else {"fps": settings["fps"]}),
        "dtype": args.dtype, "solver": args.solver, "relay": args.relay,
        **({"cache": args.cache} if args.cache else {}),
        **(settings["relay_options"] if args.relay else {}),
        **({"image": args.image, "image_sha256": settings["image_sha256"]} if args.image is not None else {}),
    }


def generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    quiet_libraries()  # before the pipelines are imported: transformers' import-time notices are noise here too
    with user_input():
        folder, todo, settings = _todo(args)
        if todo:
            _check_memory(folder, todo, args, settings["guidance"], settings["family"])
            pipe = _load(folder, args, todo, settings["family"])
    if not todo:
        return 0
    steps, guidance, family = settings["steps"], settings["guidance"], settings["family"]
    image = {"image": settings["image"]} if settings["image"] is not None else {}  # the first frame (I2V)
    request_kwargs = getattr(family, "request_kwargs", _video_request_kwargs)
    with _parallel(pipe, args, settings["world"]) as writer:
        with user_input():
            for r, _, _ in todo:  # every request against the loaded model before generating anything
                pipe.check_request(r.prompt, r.negative_prompt, r.height, r.width, r.frames, steps, guidance, **image)
        for r, path, record in tqdm(todo, desc="prompts", unit="sample", disable=len(todo) == 1):
            start = time.perf_counter()
            _shard_vae_decode(pipe, r.frames)
            out = pipe(**request_kwargs(r.prompt, r.negative_prompt, r.height, r.width, r.frames, r.class_label),
                       num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator(device="cpu").manual_seed(r.seed), output_type="np", **image,
                       **({"solver": args.solver} if args.solver else {}),
                       **({"relay": args.relay, **settings["relay_options"]} if args.relay else {}),
                       **({"cache": settings["cache"]} if settings["cache"] is not None else {}))
            reports = pipe.pop_cache_reports()  # one per denoising run (relay: two)
            frames = out.images[0][None] if _is_image_family(family) else out.frames[0]  # (F, H, W, 3)
            if writer:  # under torchrun every rank computes the same frames; rank 0 writes them
                _write_output(frames, path, {
                    **record, "seconds": round(time.perf_counter() - start, 3), "output": path.name,
                    "version": _version(), "context_parallel": [args.ring_degree, args.ulysses_degree],
                    "cfg_parallel": args.cfg_degree, **({"cache_report": [
                        {k: v for k, v in rep.items() if k != "mag_ratios"} for rep in reports]} if reports else {})},
                    settings["fps"], args.overwrite)
    return 0


def _video_request_kwargs(prompt: str, negative_prompt: str | None, height: int, width: int, num_frames: int,
                           class_label: int | None = None) -> dict:
    """A video family's call arguments for one request (image families have their own `request_kwargs`)."""
    return {"prompt": prompt, "negative_prompt": negative_prompt, "height": height, "width": width,
            "num_frames": num_frames}


def _todo(args: argparse.Namespace) -> tuple[Path, list, dict]:
    """The checked plan and the requests whose outputs must be (re)generated, each with its sidecar record."""
    folder, requests, settings = _plan(args)
    # The embedded model by name: its install path says nothing to whoever reads the sidecar elsewhere.
    folder_name = str(folder) if args.model is not None else EMBEDDED_MODEL_NAME
    todo = [(r, p, rec) for r, p in requests
            if needs_generating(p, rec := _record(r, p, args, folder_name, settings), args.overwrite)]
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
    if getattr(args, "attention", None) is not None:
        for model in {id(m): m for m in [*pipe.denoisers(), getattr(pipe, "relay_transformer", None)]
                      if m is not None}.values():
            model.set_attention_backend(args.attention)
    if getattr(args, "compile", False):
        pipe.enable_compile()  # after the backend: compilation happens at the first step
    if getattr(args, "vae_tile", None) is not None:
        pipe.vae.enable_exact_tiling(*args.vae_tile)
    if args.offload:
        pipe.enable_model_cpu_offload(device=args.device)
    else:
        pipe.to(args.device)
    return pipe


def _write_output(frames, path: Path, record: dict, fps: int, overwrite: bool) -> None:
    """The sidecar, then the output (frames (F, H, W, 3): one picture file, or a clip): a kill in between leaves
    a sidecar without its output, which a rerun redoes."""
    import numpy as np

    if not np.isfinite(frames).all():
        raise FloatingPointError(f"the decoded frames of {path.name} are not finite (NaN or inf); nothing was written")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sidecar_path(path), record, replace_link=overwrite)
    if _is_still(path, len(frames)):
        write_image(frames[0], path, replace_link=overwrite)
    else:
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
        if args.device.startswith("cuda"):
            # This rank's GPU (cuda:LOCAL_RANK, set by _load) is the current device and the one NCCL binds its
            # communicators to, eagerly: nothing runs on another rank's GPU or through the CPU.
            device = torch.device(args.device if ":" in args.device else f"cuda:{torch.cuda.current_device()}")
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
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
    decodes the whole clip. Both of our vae3d VAEs shard: CogVideoX's CausalVAE3D (frame batches of 2 latent
    frames, the remainder in the first) and Wan's WanVAE3D (the image frame, then one latent frame per batch); a
    VAE that is not ours (one passed to the pipeline) decodes whole on each rank."""
    import torch.distributed as dist

    from dit.parallel import ContextParallelConfig
    from vae3d.autoencoder import CausalAutoencoder
    from vae3d.streaming import frame_batches

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    vae = pipe.vae
    if not isinstance(vae, CausalAutoencoder):
        return
    latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    batches = len(frame_batches(latent_frames, vae.num_latent_frames_batch_size, vae.frame_batching))
    world = dist.get_world_size()
    if batches >= world:
        vae.enable_parallelism(ContextParallelConfig(ring_degree=1, ulysses_degree=world), norm_stats="parity")
    else:
        vae.disable_parallelism()


def quiet_libraries() -> None:
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
