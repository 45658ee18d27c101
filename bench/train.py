"""Training throughput: steps per second, tokens per second and peak memory of `dit train`'s step, as JSON.

    python bench/train.py                      # tiny and medium configs on CPU (one subprocess each)
    python bench/train.py --case medium --steps 20
    python bench/train.py --case cogvideox-2b  # GPU: a CogVideoX-2B-size transformer, bf16, gradient
                                               # checkpointing, 49 x 480 x 720; adds model FLOPs utilisation

CPU cases run the whole trainer step (data, frozen VAE and text encoder, transformer forward/backward, AdamW,
EMA) from configs/train/tiny-cpu.yaml; peak memory is the process's peak resident set size. The GPU case times
the transformer step alone on random latents and text embeddings (the VAE and T5 are usually cached) and
reports torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = {
    # The smoke config as shipped: 2 x 9 x 32 x 32 video, a 2-layer 32-wide transformer.
    "tiny": {},
    # 2 x 17 x 64 x 64 video -> 5 x 8 x 8 latents (patch 1: 320 video tokens), 6 layers of width 256.
    "medium": {
        "model.transformer_preset": None,
        "model.transformer": dict(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4,
                                  time_embed_dim=128, num_layers=6, sample_width=8, sample_height=8, sample_frames=17,
                                  patch_size=1, temporal_compression_ratio=4, text_embed_dim=64,
                                  max_text_seq_length=16),
        "model.text_encoder": {"d_model": 64, "num_layers": 2, "num_heads": 4, "max_length": 16},
        "data.height": 64, "data.width": 64, "data.frames": 17,
    },
}
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16


def bench_cpu(case: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    from dit.train.config import load_config
    from dit.train.data import make_loader
    from dit.train.trainer import Trainer

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"output_dir": tmp, "train.steps": warmup + steps, "train.validate_every": None,
                     "train.checkpoint_every": 10**9, "train.save_pipeline": False,
                     "data.shapes": {"length": 64, "antialias": 1}, **CASES[case]}
        trainer = Trainer(load_config(ROOT / "configs/train/tiny-cpu.yaml", overrides=overrides))
        batches = iter(make_loader(trainer.source, trainer.stream, 0, 0))
        for _ in range(warmup):
            trainer.train_step(batches)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batches)
        seconds = time.perf_counter() - start
        cfg = trainer.bundle.transformer.config
        h, w, f = trainer.source.buckets[0]
        latent = ((f - 1) // 4 + 1) * (h // 8 // cfg.patch_size) * (w // 8 // cfg.patch_size)
        tokens = trainer.cfg.train.batch_size * (latent + cfg.max_text_seq_length)
        params = sum(p.numel() for p in trainer.bundle.transformer.parameters())
    return {"case": case, "device": "cpu", "threads": threads, "steps": steps,
            "steps_per_s": round(steps / seconds, 3), "tokens_per_s": round(steps * tokens / seconds, 1),
            "tokens_per_step": tokens, "transformer_params": params,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def bench_gpu_2b(steps: int, warmup: int) -> dict:
    import torch

    from dit.models.cogvideox import COGVIDEOX_2B, CogVideoXTransformer3DModel

    if not torch.cuda.is_available():
        raise SystemExit("bench/train.py: the cogvideox-2b case needs a CUDA GPU")
    device = torch.device("cuda")
    model = CogVideoXTransformer3DModel(**COGVIDEOX_2B).to(device)
    model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    b, f, c, h, w = 1, 13, 16, 60, 90  # 49 frames at 480 x 720 through the CogVideoX VAE
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, f, c, h, w, device=device, generator=g)
    text = torch.randn(b, 226, 4096, device=device, generator=g)
    t = torch.randint(0, 1000, (b,), device=device, generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        loss = (out.float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    n_video = f * (h // 2) * (w // 2)
    seq, dim, layers = n_video + 226, 30 * 64, 30
    # Model FLOPs per step (forward + backward = 3x forward; recomputation by checkpointing not counted, as usual):
    # 2 N per token for the weights, plus QK^T and AV: 4 L S^2 d per forward.
    flops = 3 * (2 * params * seq * b + 4 * layers * seq * seq * dim * b)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    achieved = flops * steps / seconds
    return {"case": "cogvideox-2b", "device": name, "steps": steps, "steps_per_s": round(steps / seconds, 4),
            "tokens_per_s": round(steps * seq * b / seconds, 1), "tokens_per_step": seq * b,
            "transformer_params": params, "model_tflops_per_s": round(achieved / 1e12, 1),
            "mfu": round(achieved / peak, 4) if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "cogvideox-2b"], help="one case (default: every CPU case)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    args = parser.parse_args()
    if args.case == "cogvideox-2b":
        print(json.dumps(bench_gpu_2b(args.steps, args.warmup)))
        return
    if args.case is not None:
        print(json.dumps(bench_cpu(args.case, args.steps, args.warmup, args.threads)))
        return
    results = []
    for case in CASES:  # one process per case, so each peak RSS is its own
        out = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
