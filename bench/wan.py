"""Benchmark: our Wan transformer against diffusers' WanTransformer3DModel on the same weights; prints one JSON line.

Default: 2 layers of Wan 2.1 T2V 1.3B's width (12 heads x 128, ffn 8960, text_dim 4096, freq_dim 256, 16 in and
out channels, patch (1, 2, 2), q/k RMSNorm across heads, cross_attn_norm) with seeded random weights; a
21 x 30 x 52 latent (81 frames at 240 x 416: 8190 video tokens) plus 512 text tokens, batch 1; fp32 and bf16, on
the CPU with 2 threads. Both implementations load the same saved folder.

Time: median wall time of `--reps` forwards under torch.inference_mode after `--warmup` forwards (the first
one's output is the one compared), ours and diffusers' interleaved rep by rep so that load from other processes
hits both alike; also the minimum, and the median of the per-rep ratios ours / diffusers.
Memory: one fresh subprocess per (implementation, dtype): load the weights, build the inputs, reset the kernel's
peak-RSS mark, run one forward, read VmHWM (peak resident set), as bench/transformer.py. Reported: the peak, and
the peak minus the resident set just before the forward. On CUDA: torch.cuda.max_memory_allocated around one
forward after a warm-up forward.
Outputs: max |ours - diffusers|, absolute and relative to max |diffusers|.
Targets (in the JSON): time ours <= 0.9x diffusers in fp32 and <= 0.85x in bf16; peak memory <= 0.9x.

--quick: a tiny configuration, for the smoke test (tests/test_bench_wan.py).
--full --device cuda: the GPU run: the whole 1.3B (30 layers) at 81 x 480 x 832 (21 x 60 x 104 latent, 32,760
video tokens) in bf16, eager and under torch.compile (both implementations compiled alike).

Run: flock /tmp/bench.lock python bench/wan.py [--threads 2] [--warmup 2] [--reps 5] [--no-memory]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (python bench/wan.py): the checkout, not an installed copy
    sys.path.insert(0, str(ROOT))

from bench.common import (emit, forward_peak_rss, interleaved_times, max_abs_diff, randomize_weights_,  # noqa: E402
                          run_json, time_summary)
from dit.models.wan import WAN_2_1_1_3B  # noqa: E402

IMPLS = ("diffusers", "ours")  # timed in this order, rep by rep
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SETUPS = {  # config, latent (B, C, F, H, W), text (B, T, text_dim), rows: (name, dtype, torch.compile)
    "default": dict(config=dict(WAN_2_1_1_3B, num_layers=2), latent=(1, 16, 21, 30, 52), text=(1, 512, 4096),
                    rows=(("fp32", "fp32", False), ("bf16", "bf16", False))),
    "quick": dict(config=dict(WAN_2_1_1_3B, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32,
                              freq_dim=16, in_channels=4, out_channels=4, num_layers=2),
                  latent=(1, 4, 3, 8, 8), text=(1, 16, 32), rows=(("fp32", "fp32", False), ("bf16", "bf16", False))),
    "full": dict(config=dict(WAN_2_1_1_3B), latent=(1, 16, 21, 60, 104), text=(1, 512, 4096),
                 rows=(("bf16", "bf16", False), ("bf16_compiled", "bf16", True))),
}
TIME_TARGETS = {"fp32": 0.9, "bf16": 0.85}  # ours / diffusers, by dtype
MEMORY_TARGET = 0.9  # peak memory ours / diffusers


def build_weights(folder: str, config: dict) -> int:
    """diffusers' model with seeded random weights, saved once; both implementations load this folder.
    Returns the parameter count."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = randomize_weights_(WanTransformer3DModel(**config), seed=0, std=0.02)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def load(impl: str, folder: str, dtype: torch.dtype, device: str):
    if impl == "ours":
        import dit
        from dit.models.wan import WanTransformer3DModel

        model = dit.load_transformer(folder, torch_dtype=dtype)
        assert type(model) is WanTransformer3DModel, type(model)
    else:
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)
    return model.to(device).eval()


def inputs(latent: tuple, text: tuple, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(latent, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(text, generator=g).to(device, dtype),
        timestep=torch.tensor([500], device=device),
        return_dict=False,
    )


def memory_child(spec: dict) -> None:
    """Runs in a fresh process: peak memory of one forward, printed as JSON."""
    torch.set_num_threads(spec["threads"])
    dtype, device = DTYPES[spec["dtype"]], spec["device"]
    model = load(spec["impl"], spec["folder"], dtype, device)
    if spec["compile"]:
        model = torch.compile(model)
    kw = inputs(tuple(spec["latent"]), tuple(spec["text"]), dtype, device)
    with torch.inference_mode():
        if device == "cpu":
            print(json.dumps(forward_peak_rss(lambda: model(**kw))))
            return
        model(**kw)  # warm-up: CUDA context, cuBLAS workspaces, compilation
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(**kw)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    print(json.dumps({"peak_cuda_allocated_mb": round(peak / 2**20, 1),
                      "forward_extra_mb": round((peak - before) / 2**20, 1)}))


def measure_memory(impl: str, folder: str, setup: dict, row: tuple, args: argparse.Namespace) -> dict:
    _, dtype_name, compiled = row
    spec = dict(impl=impl, folder=folder, dtype=dtype_name, compile=compiled, latent=setup["latent"],
                text=setup["text"], device=args.device, threads=args.threads)
    return run_json([sys.executable, __file__, "--memory-child", json.dumps(spec)])


def measure_time(models: dict, setup: dict, row: tuple, args: argparse.Namespace) -> dict:
    _, dtype_name, compiled = row
    if compiled:
        models = {impl: torch.compile(m) for impl, m in models.items()}
    kw = inputs(setup["latent"], setup["text"], DTYPES[dtype_name], args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    with torch.inference_mode():
        outs, times = interleaved_times({impl: (lambda m=m: m(**kw)[0]) for impl, m in models.items()},
                                        warmup=args.warmup, reps=args.reps, sync=sync)
    diff, rel = max_abs_diff(outs["ours"], outs["diffusers"])
    return {**time_summary(times), "max_abs_diff": float(f"{diff:.3g}"),
            "max_abs_diff_rel_to_scale": float(f"{rel:.3g}")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments, all checked before any model is built (and without needing CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--warmup", type=int, help="untimed forwards first (default 2; --quick 1)")
    parser.add_argument("--reps", type=int, help="timed forwards per implementation (default 5; --quick 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny configuration (the smoke test)")
    size.add_argument("--full", action="store_true",
                      help="the whole 1.3B at 81 x 480 x 832 in bf16, eager and torch.compile (needs --device cuda)")
    parser.add_argument("--memory-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return args
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    for name in ("threads", "warmup", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: give at least 1")
    if args.full and args.device != "cuda":
        parser.error("--full is the GPU run (the whole 1.3B at 81 x 480 x 832, 30 layers): add --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: CUDA is not available here (torch {torch.__version__}, no usable GPU); "
                     "leave --device out to run on the CPU")
    args.setup = "quick" if args.quick else "full" if args.full else "default"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return

    import diffusers

    torch.set_num_threads(args.threads)
    setup = SETUPS[args.setup]
    memory_how = ("VmHWM after resetting it just before one forward" if args.device == "cpu"
                  else "torch.cuda.max_memory_allocated around one forward after a warm-up forward")
    result: dict = {
        "setup": args.setup, "config": setup["config"], "latent": list(setup["latent"]), "text": list(setup["text"]),
        "video_tokens": setup["latent"][2] * (setup["latent"][3] // 2) * (setup["latent"][4] // 2),
        "device": args.device, "threads": args.threads, "torch": torch.__version__,
        "diffusers": diffusers.__version__, "method": {
            "time": f"median of {args.reps} forwards after {args.warmup} warmup, inference_mode, interleaved",
            "memory": f"fresh subprocess per measurement, after the timing; {memory_how}"
                      + ("; the workers ran at once (--quick)" if args.quick else ", one at a time"),
        },
    }
    with tempfile.TemporaryDirectory() as folder:
        result["parameters"] = build_weights(folder, setup["config"])
        models, models_dtype = None, None
        for row in setup["rows"]:
            name, dtype_name, _ = row
            if models_dtype != dtype_name:  # the compiled row reuses the eager row's models
                models = None  # free the previous dtype's pair first
                models = {impl: load(impl, folder, DTYPES[dtype_name], args.device) for impl in IMPLS}
                models_dtype = dtype_name
            print(f"[bench/wan] {name}: timing", file=sys.stderr, flush=True)
            result[name] = measure_time(models, setup, row, args)
        del models
        if not args.no_memory:
            # Each peak is its own process's, so the workers may overlap; only --quick (the smoke test) lets them,
            # the measured runs keep the machine to one at a time.
            jobs = [(row, impl) for row in setup["rows"] for impl in IMPLS]
            print(f"[bench/wan] memory: {len(jobs)} fresh processes", file=sys.stderr, flush=True)
            with ThreadPoolExecutor(max_workers=len(jobs) if args.quick else 1) as pool:
                peaks = pool.map(lambda job: measure_memory(job[1], folder, setup, job[0], args), jobs)
                for (row, impl), peak in zip(jobs, peaks):
                    result[row[0]][f"{impl}_memory"] = peak

    peak_key = "peak_rss_mb" if args.device == "cpu" else "peak_cuda_allocated_mb"
    ratios, met = {}, {}
    for name, dtype_name, _ in setup["rows"]:
        r = result[name]
        ratios[f"{name}_time_ours_over_diffusers"] = round(r["ours_median_s"] / r["diffusers_median_s"], 3)
        met[f"time ours <= {TIME_TARGETS[dtype_name]}x diffusers, {name}"] = (
            ratios[f"{name}_time_ours_over_diffusers"] <= TIME_TARGETS[dtype_name])
        if not args.no_memory:
            ratio = round(r["ours_memory"][peak_key] / r["diffusers_memory"][peak_key], 3)
            ratios[f"{name}_peak_ours_over_diffusers"] = ratio
            ratios[f"{name}_forward_extra_ours_over_diffusers"] = round(
                r["ours_memory"]["forward_extra_mb"] / max(r["diffusers_memory"]["forward_extra_mb"], 0.1), 3)
            met[f"peak memory ours <= {MEMORY_TARGET}x diffusers, {name}"] = ratio <= MEMORY_TARGET
    result["ratios"] = ratios
    result["targets"] = {"time_ours_over_diffusers": TIME_TARGETS, "peak_ours_over_diffusers": MEMORY_TARGET}
    result["targets_met"] = met
    emit(result)


if __name__ == "__main__":
    main()
