"""The one-shot GPU check: everything this project measures on one GPU, in one command, into one JSON file.

    python bench/gpu.py --out DIR            # on the GPU machine (about 8 minutes on one H100)
    python bench/gpu.py --out DIR --dry-run  # anywhere: validates the plan without CUDA

Sections, in order of priority, each in its own process with its own time box (the JSON is rewritten as every
figure arrives, so a section cut off by its time box, or the whole run by the machine's, still returns what it
measured; a section that fails or runs out of memory leaves its error and the next one starts):

- env: torch / CUDA / cuDNN / GPU, the installed packages, which attention kernels are installed.
- attention: each installed kernel (dit.attention.BACKENDS) at CogVideoX-2B's and Wan-1.3B's full attention shapes
  in bf16: time, output and log-sum-exp error against the fp32 reference on a slice of the queries, the ring's
  LSE merge over 4 K/V blocks with that kernel (what context parallelism runs on CUDA), and what "auto" picks.
- parity: our CogVideoX-2B, SD3-medium and Wan-1.3B transformers (full width, 2 layers, seeded random weights)
  against diffusers' on CUDA: bf16 outputs of both against diffusers' fp32 output (TF32 off), and ours against
  diffusers' in bf16.
- cogvideox: CogVideoX-2B, all 30 layers, 49 x 480 x 720 (13 x 60 x 90 latents, 17,550 video + 226 text tokens),
  batch 2 (classifier-free guidance), bf16: forward time and torch.cuda.max_memory_allocated for ours eager, ours
  compiled (regional, dit.compile), diffusers eager and diffusers compiled (regional), with the compile time and
  a check that timed forwards at other timesteps compile nothing more.
- wan: the same for Wan 2.1 1.3B at 81 x 480 x 832 (21 x 60 x 104 latents, 32,760 video tokens, 512 text), batch 1.
- vae: CogVideoX VAE decode of 13 x 60 x 90 latents (49 x 480 x 720), bf16: peak memory and time, ours and
  diffusers', and the output difference.
- wan_vae: the Wan 2.1 VAE (diffusers' default config) decoding 21 x 60 x 104 latents (81 x 480 x 832), bf16: the
  same for ours, ours in exact tiles of 240 x 416 (vae3d.wan_tiles) and diffusers'.

Nothing is downloaded: weights are seeded random, built on the GPU. Packages beyond the GPU image's (diffusers)
travel as wheels with the working tree (docs/gpu.md). `--tiny --device cpu` runs every section at toy sizes on the
CPU (the smoke test, tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (python bench/gpu.py): the checkout, not an installed copy
    sys.path.insert(0, str(ROOT))

from bench.gpu_sections import SECTION_FUNCTIONS, VAE_CLASSES, Recorder, diffusers_class, write_json  # noqa: E402

TOTAL_BUDGET_S = 480  # the "at most 8 minutes on one H100"
GPU_MEMORY_GIB = 78  # an H100's usable memory: the plan must fit it
JSON_NAME, LOG_NAME = "gpu.json", "gpu.log"


@dataclass(frozen=True)
class Section:
    name: str
    budget_s: int  # its time box on one H100 (unused time passes on to the next sections)
    what: str


SECTIONS = (
    Section("env", 20, "versions, GPU, installed attention kernels"),
    Section("attention", 50, "each installed attention kernel: time, error, lse, ring merge"),
    Section("parity", 65, "bf16 parity with diffusers: CogVideoX-2B, SD3-medium, Wan-1.3B (2 layers each)"),
    Section("cogvideox", 125, "CogVideoX-2B full size, 49 x 480 x 720: ours / diffusers, eager / compiled"),
    Section("wan", 110, "Wan-1.3B full size, 81 x 480 x 832: ours / diffusers, eager / compiled"),
    Section("vae", 50, "CogVideoX VAE decode, 49 x 480 x 720: ours / diffusers"),
    Section("wan_vae", 60, "Wan 2.1 VAE decode, 81 x 480 x 832: ours, ours in exact tiles / diffusers"),
)


def sizes(tiny: bool) -> dict[str, Any]:
    """Every shape the run uses (tiny: toy sizes for the CPU smoke test)."""
    from dit.models.cogvideox import COGVIDEOX_2B
    from dit.models.mmdit import SD3_MEDIUM
    from dit.models.wan import WAN_2_1_1_3B

    if not tiny:
        return {
            "attention": {"cogvideox_2b": [2, 30, 226 + 13 * 30 * 45, 64], "wan_1_3b": [1, 12, 21 * 30 * 52, 128],
                          "reference_queries": 512, "warmup": 3, "reps": 10, "ring_blocks": 4},
            "parity": {
                "cogvideox": {"config": dict(COGVIDEOX_2B, num_layers=2), "latent": [2, 13, 16, 30, 44],
                              "text": [2, 226, 4096]},
                "sd3": {"config": dict(SD3_MEDIUM, num_layers=2), "latent": [2, 16, 128, 128], "text": [2, 333, 4096],
                        "pooled": [2, 2048]},
                "wan": {"config": dict(WAN_2_1_1_3B, num_layers=2), "latent": [1, 16, 21, 30, 52],
                        "text": [1, 512, 4096]},
            },
            "cogvideox": {"config": dict(COGVIDEOX_2B), "latent": [2, 13, 16, 60, 90], "text": [2, 226, 4096],
                          "warmup": 1, "reps": 3},
            "wan": {"config": dict(WAN_2_1_1_3B), "latent": [1, 16, 21, 60, 104], "text": [1, 512, 4096],
                    "warmup": 1, "reps": 3},
            "vae": {"config": {}, "latent": [1, 16, 13, 60, 90], "warm_latent": [1, 16, 3, 60, 90]},
            "wan_vae": {"config": {}, "latent": [1, 16, 21, 60, 104], "warm_latent": [1, 16, 2, 60, 104],
                        "exact_tile": [240, 416]},
        }
    cog = dict(COGVIDEOX_2B, num_attention_heads=2, attention_head_dim=16, time_embed_dim=8, text_embed_dim=16,
               num_layers=2, sample_width=8, sample_height=8, sample_frames=9, max_text_seq_length=7)
    wan = dict(WAN_2_1_1_3B, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=16,
               in_channels=4, out_channels=4, num_layers=2)
    sd3 = dict(SD3_MEDIUM, num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
               caption_projection_dim=32, pooled_projection_dim=16, in_channels=4, out_channels=4, sample_size=16,
               pos_embed_max_size=16)
    vae = dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2)
    wan_vae = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.0] * 4,
                   latents_std=[1.0] * 4)
    return {
        "attention": {"cogvideox_2b": [2, 2, 40, 16], "wan_1_3b": [1, 2, 48, 32], "reference_queries": 16,
                      "warmup": 1, "reps": 2, "ring_blocks": 4},
        "parity": {
            "cogvideox": {"config": dict(cog, in_channels=4, out_channels=4), "latent": [2, 3, 4, 8, 8],
                          "text": [2, 7, 16]},
            "sd3": {"config": sd3, "latent": [2, 4, 16, 16], "text": [2, 7, 32], "pooled": [2, 16]},
            "wan": {"config": wan, "latent": [1, 4, 3, 8, 8], "text": [1, 7, 32]},
        },
        "cogvideox": {"config": dict(cog, in_channels=4, out_channels=4), "latent": [2, 3, 4, 8, 8], "text": [2, 7, 16],
                      "warmup": 1, "reps": 2},
        "wan": {"config": wan, "latent": [1, 4, 3, 8, 8], "text": [1, 7, 32], "warmup": 1, "reps": 2},
        "vae": {"config": vae, "latent": [1, 4, 3, 8, 8], "warm_latent": [1, 4, 2, 8, 8]},
        "wan_vae": {"config": wan_vae, "latent": [1, 4, 3, 8, 8], "warm_latent": [1, 4, 2, 8, 8], "exact_tile": [32, 32]},
    }


# ------------------------------------------------------------------------------------------------ the plan


def plan(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The run as data, and the problems with it (none: it can run): sections and their time boxes within the
    total, every shape, the models built on the meta device (parameters, weight memory), and the memory each
    full-size section needs against the GPU's."""
    import torch

    problems: list[str] = []
    chosen = [s for s in SECTIONS if s.name in args.sections]
    total = sum(s.budget_s for s in chosen)
    if sum(s.budget_s for s in SECTIONS) > TOTAL_BUDGET_S:
        problems.append(f"the time boxes add up to more than {TOTAL_BUDGET_S} s, the issue's 8 minutes")
    if total * args.box_scale > args.budget:
        problems.append(f"the sections' time boxes add up to {total} s, over the budget of {args.budget} s")
    sz = sizes(args.tiny)
    models: dict[str, Any] = {}
    for kind in ("cogvideox", "wan"):
        spec = sz[kind]
        try:
            with torch.device("meta"):
                ref = diffusers_class(kind)(**spec["config"])
            from dit.convert import TRANSFORMER_CLASSES, resolve

            with torch.device("meta"):
                ours = resolve(TRANSFORMER_CLASSES[type(ref).__name__]).from_config(dict(ref.config))
            n_ref, n_ours = (sum(p.numel() for p in m.parameters()) for m in (ref, ours))
            if n_ref != n_ours:
                problems.append(f"{kind}: ours has {n_ours} parameters, diffusers' {n_ref}")
            b, *latent = spec["latent"]
            if kind == "cogvideox":
                f, _, h, w = latent
                p = spec["config"]["patch_size"]
                tokens = f * (h // p) * (w // p) + spec["text"][1]
            else:
                _, f, h, w = latent
                pt, ph, pw = spec["config"]["patch_size"]
                tokens = (f // pt) * (h // ph) * (w // pw)
            weights_gib = n_ref * 2 / 2**30  # bf16
            dim = spec["config"]["num_attention_heads"] * spec["config"]["attention_head_dim"]
            # Both models' bf16 weights, diffusers' fp32 copy while the pair is built, and a generous activation
            # bound: 16 hidden-size tensors of the whole sequence in fp32 (the MLP's 4x state among them).
            activations_gib = 16 * b * tokens * dim * 4 / 2**30
            need = 2 * weights_gib + 2 * weights_gib + activations_gib
            models[kind] = {"parameters": n_ref, "tokens": tokens, "batch": b, "weights_bf16_gib": round(weights_gib, 2),
                            "memory_bound_gib": round(need, 1)}
            if not args.tiny and need > GPU_MEMORY_GIB:
                problems.append(f"{kind}: about {need:.0f} GiB needed, over the {GPU_MEMORY_GIB} GiB of the GPU")
        except Exception as e:  # noqa: BLE001 - a plan that cannot build its models is the finding
            problems.append(f"{kind}: the models do not build: {type(e).__name__}: {e}")
    for kind, spec in sz["parity"].items():
        try:
            with torch.device("meta"):
                diffusers_class(kind)(**spec["config"])
        except Exception as e:  # noqa: BLE001
            problems.append(f"parity {kind}: diffusers' model does not build: {type(e).__name__}: {e}")
    for kind, cls_name in VAE_CLASSES.items():
        try:
            import diffusers

            with torch.device("meta"):
                getattr(diffusers, cls_name)(**sz[kind]["config"])
        except Exception as e:  # noqa: BLE001
            problems.append(f"{kind}: diffusers' {cls_name} does not build: {type(e).__name__}: {e}")
    from dit.attention import BACKENDS, KERNELS

    missing = [b for b in BACKENDS if b not in KERNELS and b != "auto"]
    if missing:
        problems.append(f"attention backends without a kernel: {missing}")
    return {
        "sections": [{"name": s.name, "budget_s": s.budget_s, "what": s.what} for s in chosen],
        "budget_s": args.budget, "sum_of_time_boxes_s": total, "device": args.device, "tiny": args.tiny,
        "compile_backend": args.compile_backend, "sizes": sz, "models": models,
    }, problems


# --------------------------------------------------------------------------------------------------- driver


def run_section_in_process(name: str, args: argparse.Namespace, work: Path) -> None:
    import torch

    rec = Recorder(work / f"{name}.json")
    args.sizes = sizes(args.tiny)
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    SECTION_FUNCTIONS[name](rec, args)


def _child_argv(name: str, args: argparse.Namespace, work: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--work", str(work), "--out",
            str(args.out), "--device", args.device, "--compile-backend", args.compile_backend]
    return argv + (["--tiny"] if args.tiny else [])


def run_sections(args: argparse.Namespace, report: dict, out_json: Path) -> None:
    """Each section in a fresh process within its time box; the report rewritten as results arrive."""
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    deadline = time.monotonic() + args.budget
    names = [n for n in args.sections]
    boxes = {s.name: s.budget_s for s in SECTIONS}
    boxes["_selftest_sleep"] = 10  # long enough to start and record, then cut off
    saved = 0.0  # time earlier sections left unused, passed on
    log = open(Path(args.out) / LOG_NAME, "a")
    try:
        for name in names:
            left = deadline - time.monotonic()
            box = min(boxes[name] * args.box_scale + saved, left)
            if left < 1:
                report["sections"][name] = {"status": "not run: the total budget is spent"}
                write_json(out_json, report)
                continue
            started = time.monotonic()
            log.write(f"\n===== {name} (time box {box:.0f} s) =====\n")
            log.flush()
            proc = subprocess.Popen(_child_argv(name, args, work), stdout=log, stderr=subprocess.STDOUT,
                                    cwd=str(ROOT), env={**os.environ, "PYTHONUNBUFFERED": "1"})
            status = None
            while status is None:
                try:
                    code = proc.wait(timeout=2)
                    status = "ok" if code == 0 else f"error (exit code {code}; see {LOG_NAME})"
                except subprocess.TimeoutExpired:
                    if time.monotonic() - started > box:
                        proc.kill()
                        proc.wait()
                        status = f"timeout after {box:.0f} s (figures so far kept)"
                _merge(report, name, work, status, started)
                write_json(out_json, report)
            elapsed = time.monotonic() - started
            saved = max(0.0, box - elapsed) if status == "ok" else 0.0
            print(f"[gpu] {name}: {status} in {elapsed:.0f} s", flush=True)
    finally:
        log.close()


def _merge(report: dict, name: str, work: Path, status: str | None, started: float) -> None:
    path = work / f"{name}.json"
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:  # never: the file is replaced atomically
        data = {}
    report["sections"][name] = {"status": status or "running", "seconds": round(time.monotonic() - started, 1),
                                **data}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help=f"folder for {JSON_NAME} and {LOG_NAME} (created)")
    parser.add_argument("--dry-run", action="store_true", help="validate the plan (no CUDA needed) and exit")
    parser.add_argument("--sections", default=",".join(s.name for s in SECTIONS),
                        help="comma-separated sections to run, in order (default: all)")
    parser.add_argument("--budget", type=float,
                        help=f"total seconds (default: the sections' time boxes x --box-scale; {TOTAL_BUDGET_S} s for "
                             "all at scale 1)")
    parser.add_argument("--box-scale", type=float, default=1.0,
                        help="multiply every section's time box (e.g. 3 on a slower GPU)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the smoke test)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU smoke test)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # a child: run this one section
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        return args
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    known = [s.name for s in SECTIONS]
    unknown = [s for s in args.sections if s not in known and s != "_selftest_sleep"]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(known)}")
    if args.budget is None:
        args.budget = sum(s.budget_s for s in SECTIONS if s.name in args.sections) * args.box_scale
    if args.budget <= 0 or args.box_scale <= 0:
        parser.error("--budget and --box-scale must be positive")
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        parser.error(f"--device {args.device}: cuda or cpu")
    if args.device == "cpu" and not args.tiny and not args.dry_run:
        parser.error("--device cpu runs the toy sizes only: add --tiny (the full sizes are the GPU run)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.section:  # a child process
        run_section_in_process(args.section, args, Path(args.work))
        return 0
    import torch

    if not args.dry_run and args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"CUDA is not available here (torch {torch.__version__}): run with --dry-run to check the plan, or "
              "--tiny --device cpu for the smoke test", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    out_json = out / JSON_NAME
    the_plan, problems = plan(args)
    report: dict[str, Any] = {"bench": "bench/gpu.py", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "dry_run": args.dry_run, "plan": the_plan, "plan_problems": problems, "sections": {}}
    if args.dry_run:
        write_json(out_json, report)
        print(json.dumps({"plan_ok": not problems, "problems": problems,
                          "sections": [(s["name"], s["budget_s"]) for s in the_plan["sections"]],
                          "models": the_plan["models"]}, default=str))
        return 1 if problems else 0
    write_json(out_json, report)
    started = time.monotonic()
    run_sections(args, report, out_json)
    report["total_s"] = round(time.monotonic() - started, 1)
    write_json(out_json, report)
    print(json.dumps(summary(report), default=str))
    return 0


def summary(report: dict) -> dict:
    """The headline figures (the whole report is in the JSON file)."""
    s = report["sections"]
    head: dict[str, Any] = {"total_s": report.get("total_s"),
                            "status": {k: v.get("status") for k, v in s.items()}}
    for kind in ("cogvideox", "wan"):
        if "ratios" in s.get(kind, {}):
            head[f"{kind}_ratios"] = s[kind]["ratios"]
    if "parity" in s:
        head["parity"] = {k: v for k, v in s["parity"].items() if isinstance(v, dict)}
    for kind in VAE_CLASSES:
        if "ratios" in s.get(kind, {}):
            head[f"{kind}_ratios"] = s[kind]["ratios"]
    return head


if __name__ == "__main__":
    sys.exit(main())
