"""The `dit` command line: `dit generate` (text to video / image; dit.generate) and `dit train` (under
accelerate launch).

Bad input is a one-line `dit: error: ...` on stderr and exit code 2, before any model is loaded where the
check allows it.
"""

from __future__ import annotations

import argparse
import os
import sys

from dit.generate import DTYPES, generate, quiet_libraries
from dit.requests import FORMATS, UsageError, user_input


def cmd_train(args: argparse.Namespace) -> int:
    from dit.train.config import load_config, parse_overrides

    with user_input():
        cfg = load_config(args.config, overrides=parse_overrides(args.set or []))
    quiet_libraries()
    if args.build_cache:
        from dit.train.cache import build_cache

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--build-cache runs in one process: use `python -m dit train CONFIG --build-cache`")

        with user_input():
            folder = build_cache(cfg)
        print(str(folder))
        return 0
    from dit.train import train

    # dit train checks its data, checkpoints, output folder and parallel layout before the first step, and its
    # ValueErrors are those checks (a second run on a locked output_dir, a checkpoint of another world size).
    with user_input():
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


def _tile_size(text: str) -> tuple[int, int]:
    """--vae-tile: "H" (square) or "HxW", in pixels."""
    parts = text.lower().split("x")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"expected H or HxW in pixels (e.g. 256 or 240x416), got {text!r}")
    size = tuple(_positive_int(p) for p in parts)
    return (size[0], size[-1])


def _class_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class id (an integer from 0), got {text!r}; a class name "
                                         "goes in the PROMPT") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a class id (an integer from 0), got {value}")
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
    _request_arguments(gen)
    _sampling_arguments(gen)
    _execution_arguments(gen)
    gen.set_defaults(func=generate)
    train = sub.add_parser("train", help="train a model from a YAML config (run under `accelerate launch`)",
                           description="Train from a strict YAML config.")
    train.add_argument("config", help="path to a training YAML config")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.steps=10 (value read as YAML; repeatable)")
    train.add_argument("--build-cache", action="store_true",
                       help="encode the data into data.cache (latents and text embeddings) and exit")
    train.set_defaults(func=cmd_train)
    return parser


def _request_arguments(gen: argparse.ArgumentParser) -> None:
    """What to generate and where to write it: prompts, model, conditioning, outputs."""
    gen.add_argument("prompt", nargs="?", help="the text prompt (or use --prompts-file); for a class-conditional "
                     "DiT folder, a class name of its id2label (e.g. 'golden retriever')")
    gen.add_argument("-o", "--output", help="output file (one prompt) or folder (default: outputs/)")
    gen.add_argument("--prompts-file", help="prompts, one per line (.txt) or JSON objects per line (.jsonl) with "
                     "prompt and optional seed, negative_prompt, height, width, frames")
    gen.add_argument("--model", help="a diffusers-format pipeline folder: video (CogVideoXPipeline, WanPipeline: Wan "
                     "2.1, 2.2; WanImageToVideoPipeline with --image) or image (StableDiffusion3Pipeline: SD3, "
                     "SD3.5; CogView3PlusPipeline; DiTPipeline); default: the embedded demo")
    gen.add_argument("--image", metavar="PATH", help="the first frame for image-to-video (png, jpg or webp): "
                     "WanImageToVideoPipeline folders (Wan 2.1 I2V, Wan 2.2 I2V A14B) and Wan 2.2 TI2V-5B")
    gen.add_argument("--class", dest="class_labels", action="append", type=_class_id, metavar="N",
                     help="a class id for a class-conditional DiT folder (instead of a PROMPT naming the class); "
                          "repeat for several (item i uses --seed + i)")
    gen.add_argument("--num-images", type=_positive_int, default=1, metavar="N",
                     help="outputs per prompt (images, or clips of a video model): output j uses the prompt's "
                          "seed + j, each with its own file and sidecar")
    gen.add_argument("--negative-prompt", help="what to steer away from (with --guidance > 1)")


def _sampling_arguments(gen: argparse.ArgumentParser) -> None:
    """Size, steps, guidance, seed and output format of each request."""
    gen.add_argument("--frames", type=_positive_int, help="frame count (1 + 4n for CogVideoX and Wan VAEs); image "
                     "models make one; a video model writing png or jpg without --frames makes one frame")
    gen.add_argument("--height", type=_positive_int, help="height in pixels")
    gen.add_argument("--width", type=_positive_int, help="width in pixels")
    gen.add_argument("--steps", type=_positive_int, help="sampling steps (default: the model's, else 50; 28 for "
                     "SD3)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 disables; default: the "
                     "model's, else 6 for CogVideoX, 5 for Wan and CogView3-Plus, 7 for SD3, 4 for DiT)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (batch item i uses seed + i unless given)")
    gen.add_argument("--fps", type=_positive_int, help="frames per second of the written video")
    gen.add_argument("--format", choices=FORMATS, help="output format when -o is a folder (default: mp4 for video "
                     "models, png for image models); png, webp, jpg write a one-frame request as one picture")
    gen.add_argument("--solver", help="override the model's sampler: ddim, euler, heun, dpmpp_2m, cogvideox_dpm, "
                     "unipc")


def _execution_arguments(gen: argparse.ArgumentParser) -> None:
    """How the request runs: dtype, device, kernels, relay, caching, parallelism."""
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations dtype")
    gen.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    gen.add_argument("--offload", action="store_true", help="keep models on the CPU until used (GPU memory saver)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile each transformer block (regional: compiled once at the first step, then "
                          "reused by every block and step; composes with --cache, --offload and context parallelism)")
    gen.add_argument("--attention", metavar="BACKEND",
                     help="attention kernel: auto (fastest installed for the dtype and device), sdpa (default), "
                          "sdpa_flash, sdpa_cudnn, sdpa_efficient, flash (flash_attn 2), flash3, sage, xformers, math")
    gen.add_argument("--vae-tile", type=_tile_size, metavar="HxW",
                     help="decode in exact spatial tiles of at most H x W pixels, one at a time (Wan VAEs; the same "
                          "frames as without, the decode's memory that of one tile; e.g. 256 or 240x416)")
    gen.add_argument("--relay", type=_positive_int,
                     help="relay super-resolution factor (e.g. 2): a second stage at k x height, k x width from "
                          "the upsampled result (CogVideoX, Wan, SD3, CogView3-Plus)")
    gen.add_argument("--cache", metavar="SPEC",
                     help="step caching: fbc:THRESHOLD (First Block Cache, e.g. fbc:0.1; options ,warmup=N,final=N) "
                          "or mag:THRESHOLD (MagCache, with the folder's calibrated mag_ratios); the sidecar records "
                          "which steps ran the transformer")
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
    except UsageError as e:  # only what user_input and the checks call user errors; other bugs keep a traceback
        print(f"dit: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # non-finite latents or frames: not bad input, but nothing was written
        print(f"dit: error: {_first_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dit: interrupted; finished outputs are kept, rerun to continue", file=sys.stderr)
        return 130
