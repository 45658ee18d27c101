"""Relay stage of the embedded demo model: does it keep the base result, and does block noise matter?

Two measurements, printed as JSON (issue 5's trained-model checks):
1. Generation (text -> base at the folder's size -> relay 2x), `--prompts` grid prompts: the relay output averaged
   over 2x2 blocks against the base result (mean absolute difference in [0, 1] pixels and PSNR; the largest
   per-frame offset of the object's centroid, in base pixels), next to the
   same distance between two seeds' base results (the scale of "unrelated"); with block noise (the trained
   noise_alpha) and with white noise (noise_alpha 0) at the relay start.
2. Super-resolution of real clips (procedural shapes at twice the base size, downscaled 2x and upscaled back, as
   in training): PSNR of the relay output against the true clip, with block noise and with white noise, same seeds;
   the mean absolute difference between the two outputs; and the PSNR of the true clip's own VAE round trip
   (the ceiling for any output of this VAE).

Run: `python -m bench.relay_demo [--prompts 40] [--clips 32]`.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

import samplers
from bench.common import emit
from dit.sampling import denoise


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(1 / max(float(np.mean((a - b) ** 2)), 1e-12))


def pool2(x: np.ndarray) -> np.ndarray:
    """(F, 2H, 2W, 3) -> (F, H, W, 3), mean over 2x2 blocks."""
    f, h, w, c = x.shape
    return x.reshape(f, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def track_offset_px(base: np.ndarray, high: np.ndarray) -> float | None:
    """Largest per-frame distance, in base pixels, between the object's centroid in the relay output (F, 2H, 2W, 3)
    and in the base result (F, H, W, 3), as `dit.demo.evaluate` reads them; None when either has a frame in
    which no object is found."""
    from dit.demo.evaluate import evaluate_clip

    c_base, c_high = evaluate_clip(base).centroids, evaluate_clip(high).centroids
    if None in c_base or None in c_high:
        return None
    high_in_base_px = (np.asarray(c_high) + 0.5) / 2 - 0.5  # pixel centres: 2x grid -> 1x grid
    return float(np.abs(high_in_base_px - np.asarray(c_base)).max())


def generation(pipe, defaults: dict, prompts: list[str], alpha: float) -> dict:
    from dit.requests import relay_defaults, sampling_defaults

    relay = dict(relay_defaults(defaults), relay_noise_alpha=alpha)
    kw = dict(sampling_defaults(defaults), output_type="np")
    diff, ref, ps, track = [], [], [], []
    for k, prompt in enumerate(prompts):
        base = pipe(prompt=prompt, generator=torch.Generator().manual_seed(k), **kw).frames[0]
        other = pipe(prompt=prompt, generator=torch.Generator().manual_seed(10_000 + k), **kw).frames[0]
        high = pipe(prompt=prompt, generator=torch.Generator().manual_seed(k), relay=2, **relay, **kw).frames[0]
        diff.append(float(np.abs(pool2(high) - base).mean()))
        ref.append(float(np.abs(other - base).mean()))
        ps.append(psnr(pool2(high), base))
        track.append(track_offset_px(base, high))
    return {"pooled_relay_vs_base_mad": float(np.mean(diff)), "other_seed_vs_base_mad": float(np.mean(ref)),
            "pooled_relay_vs_base_psnr": float(np.mean(ps)),
            "track_offset_px_mean": float(np.mean([t for t in track if t is not None])),
            "track_offset_px_max": float(np.max([t for t in track if t is not None])),
            "track_missing_object": sum(t is None for t in track)}


@torch.no_grad()
def super_resolution(pipe, defaults: dict, clips: int) -> dict:
    from dit.data import ShapesConfig, ShapesDataset
    from dit.train.objectives import low_resolution

    # Objects and paths as in the relay stage's training clips (configs/demo/relay.yaml), at its output size.
    data = ShapesDataset(ShapesConfig(seed=12345, length=clips, height=2 * defaults["height"],
                                      width=2 * defaults["width"], num_frames=9, split="all", antialias=2,
                                      object_size=0.4, position_jitter=0.0))
    vae, scale = pipe.vae, pipe.vae.config.scaling_factor
    path = samplers.train_path_from_config(dict(pipe.scheduler.config, _class_name=type(pipe.scheduler).__name__))
    schedule = samplers.relay_schedule(path, defaults["relay_start"], defaults["relay_steps"])
    stage = pipe.relay_transformer or pipe.transformer
    out: dict[str, list] = {"block": [], "white": [], "input": [], "vae": [], "block_vs_white_mad": []}
    for i in range(clips):
        item = data[i]
        video = item["video"][None]  # (1, F, 3, H, W) in [-1, 1]
        low = low_resolution(video, 2)
        z_low = vae.encode(low.permute(0, 2, 1, 3, 4)).latent_dist.mode() * scale  # (1, C, F', h, w)
        z_low = z_low.permute(0, 2, 1, 3, 4)  # (1, F', C, h, w)
        text, _ = pipe.encode_prompt([item["caption"]], do_classifier_free_guidance=False,
                                     max_sequence_length=stage.config.max_text_seq_length)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return stage(hidden_states=x, encoder_hidden_states=text, timestep=t.reshape(-1).expand(x.shape[0]),
                         return_dict=False)[0].float()

        target = (video[0].permute(0, 2, 3, 1).numpy() + 1) / 2  # (F, H, W, 3) in [0, 1]
        results = {}
        for name, alpha in (("block", defaults.get("relay_noise_alpha", 0.15)), ("white", 0.0)):
            spec = samplers.SamplerSpec(schedule, "v_prediction", "relay", {"block_size": 2, "noise_alpha": alpha})
            z = denoise(model_fn, z_low, spec, generator=torch.Generator().manual_seed(i))
            frames = vae.decode(z.permute(0, 2, 1, 3, 4) / scale).sample.clamp(-1, 1)  # (1, 3, F, H, W)
            results[name] = (frames[0].permute(1, 2, 3, 0).numpy() + 1) / 2
            out[name].append(psnr(results[name], target))
        out["input"].append(psnr((low[0].permute(0, 2, 3, 1).numpy() + 1) / 2, target))
        # The ceiling for anything decoded by this VAE: the true clip encoded and decoded.
        z_true = vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode()
        roundtrip = vae.decode(z_true).sample.clamp(-1, 1)[0].permute(1, 2, 3, 0).numpy()
        out["vae"].append(psnr((roundtrip + 1) / 2, target))
        out["block_vs_white_mad"].append(float(np.abs(results["block"] - results["white"]).mean()))
    return {"psnr_block_noise": float(np.mean(out["block"])), "psnr_white_noise": float(np.mean(out["white"])),
            "psnr_bilinear_input": float(np.mean(out["input"])), "psnr_vae_roundtrip": float(np.mean(out["vae"])),
            "block_vs_white_mad": float(np.mean(out["block_vs_white_mad"])),
            "block_better_fraction": float(np.mean(np.asarray(out["block"]) > np.asarray(out["white"])))}


def main() -> None:
    from dit.requests import DEMO_MODEL, generation_defaults
    from dit.demo.evaluate import prompt_grid
    from dit.pipeline import DiTPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = DiTPipeline.from_pretrained(DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    defaults = generation_defaults(DEMO_MODEL)
    grid = prompt_grid()
    prompts = [g.prompt for g in grid[:: max(1, len(grid) // args.prompts)]][: args.prompts]
    alpha = defaults.get("relay_noise_alpha", 0.15)
    emit({"bench": "relay_demo", "prompts": len(prompts), "clips": args.clips,
          "generation_block_noise": generation(pipe, defaults, prompts, alpha),
          "generation_white_noise": generation(pipe, defaults, prompts, 0.0),
          "super_resolution": super_resolution(pipe, defaults, args.clips)})


if __name__ == "__main__":
    main()
