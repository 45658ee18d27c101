"""Benchmark: decode (or, with ``--encode``, encode) memory and time of vae3d against diffusers'
AutoencoderKLCogVideoX or AutoencoderKLWan.

Same weights for both: the default config of the diffusers class (``--vae cogvideox``: CogVideoX's;
``--vae wan``: Wan 2.1's) with random weights (seed 0), written once with ``save_pretrained`` and
loaded by each side (diffusers: ``from_pretrained``; ours: ``vae3d.load_vae``). Decodes random
latents (B=1, 16 channels, F latent frames, size/8). ``--encode``: encodes random pixel clips
(B=1, 3 channels, uniform in [-1, 1], 4 (F - 1) + 1 frames, size) to ``latent_dist.mode()``, the
posterior's mean; ``--frames`` and ``--compare`` still count latent frames.

Memory method: every measurement runs in a fresh subprocess; peak memory is that process's
VmHWM (``bench.common.peak_rss_mb``: the peak resident set of its own address space; not ru_maxrss,
which a worker inherits from its parent's size at fork) (Python, torch, the weights that
are resident, activations). ``rss_after_load_mb`` is the resident set right after loading
with the decoder's (encode: the encoder's) weights made resident (/proc/self/statm) and
``decode_peak_increase_mb`` (``encode_peak_increase_mb``) the peak minus that: activations, caches
and allocator overhead. Time: wall clock and process CPU time (user + system) of the decode
(encode) call alone; the CPU time is less sensitive to other processes on a shared machine.
``max_abs_diff``: of the videos (encode: of the latents), ours against diffusers'.

Run (one benchmark at a time on the machine):
    flock /tmp/bench.lock python3 bench/vae.py                 # CogVideoX, 128 x 128
    flock /tmp/bench.lock python3 bench/vae.py --vae wan       # Wan 2.1, 256 x 256, 5 / 13 / 21 latents
    flock /tmp/bench.lock python3 bench/vae.py --vae wan --encode   # 17 / 49 / 81 frames -> 5 / 13 / 21 latents
Prints one JSON object.
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (python bench/vae.py): the repository's packages
    sys.path.insert(0, str(ROOT))

from bench.common import peak_rss_mb  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --vae -> the diffusers class, and the defaults of size and latent frame counts.
VAES = {
    "cogvideox": dict(cls="AutoencoderKLCogVideoX", size=128, frames=[5, 13, 25], compare=[13]),
    "wan": dict(cls="AutoencoderKLWan", size=256, frames=[5, 13, 21], compare=[5, 13, 21]),
}
# Both default configs: 16 latent channels, 8x in space, 4x in time (the first frame on its own).
Z_CHANNELS, SPATIAL, TEMPORAL = 16, 8, 4


def default_config_folder(folder: Path, vae: str = "cogvideox") -> Path:
    """The diffusers class's default config with random weights (seed 0), saved into folder unless there."""
    if not (folder / "config.json").is_file():
        import diffusers
        import torch

        torch.manual_seed(0)
        getattr(diffusers, VAES[vae]["cls"])().save_pretrained(folder)
    return folder


def _load(impl: str, folder: str):
    if impl == "diffusers":
        import diffusers

        cls_name = json.loads((Path(folder) / "config.json").read_text())["_class_name"]
        return getattr(diffusers, cls_name).from_pretrained(folder).eval()
    import vae3d

    return vae3d.load_vae(folder)


def worker(impl: str, folder: str, inputs: str, out: str | None, threads: int, op: str = "decode") -> dict:
    """One measurement: load, make the weights op uses resident, run op ("decode": latents -> video,
    "encode": video -> the posterior's mode) on the saved input, report its peak and times."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(threads)
    vae = _load(impl, folder)
    x = load_file(inputs)["x"]
    # Both sides map the safetensors file lazily; make the decoder's (encoder's) weights resident now so
    # that the increase below is activations (and allocator overhead) only.
    with torch.no_grad():
        for p in (vae.decoder if op == "decode" else vae.encoder).parameters():
            p.sum()
    rss_load, peak_load = _rss_mb(), peak_rss_mb()
    t0, c0 = time.perf_counter(), _cpu_s()
    with torch.no_grad():
        y = vae.decode(x).sample if op == "decode" else vae.encode(x).latent_dist.mode()
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    peak = peak_rss_mb()
    if out:
        save_file({"y": y.contiguous()}, out)
    z, video = (x, y) if op == "decode" else (y, x)
    return {
        "impl": impl,
        "latent_frames": z.shape[2],
        "frames": video.shape[2],
        "size": video.shape[-1],
        "peak_rss_mb": round(peak, 1),
        "rss_after_load_mb": round(rss_load, 1),
        f"peak_before_{op}_mb": round(peak_load, 1),
        f"{op}_peak_increase_mb": round(peak - rss_load, 1),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
    }


def _run_worker(impl: str, folder: str, inputs: str, out: str | None, threads: int, op: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--folder", folder, "--inputs", inputs,
           "--threads", str(threads)] + (["--encode"] if op == "encode" else []) + (["--out", out] if out else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _input(op: str, latent_frames: int, size: int):
    """Seeded random input: latents (decode) or a pixel clip in [-1, 1] (encode) for latent_frames."""
    import torch

    g = torch.Generator().manual_seed(latent_frames)
    if op == "decode":
        return torch.randn(1, Z_CHANNELS, latent_frames, size // SPATIAL, size // SPATIAL, generator=g)
    return torch.rand(1, 3, TEMPORAL * (latent_frames - 1) + 1, size, size, generator=g) * 2 - 1


def _measure(args, op: str, folder: Path, tmp: Path) -> tuple[list[dict], dict]:
    """Every run (diffusers, then ours, per latent frame count) and, per compared count, max |ours - diffusers|."""
    from safetensors.torch import load_file, save_file

    runs, diffs = [], {}
    for f in sorted(set(args.frames) | set(args.compare)):
        inputs = str(tmp / f"in{f}.safetensors")
        save_file({"x": _input(op, f, args.size)}, inputs)
        outs = {}
        for impl in (["diffusers"] if f in args.compare else []) + ["ours"]:
            outs[impl] = str(tmp / f"{impl}{f}.safetensors") if f in args.compare else None
            runs.append(_run_worker(impl, str(folder), inputs, outs[impl], args.threads, op))
            print(json.dumps(runs[-1]), file=sys.stderr)
        if f in args.compare:
            a, b = load_file(outs["diffusers"])["y"], load_file(outs["ours"])["y"]
            diffs[f] = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return runs, diffs


def _ratios(args, op: str, runs: list[dict]) -> dict:
    """Our peak's growth over --frames, and per compared count ours / diffusers of peak, increase and times."""
    ours = {r["latent_frames"]: r for r in runs if r["impl"] == "ours"}
    ref = {r["latent_frames"]: r for r in runs if r["impl"] == "diffusers"}
    summary = {}
    peaks = [ours[f]["peak_rss_mb"] for f in args.frames if f in ours]
    if len(peaks) > 1:
        summary["ours_peak_growth"] = round(max(peaks) / min(peaks) - 1, 4)
    for f in args.compare:
        if f in ours and f in ref:
            o, d = ours[f], ref[f]
            summary[f"peak_ratio_ours_over_diffusers_{f}"] = round(o["peak_rss_mb"] / d["peak_rss_mb"], 3)
            inc = f"{op}_peak_increase_mb"
            summary[f"{op}_increase_ratio_{f}"] = round(o[inc] / d[inc], 3)
            summary[f"wall_ratio_{f}"] = round(o["wall_s"] / d["wall_s"], 3)
            summary[f"cpu_ratio_{f}"] = round(o["cpu_s"] / d["cpu_s"], 3)
    return summary


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", choices=sorted(VAES), default="cogvideox", help="which VAE (default config of each)")
    ap.add_argument("--encode", action="store_true", help="measure encode (pixels -> latents) instead of decode")
    ap.add_argument("--size", type=int, help="output height and width (pixels; default 128, wan: 256)")
    ap.add_argument("--frames", type=int, nargs="+", help="latent frame counts for ours (default 5 13 25, wan: 5 13 21)")
    ap.add_argument("--compare", type=int, nargs="+", help="latent frame counts run on both (default 13, wan: 5 13 21)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder", help="reuse a saved default-config folder (created if missing)")
    ap.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = _parse_args()
    op = "encode" if args.encode else "decode"
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.inputs, args.out, args.threads, op)))
        return
    defaults = VAES[args.vae]
    args.size = args.size or defaults["size"]
    args.frames = args.frames or defaults["frames"]
    args.compare = args.compare or defaults["compare"]

    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="vae_bench_"))
    folder = default_config_folder(Path(args.folder) if args.folder else tmp / "vae", args.vae)
    runs, diffs = _measure(args, op, folder, tmp)
    summary: dict = {
        "benchmark": f"vae {op}, default {defaults['cls']} config, random weights (seed 0)",
        "memory_method": "VmHWM of a fresh subprocess per measurement (peak resident set of its own address space)",
        "size": args.size,
        "threads": args.threads,
        "torch": torch.__version__,
        "runs": runs,
        "max_abs_diff": diffs,
        **_ratios(args, op, runs),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
