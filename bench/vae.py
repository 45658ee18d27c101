"""Benchmark: decode memory and time of vae3d against diffusers' AutoencoderKLCogVideoX or AutoencoderKLWan.

Same weights for both: the default config of the diffusers class (``--vae cogvideox``: CogVideoX's;
``--vae wan``: Wan 2.1's) with random weights (seed 0), written once with ``save_pretrained`` and
loaded by each side (diffusers: ``from_pretrained``; ours: ``vae3d.load_vae``). Decodes random
latents (B=1, 16 channels, F latent frames, size/8).

Memory method: every measurement runs in a fresh subprocess; peak memory is that process's
VmHWM (``bench.common.peak_rss_mb``: the peak resident set of its own address space; not ru_maxrss,
which a worker inherits from its parent's size at fork) (Python, torch, the weights that
are resident, activations). ``rss_after_load_mb`` is the resident set right after loading
with the decoder's weights made resident (/proc/self/statm) and ``decode_peak_increase_mb`` the
peak minus that: activations, caches and allocator overhead. Time: wall clock and
process CPU time (user + system) of the decode call alone; the CPU time is less sensitive to
other processes on a shared machine.

Run (one benchmark at a time on the machine):
    flock /tmp/bench.lock python3 bench/vae.py                 # CogVideoX, 128 x 128
    flock /tmp/bench.lock python3 bench/vae.py --vae wan       # Wan 2.1, 256 x 256, 5 / 13 / 21 latents
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


def default_config_folder(folder: Path, vae: str = "cogvideox") -> Path:
    """The diffusers class's default config with random weights (seed 0), saved into folder unless there."""
    if not (folder / "config.json").is_file():
        import diffusers
        import torch

        torch.manual_seed(0)
        getattr(diffusers, VAES[vae]["cls"])().save_pretrained(folder)
    return folder


def worker(impl: str, folder: str, latents: str, out: str | None, threads: int) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(threads)
    if impl == "diffusers":
        import diffusers

        cls_name = json.loads((Path(folder) / "config.json").read_text())["_class_name"]
        vae = getattr(diffusers, cls_name).from_pretrained(folder).eval()
    else:
        import vae3d

        vae = vae3d.load_vae(folder)
    z = load_file(latents)["z"]
    # Both sides map the safetensors file lazily; make the decoder's weights resident now so that
    # the decode increase below is activations (and allocator overhead) only.
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.sum()
    rss_load, peak_load = _rss_mb(), peak_rss_mb()
    t0, c0 = time.perf_counter(), _cpu_s()
    with torch.no_grad():
        video = vae.decode(z).sample
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    peak = peak_rss_mb()
    if out:
        save_file({"video": video.contiguous()}, out)
    return {
        "impl": impl,
        "latent_frames": z.shape[2],
        "frames": video.shape[2],
        "size": video.shape[-1],
        "peak_rss_mb": round(peak, 1),
        "rss_after_load_mb": round(rss_load, 1),
        "peak_before_decode_mb": round(peak_load, 1),
        "decode_peak_increase_mb": round(peak - rss_load, 1),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
    }


def _run_worker(impl: str, folder: str, latents: str, out: str | None, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--folder", folder, "--latents", latents, "--threads", str(threads)]
    if out:
        cmd += ["--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", choices=sorted(VAES), default="cogvideox", help="which VAE (default config of each)")
    ap.add_argument("--size", type=int, help="output height and width (pixels; default 128, wan: 256)")
    ap.add_argument("--frames", type=int, nargs="+", help="latent frame counts for ours (default 5 13 25, wan: 5 13 21)")
    ap.add_argument("--compare", type=int, nargs="+", help="latent frame counts run on both (default 13, wan: 5 13 21)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder", help="reuse a saved default-config folder (created if missing)")
    ap.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--latents", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.latents, args.out, args.threads)))
        return
    defaults = VAES[args.vae]
    args.size = args.size or defaults["size"]
    args.frames = args.frames or defaults["frames"]
    args.compare = args.compare or defaults["compare"]

    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="vae_bench_"))
    folder = default_config_folder(Path(args.folder) if args.folder else tmp / "vae", args.vae)

    runs = []
    diffs = {}
    for f in sorted(set(args.frames) | set(args.compare)):
        g = torch.Generator().manual_seed(f)
        z = torch.randn(1, 16, f, args.size // 8, args.size // 8, generator=g)
        latents = str(tmp / f"z{f}.safetensors")
        save_file({"z": z}, latents)
        outs = {}
        impls = (["diffusers"] if f in args.compare else []) + (["ours"] if f in args.frames or f in args.compare else [])
        for impl in impls:
            out = str(tmp / f"{impl}{f}.safetensors") if f in args.compare else None
            runs.append(_run_worker(impl, str(folder), latents, out, args.threads))
            print(json.dumps(runs[-1]), file=sys.stderr)
            outs[impl] = out
        if f in args.compare:
            a, b = load_file(outs["diffusers"])["video"], load_file(outs["ours"])["video"]
            diffs[f] = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(a.shape)} vs {tuple(b.shape)}"

    ours = {r["latent_frames"]: r for r in runs if r["impl"] == "ours"}
    ref = {r["latent_frames"]: r for r in runs if r["impl"] == "diffusers"}
    summary: dict = {
        "benchmark": f"vae decode, default {defaults['cls']} config, random weights (seed 0)",
        "memory_method": "VmHWM of a fresh subprocess per measurement (peak resident set of its own address space)",
        "size": args.size,
        "threads": args.threads,
        "torch": torch.__version__,
        "runs": runs,
        "max_abs_diff": diffs,
    }
    peaks = [ours[f]["peak_rss_mb"] for f in args.frames if f in ours]
    if len(peaks) > 1:
        summary["ours_peak_growth"] = round(max(peaks) / min(peaks) - 1, 4)
    for f in args.compare:
        if f in ours and f in ref:
            summary[f"peak_ratio_ours_over_diffusers_{f}"] = round(ours[f]["peak_rss_mb"] / ref[f]["peak_rss_mb"], 3)
            summary[f"decode_increase_ratio_{f}"] = round(
                ours[f]["decode_peak_increase_mb"] / ref[f]["decode_peak_increase_mb"], 3
            )
            summary[f"wall_ratio_{f}"] = round(ours[f]["wall_s"] / ref[f]["wall_s"], 3)
            summary[f"cpu_ratio_{f}"] = round(ours[f]["cpu_s"] / ref[f]["cpu_s"], 3)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
