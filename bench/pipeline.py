"""End-to-end CogVideoX text-to-video: our pipeline against diffusers' CogVideoXPipeline on the same folder.

A random-weight CogVideoX-style folder (transformer 4 layers x 8 heads x 64, small T5, CogVideoX VAE with
narrower channels) is saved once; each pipeline then runs in a fresh process so its peak memory (VmHWM,
``bench.common.peak_rss_mb``) is its own. Same seed and settings; prints JSON with seconds, peak memory and the max abs difference of the
frames. Run: `python -m bench.pipeline` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import emit, peak_rss_mb, run_isolated


def build(folder: Path, quick: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from tiny import randomize, tiny_t5, tiny_tokenizer

    torch.manual_seed(0)
    heads, layers, channels = (2, 1, (8, 8, 8, 8)) if quick else (8, 4, (32, 64, 64, 128))
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=128,
        text_embed_dim=16, num_layers=layers, sample_width=16, sample_height=16, sample_frames=9,
        max_text_seq_length=16, use_rotary_positional_embeddings=True)
    randomize(transformer, 1, 0.02)
    vae = AutoencoderKLCogVideoX(block_out_channels=channels, latent_channels=16, layers_per_block=1,
                                 norm_num_groups=8)
    sched = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                   timestep_spacing="trailing", clip_sample=False)
    CogVideoXPipeline(tokenizer=tiny_tokenizer(16), text_encoder=tiny_t5(), vae=vae.eval(), transformer=transformer.eval(),
                      scheduler=sched).save_pretrained(folder, safe_serialization=True)


def run(which: str, folder: Path, quick: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    if which == "ours":
        from dit.pipeline import DiTPipeline

        pipe = DiTPipeline.from_pretrained(folder)
    else:
        from diffusers import CogVideoXPipeline

        pipe = CogVideoXPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    size, frames, steps = (32, 5, 2) if quick else (128, 9, 10)
    start = time.perf_counter()
    with torch.inference_mode():
        out = pipe("a red circle moving right", num_frames=frames, height=size, width=size, num_inference_steps=steps,
                   guidance_scale=6.0, generator=torch.Generator().manual_seed(0), output_type="np",
                   max_sequence_length=16).frames
    seconds = time.perf_counter() - start
    np.save(folder / f"frames-{which}.npy", out)
    emit({"which": which, "seconds": round(seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
          "frames": list(out.shape), "steps": steps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run(args.run, Path(args.folder), args.quick, args.threads)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cogvideox"
        build(folder, args.quick)
        extra = ["--quick"] if args.quick else []
        results = {w: run_isolated("bench.pipeline", "--run", w, "--folder", str(folder), "--threads",
                                   str(args.threads), *extra) for w in ("diffusers", "ours")}
        diff = float(np.abs(np.load(folder / "frames-ours.npy") - np.load(folder / "frames-diffusers.npy")).max())
    emit({"bench": "pipeline", "diffusers": results["diffusers"], "ours": results["ours"], "max_abs_diff": diff,
          "time_ratio": round(results["ours"]["seconds"] / results["diffusers"]["seconds"], 3),
          "memory_ratio": round(results["ours"]["peak_rss_mb"] / results["diffusers"]["peak_rss_mb"], 3)})


if __name__ == "__main__":
    main()
