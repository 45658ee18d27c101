"""Where a demo pipeline loses what its clips show: `python -m dit.demo.probe {vae,denoise} [--model FOLDER]`.

Both probes start from the prompt grid's clips rendered by `dit.data.shapes.render_clip` (centred paths) at a
chosen size and object size, and read the result back with `dit.demo.evaluate.evaluate_clip`:

- `vae`: the clips through the VAE and back (the posterior's mode). What the latent space can hold at all.
- `denoise --start T [T ...]`: the clips encoded, noised to the state of the first sampling step whose
  timestep is at most T, and denoised from there by the pipeline's own sampler and guidance. From which noise
  level the transformer keeps what the clip shows (a small T asks it only to clean up; the first step's
  timestep is generation from noise).

Prints JSON: per start, the success rate per attribute and which shape was read for which.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from dit.data.shapes import render_clip
from dit.demo.evaluate import GridPrompt, evaluate_clip, prompt_grid, summarize_scores

BATCH = 16  # clips per VAE / transformer call


def render_grid(grid: list[GridPrompt], *, size: int, object_size: float, num_frames: int) -> torch.Tensor:
    """The grid's clips, (B, C, F, H, W) in [-1, 1], as the VAE takes them."""
    clips = [render_clip(g.attributes, num_frames=num_frames, height=size, width=size, object_size=object_size,
                         antialias=2) for g in grid]  # each (F, C, H, W)
    return torch.stack(clips).permute(0, 2, 1, 3, 4)


def grade(grid: list[GridPrompt], video: torch.Tensor) -> dict[str, Any]:
    """Rates per attribute (`summarize_scores`) of frames (B, C, F, H, W) in [-1, 1], and a shape confusion
    table {prompted: {read: count}}."""
    frames = video.clamp(-1, 1).add(1).div(2).permute(0, 2, 3, 4, 1).float().numpy()  # (B, F, H, W, C) in [0, 1]
    scores, confusion = [], {}
    for g, clip in zip(grid, frames):
        estimate = evaluate_clip(clip)
        scores.append(estimate.score(g.attributes))
        row = confusion.setdefault(g.attributes.shape, {})
        row[str(estimate.shape)] = row.get(str(estimate.shape), 0) + 1
    return {"rates": summarize_scores(scores), "shapes": confusion}


@torch.no_grad()
def vae_round_trip(pipe, clips: torch.Tensor) -> torch.Tensor:
    """clips (B, C, F, H, W) -> encoded (posterior mode) and decoded, the same shape."""
    return torch.cat([pipe._to_pixels(pipe._from_pixels(clips[i:i + BATCH])) for i in range(0, len(clips), BATCH)])


def tail(spec, start: int):
    """The sampler spec from its first step whose timestep is <= start on, and that step's index; ValueError
    naming the accepted range when no step is that low."""
    timesteps = spec.schedule.timesteps
    later = (timesteps <= start).nonzero()
    if not len(later):
        raise ValueError(f"--start {start}: no sampling step has a timestep that low; the last step's is "
                         f"{int(timesteps[-1])}, so give {int(timesteps[-1])} .. {int(timesteps[0])}")
    k = int(later[0])
    schedule = spec.schedule
    cut = {f.name: getattr(schedule, f.name)[k:] for f in dataclasses.fields(schedule)}
    return dataclasses.replace(spec, schedule=dataclasses.replace(schedule, **cut)), k


@torch.no_grad()
def denoise_from(pipe, grid: list[GridPrompt], clips: torch.Tensor, *, start: int, steps: int, guidance: float,
                 seed: int = 0) -> torch.Tensor:
    """The clips (B, C, F, H, W) encoded, noised to the state of sampling step k (`tail`), denoised by the
    pipeline's sampler over steps k.. of `steps` with its guidance, decoded: (B, C, F, H, W). Clip i's noise
    comes from a generator seeded seed + i (as `dit.demo.grid`), drawn in the latents' shape."""
    from dit.sampling import denoise

    spec, k = tail(pipe._sampler(steps), start)
    alpha, sigma = float(spec.schedule.alphas[0]), float(spec.schedule.sigmas[0])
    out = []
    for i in range(0, len(grid), BATCH):
        z = pipe._from_pixels(clips[i:i + BATCH])  # (b, F', C', H', W')
        noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed + i + j))
                             for j in range(len(z))])
        state = pipe._encode_state([g.prompt for g in grid[i:i + BATCH]], None, guidance > 1,
                                   pipe.transformer.config.max_text_seq_length)
        model_fn = pipe._model_fn(pipe.transformer, state, None)
        x = denoise(model_fn, alpha * z + sigma * noise, spec, guidance_scale=guidance)
        out.append(pipe._to_pixels(x))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    from dit.pipeline import DiTPipeline
    from dit.requests import DEMO_MODEL, generation_defaults

    parser = argparse.ArgumentParser(prog="python -m dit.demo.probe", description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=("vae", "denoise"))
    parser.add_argument("--model", default=str(DEMO_MODEL), help="pipeline folder (default: the embedded demo)")
    parser.add_argument("--size", type=int, help="frame height and width (default: the folder's generation size)")
    parser.add_argument("--object-size", type=float, default=0.3, help="object diameter / frame (default 0.3)")
    parser.add_argument("--every", type=int, default=5, help="every N-th grid prompt (default 5: 110 prompts)")
    parser.add_argument("--start", type=int, nargs="+", default=[999], help="denoise: timesteps to start from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every {args.every}: give 1 or more")
    defaults = generation_defaults(Path(args.model))
    size = args.size or defaults.get("height", 32)
    pipe = DiTPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = defaults.get("num_inference_steps", 25), defaults.get("guidance_scale", 4.0)
    for start in args.start if args.probe == "denoise" else ():
        try:
            tail(pipe._sampler(steps), start)
        except ValueError as error:
            parser.error(str(error))
    grid = prompt_grid()[::args.every]
    clips = render_grid(grid, size=size, object_size=args.object_size, num_frames=defaults.get("num_frames", 9))
    result: dict[str, Any] = {"model": args.model, "probe": args.probe, "size": size,
                              "object_size": args.object_size, "prompts": len(grid)}
    if args.probe == "vae":
        result.update(grade(grid, vae_round_trip(pipe, clips)))
    else:
        result.update(steps=steps, guidance=guidance, starts={})
        for start in args.start:
            video = denoise_from(pipe, grid, clips, start=start, steps=steps, guidance=guidance, seed=args.seed)
            result["starts"][str(start)] = grade(grid, video)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
