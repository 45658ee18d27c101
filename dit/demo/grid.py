"""Grade a text-to-video pipeline on the prompt grid: `python -m dit.demo.grid [--model FOLDER] [--every N]`.

Each canonical prompt of the grid (colour x shape x motion x background; the held-out combinations included;
with `--frames 1` the image grid: colour x shape x background, image captions) is generated once, with its own
seed, and read back by `dit.demo.evaluate.evaluate_clip`. Prints JSON: success rates per attribute on the seen
and on the held-out combinations, and the settings used.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from dit.data.shapes import ShapesConfig
from dit.demo.evaluate import GridPrompt, evaluate_clip, prompt_grid, summarize_scores


def grade_pipeline(pipe, grid: list[GridPrompt], *, batch_size: int = 16, seed: int = 0,
                   **call_kwargs: Any) -> dict[str, Any]:
    """Generate every prompt of `grid` (batches of `batch_size`; prompt k draws its latents from a generator
    seeded seed + k, so results do not depend on the batching) and score it. `call_kwargs` go to the pipeline
    (steps, guidance, size, frames, relay: `dit.requests.sampling_defaults` gives a folder's own).

    Returns {"seen": rates, "heldout": rates (absent when the grid has none), "failures": [...]}, rates as
    `summarize_scores` gives them."""
    scores: dict[bool, list[dict[str, bool]]] = {False: [], True: []}
    failures = []
    for start in range(0, len(grid), batch_size):
        chunk = grid[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(chunk))]
        frames = pipe(prompt=[g.prompt for g in chunk], generator=generators, output_type="np",
                      **call_kwargs).frames  # (B, F, H, W, 3)
        for g, clip in zip(chunk, frames):
            estimate = evaluate_clip(clip)
            score = estimate.score(g.attributes)
            scores[g.heldout].append(score)
            if not all(score.values()):
                failures.append({"prompt": g.prompt, "heldout": g.heldout, "read": {
                    "colour": estimate.colour, "shape": estimate.shape, "background": estimate.background,
                    "motion": estimate.motion}})
    out: dict[str, Any] = {"seen": summarize_scores(scores[False])}
    if scores[True]:
        out["heldout"] = summarize_scores(scores[True])
    out["failures"] = failures
    return out


def main(argv: list[str] | None = None) -> int:
    from dit.requests import DEMO_MODEL, generation_defaults, relay_defaults, sampling_defaults
    from dit.pipeline import DiTPipeline

    parser = argparse.ArgumentParser(prog="python -m dit.demo.grid", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="pipeline folder (default: the embedded demo)")
    parser.add_argument("--every", type=int, default=1, help="grade every N-th prompt of the grid (1: all 550)")
    parser.add_argument("--frames", type=int, help="frames per clip (default: the model's); 1 grades the image grid "
                        "(image captions, no motion: 110 prompts)")
    parser.add_argument("--relay", type=int, help="add the relay stage (e.g. 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--failures", action="store_true", help="list every failed prompt")
    args = parser.parse_args(argv)
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % 4):
        nearest = max(1, 4 * round((args.frames - 1) / 4) + 1)
        parser.error(f"--frames {args.frames}: the VAE takes 1 + 4k frames (1, 5, 9, ...); nearest {nearest}")
    folder = Path(args.model)
    defaults = generation_defaults(folder)
    call = sampling_defaults(defaults)
    call["num_frames"] = frames = args.frames or call["num_frames"]
    if args.relay:
        call.update(relay=args.relay, **relay_defaults(defaults))
    torch.manual_seed(0)
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    grid = prompt_grid(ShapesConfig(num_frames=1) if frames == 1 else None)[::args.every]
    start = time.perf_counter()
    result = grade_pipeline(pipe, grid, seed=args.seed, **call)
    result = {"model": str(folder), "prompts": len(grid), "frames": frames, "steps": call["num_inference_steps"],
              "guidance": call["guidance_scale"], "relay": args.relay, "seconds": round(time.perf_counter() - start, 1),
              **result}
    if not args.failures:
        result["failures"] = len(result["failures"])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
