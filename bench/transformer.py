"""Benchmark: our CogVideoX transformer against diffusers' on the same weights; prints JSON.

Config: CogVideoX-like, 4 layers, 8 heads x 64, text_embed_dim 128, 5B-style RoPE; input latent 13x30x44
(16 channels, 4290 video tokens) plus 226 text tokens, batch 1. Both models get the same RoPE tables, computed
once as diffusers' pipeline does.

Time: median wall time of `--reps` forwards under torch.inference_mode after `--warmup` forwards, ours and
diffusers' interleaved rep by rep so that load from other processes hits both alike; also the minimum, and
the median of the per-rep ratios ours / diffusers (robust when the machine is shared).
Memory: one fresh subprocess per (implementation, dtype): load the weights, build the inputs, reset the
kernel's peak-RSS mark (/proc/self/clear_refs "5"), run one forward, read VmHWM (peak resident set) from
/proc/self/status. Reported: the peak during the forward, and that peak minus the resident set just before
it (activations and workspace).

Run: flock /tmp/bench.lock python3 bench/transformer.py [--threads 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, not an installed copy

from bench.common import (forward_peak_rss, interleaved_times, max_abs_diff, randomize_weights_,  # noqa: E402
                          run_json, time_summary)

CONFIG = dict(num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
              text_embed_dim=128, num_layers=4, sample_width=44, sample_height=30, sample_frames=49,
              max_text_seq_length=226, use_rotary_positional_embeddings=True)
LATENT = (1, 13, 16, 30, 44)  # (B, F, C, H, W)
TEXT = (1, 226, 128)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_weights(folder: str) -> None:
    """diffusers' model with seeded random weights, saved once; both implementations load this folder."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = randomize_weights_(CogVideoXTransformer3DModel(**CONFIG), seed=0, std=0.02)
    model.save_pretrained(folder)


def load(impl: str, folder: str, dtype: torch.dtype):
    if impl == "ours":
        import dit

        return dit.load_transformer(folder, torch_dtype=dtype)
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(folder, torch_dtype=dtype).eval()


def inputs(dtype: torch.dtype) -> dict:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    g = torch.Generator().manual_seed(1)
    _, f, _, h, w = LATENT
    gh, gw = h // 2, w // 2
    crop = get_resize_crop_region_for_grid((gh, gw), CONFIG["sample_width"] // 2, CONFIG["sample_height"] // 2)
    return dict(
        hidden_states=torch.randn(LATENT, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(TEXT, generator=g).to(dtype),
        timestep=torch.tensor([500]),
        image_rotary_emb=get_3d_rotary_pos_embed(CONFIG["attention_head_dim"], crop, (gh, gw), f),
        return_dict=False,
    )


def memory_child(impl: str, folder: str, dtype_name: str, threads: int) -> None:
    """Runs in a fresh process: peak resident memory of one forward, printed as JSON."""
    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    model, kw = load(impl, folder, dtype), inputs(dtype)
    with torch.inference_mode():
        print(json.dumps(forward_peak_rss(lambda: model(**kw))))


def measure_memory(impl: str, folder: str, dtype_name: str, threads: int) -> dict:
    return run_json([sys.executable, __file__, "--memory-child", impl, folder, dtype_name, "--threads", str(threads)])


def measure_time(folder: str, dtype: torch.dtype, warmup: int, reps: int) -> dict:
    models = {impl: load(impl, folder, dtype) for impl in ("diffusers", "ours")}
    kw = inputs(dtype)
    with torch.inference_mode():
        outs, times = interleaved_times({impl: (lambda m=m: m(**kw)[0]) for impl, m in models.items()},
                                        warmup=warmup, reps=reps)
    _, rel = max_abs_diff(outs["ours"], outs["diffusers"])
    return {**time_summary(times), "max_abs_diff_rel_to_scale": float(f"{rel:.3g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=3, metavar=("IMPL", "FOLDER", "DTYPE"))
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, threads=args.threads)
        return

    torch.set_num_threads(args.threads)
    result: dict = {
        "config": CONFIG, "latent": list(LATENT), "text": list(TEXT), "threads": args.threads,
        "torch": torch.__version__, "method": {
            "time": f"median of {args.reps} forwards after {args.warmup} warmup, inference_mode, interleaved",
            "memory": "fresh subprocess per measurement; VmHWM after resetting it just before one forward",
        },
    }
    with tempfile.TemporaryDirectory() as folder:
        build_weights(folder)
        for name, dtype in DTYPES.items():
            result[name] = measure_time(folder, dtype, args.warmup, args.reps)
            if not args.no_memory:
                for impl in ("diffusers", "ours"):
                    result[name][f"{impl}_memory"] = measure_memory(impl, folder, name, args.threads)
    fp32, bf16 = result["fp32"], result["bf16"]
    result["ratios"] = {
        "fp32_ours_over_diffusers": round(fp32["ours_median_s"] / fp32["diffusers_median_s"], 3),
        "bf16_ours_over_diffusers": round(bf16["ours_median_s"] / bf16["diffusers_median_s"], 3),
        "diffusers_fp32_over_ours_bf16": round(fp32["diffusers_median_s"] / bf16["ours_median_s"], 3),
    }
    result["targets_met"] = {
        "ours <= 0.85x diffusers, fp32": result["ratios"]["fp32_ours_over_diffusers"] <= 0.85,
        "ours <= 0.85x diffusers, bf16": result["ratios"]["bf16_ours_over_diffusers"] <= 0.85,
        "ours bf16 >= 3x faster than diffusers fp32": result["ratios"]["diffusers_fp32_over_ours_bf16"] >= 3.0,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
