"""Step caching on the embedded demo model: block evaluations, wall time, fidelity and prompt-grid accuracy.

For each cache setting, the same grid prompts with the same seeds as the uncached run (our transformer, no cache):
transformer block evaluations, wall time, PSNR of each cached clip against its uncached one (mean over prompts,
frames in [0, 1]), and the grid's success rates. Ours (dit.cache on our transformer, through the pipeline's
`cache=`) against diffusers' First Block Cache (`enable_cache(FirstBlockCacheConfig)`) on diffusers'
CogVideoXTransformer3DModel loaded from the same folder and run by the same pipeline. Prints one JSON line.

Run: `python -m bench.cache` (every 10th grid prompt) or `--every 1` for the whole grid; `--quick` for a smoke run.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
import torch

from bench.common import emit
from dit.demo.evaluate import evaluate_clip, prompt_grid, summarize_scores


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


class _BlockCounter:
    """Counts transformer blocks that really ran: our blocks are called only when computed; diffusers' cache hooks
    replace a skipped block's forward, so its inner norm1 is what runs only when computed."""

    def __init__(self, transformer: torch.nn.Module, diffusers: bool) -> None:
        self.count = 0
        for block in transformer.transformer_blocks:
            (block.norm1 if diffusers else block).register_forward_pre_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1


def _generate(pipe, grid, defaults: dict, seed: int, batch: int, **kwargs: Any) -> tuple[list[np.ndarray], float]:
    clips, start = [], time.perf_counter()
    for i in range(0, len(grid), batch):
        chunk = grid[i:i + batch]
        generators = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        out = pipe(prompt=[g.prompt for g in chunk], num_inference_steps=defaults["num_inference_steps"],
                   guidance_scale=defaults["guidance_scale"], height=defaults["height"], width=defaults["width"],
                   num_frames=defaults["num_frames"], generator=generators, output_type="np", **kwargs)
        clips.extend(out.frames)
    return clips, time.perf_counter() - start


def _grade(grid, clips) -> dict[str, float]:
    scores = [evaluate_clip(c).score(g.attributes) for g, c in zip(grid, clips)]
    return summarize_scores(scores)


def _row(name: str, grid, clips, seconds: float, blocks: int, reference: list[np.ndarray] | None) -> dict:
    row = {"setting": name, "block_evaluations": blocks, "seconds": round(seconds, 2), "grid": _grade(grid, clips)}
    if reference is not None:
        row["psnr_db"] = round(float(np.mean([min(_psnr(a, b), 99.0) for a, b in zip(clips, reference)])), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=10, help="every N-th grid prompt (1: all 550)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5, 0.8],
                        help="First Block Cache thresholds")
    parser.add_argument("--mag-thresholds", type=float, nargs="+", default=[0.02, 0.06, 0.15, 0.3, 0.6],
                        help="MagCache thresholds (ratios calibrated on the first batch of prompts)")
    parser.add_argument("--batch", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 prompts, two thresholds")
    args = parser.parse_args()
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    from dit.cache import FirstBlockCache, MagCache, MagCalibration
    from dit.pipeline import DiTPipeline
    from dit.requests import DEMO_MODEL, generation_defaults

    defaults = generation_defaults(DEMO_MODEL)
    grid = prompt_grid()[::args.every][:4 if args.quick else None]
    thresholds = args.thresholds[:2] if args.quick else args.thresholds
    mag_thresholds = args.mag_thresholds[:1] if args.quick else args.mag_thresholds
    pipe = DiTPipeline.from_pretrained(DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    ours = pipe.transformer
    theirs = CogVideoXTransformer3DModel.from_pretrained(DEMO_MODEL / "transformer", use_safetensors=True).eval()
    counters = {"ours": _BlockCounter(ours, False), "diffusers": _BlockCounter(theirs, True)}

    def run(which: str, name: str, reference, **kwargs) -> tuple[dict, list[np.ndarray]]:
        pipe.transformer = ours if which == "ours" else theirs
        counters[which].count = 0
        clips, seconds = _generate(pipe, grid, defaults, 0, args.batch, **kwargs)
        return _row(name, grid, clips, seconds, counters[which].count, reference), clips

    _generate(pipe, grid[:args.batch], defaults, 0, args.batch, cache=MagCalibration())  # MagCache's ratios
    ratios = pipe.pop_cache_reports()[0]["mag_ratios"]
    base, reference = run("ours", "uncached", None)
    rows = [base]
    for t in thresholds:
        rows.append(run("ours", f"ours fbc:{t}", reference, cache=FirstBlockCache(t))[0])
        theirs.enable_cache(FirstBlockCacheConfig(threshold=t))
        rows.append(run("diffusers", f"diffusers FirstBlockCacheConfig({t})", reference)[0])
        theirs.disable_cache()
    for t in mag_thresholds:
        rows.append(run("ours", f"ours mag:{t}", reference, cache=MagCache(t, tuple(ratios)))[0])
        theirs.enable_cache(MagCacheConfig(threshold=t, mag_ratios=ratios, num_inference_steps=len(ratios)))
        rows.append(run("diffusers", f"diffusers MagCacheConfig({t})", reference)[0])
        theirs.disable_cache()
    emit({"bench": "cache", "prompts": len(grid), "steps": defaults["num_inference_steps"],
          "layers": ours.config.num_layers, "mag_ratios": [round(r, 4) for r in ratios], "rows": rows})


if __name__ == "__main__":
    main()
