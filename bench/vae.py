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

The floor (measured, not estimated, in each worker): ``params_resident_mb`` is the bytes of the model's
parameters and buffers whose pages are present in the worker after the call (/proc/self/pagemap: the
weights are mapped from the safetensors file, so untouched ones, e.g. the encoder's in a decode, are not);
``cache_peak_mb`` the bytes held by the causal convolutions' caches (ours: the ``ConvCache``'s carried
frames and running sums; diffusers': its ``feat_cache`` list), walked by a forward hook after every decoder
(encoder) call, the largest sum over those calls, each storage counted once (``cache_by_size_mb``: that
sum by frame size). ``floor_mb`` = the two: what a decode that streams over time through causal
convolutions holds at once whatever else it does. ``peak_minus_floor_mb``: the rest of the peak;
``runtime_mb`` (the resident set after loading minus the parameters then resident: interpreter, torch,
diffusers) and ``activations_mb`` (peak - runtime - floor: the call's activations, workspace and heap
slack) split it. ``floor_ratio_F``: our floor over diffusers' peak; ``floor_with_runtime_ratio_F``: our
floor plus our runtime over it. Ours also reports ``cache_check``: entries, entries of convolutions with
time kernel 1 (expected 0), dtypes, storages shared between entries and convolutions with both carried
frames and running sums (both expected 0), and bytes of storage beyond the entries' views.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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


def resident_mb(tensors) -> float | None:
    """MB of the pages under the storages of tensors that are present (or swapped) in this process: its
    own page table (/proc/self/pagemap), not the page cache (mincore would count a file another process
    read). Each storage once; pages shared by two storages once. None where pagemap cannot be read."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    spans = sorted({(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in (t.untyped_storage() for t in tensors)
                    if s.nbytes() and s.device.type == "cpu"})
    pages, end = [], -1  # merged page ranges [p0, p1)
    for a, b in spans:
        p0, p1 = max(a // page, end), -(-b // page)
        if p1 > p0:
            pages.append((p0, p1))
            end = p1
    present = 0
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        for p0, p1 in pages:
            entries = np.frombuffer(os.pread(fd, 8 * (p1 - p0), 8 * p0), dtype=np.uint64)
            present += int(np.count_nonzero(entries >> np.uint64(62)))  # bit 63 present, 62 swapped
    finally:
        os.close(fd)
    return present * page / 2**20


def _cache_entries(obj) -> list[tuple[object, str, torch.Tensor]]:
    """(key, kind, tensor) of what a causal cache holds: a ConvCache's frames and running sums (key: the
    module), or the tensors of diffusers' feat_cache list (key: the index)."""
    import torch

    if hasattr(obj, "frames") and hasattr(obj, "partials"):  # vae3d.causal_conv.ConvCache
        return ([(k, "frames", t) for k, t in obj.frames.items()]
                + [(k, "partials", t) for k, ts in obj.partials.items() for t in ts])
    if isinstance(obj, list):
        return [(i, "feat_cache", t) for i, t in enumerate(obj) if isinstance(t, torch.Tensor)]
    return []


class CacheProbe:
    """The causal caches' bytes after every call of ``module`` (a forward hook that finds the cache among the
    call's arguments: our ConvCache, diffusers' ``feat_cache``): the largest total, by frame size, and checks.
    Walking a few dozen tensors per latent frame costs nothing next to the decode; nothing is kept alive."""

    def __init__(self, module) -> None:
        self.peak_bytes, self.by_size, self.check = 0, {}, {}
        self.handle = module.register_forward_hook(self._after, with_kwargs=True)

    def _after(self, module, args, kwargs, output) -> None:
        entries = [e for a in (*args, *kwargs.values()) for e in _cache_entries(a)]
        storages, by_size = {}, {}
        for _, _, t in entries:
            s = t.untyped_storage()
            if s.data_ptr() not in storages:
                storages[s.data_ptr()] = s.nbytes()
                size = "x".join(map(str, t.shape[-2:]))
                by_size[size] = by_size.get(size, 0) + s.nbytes()
        total = sum(storages.values())
        if total >= self.peak_bytes:
            self.peak_bytes, self.by_size = total, by_size
            self.check = self._check(entries, storages)

    @staticmethod
    def _check(entries, storages) -> dict:
        kinds: dict[object, set] = {}
        for key, kind, _ in entries:
            kinds.setdefault(key, set()).add(kind)
        return {
            "entries": len(entries),
            "time_kernel_1": sum(getattr(k, "time_pad", None) == 0 for k in kinds),
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for _, _, t in entries}),
            "shared_storages": len(entries) - len(storages),
            "frames_and_partials": sum(len(v) > 1 for v in kinds.values()),
            "storage_beyond_views_mb": round(
                (sum(storages.values()) - sum(t.numel() * t.element_size() for _, _, t in entries)) / 2**20, 1),
        }

    def report(self, params_mb: float | None, peak_mb: float, rss_load_mb: float, params_load_mb: float | None,
               ours: bool) -> dict:
        """The floor's fields of a worker's record (``floor_mb`` and what splits the rest of the peak)."""
        self.handle.remove()
        cache = self.peak_bytes / 2**20
        out = {"cache_peak_mb": round(cache, 1),
               "cache_by_size_mb": {k: round(v / 2**20, 1) for k, v in sorted(
                   self.by_size.items(), key=lambda kv: -kv[1])}}
        if params_mb is not None:
            floor = params_mb + cache
            out.update(floor_mb=round(floor, 1), peak_minus_floor_mb=round(peak_mb - floor, 1))
            if params_load_mb is not None:
                runtime = rss_load_mb - params_load_mb
                out.update(runtime_mb=round(runtime, 1), activations_mb=round(peak_mb - runtime - floor, 1))
        if ours:
            out["cache_check"] = self.check
        return out


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


def worker(
    impl: str, folder: str, inputs: str, out: str | None, threads: int, op: str = "decode",
    exact_tile: list[int] | None = None,
) -> dict:
    """One measurement: load, make the weights op uses resident, run op ("decode": latents -> video,
    "encode": video -> the posterior's mode) on the saved input, report its peak and times.
    ``exact_tile`` (ours, decode): height and width of exact tiles (``enable_exact_tiling``)."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(threads)
    vae = _load(impl, folder)
    if exact_tile and impl == "ours":
        vae.enable_exact_tiling(*exact_tile)
    x = load_file(inputs)["x"]
    # Both sides map the safetensors file lazily; make the decoder's (encoder's) weights resident now so
    # that the increase below is activations (and allocator overhead) only.
    with torch.no_grad():
        for p in (vae.decoder if op == "decode" else vae.encoder).parameters():
            p.sum()
    rss_load, peak_load = _rss_mb(), peak_rss_mb()
    weights = [*vae.parameters(), *vae.buffers()]
    params_load = resident_mb(weights)
    probe = CacheProbe(vae.decoder if op == "decode" else vae.encoder)
    t0, c0 = time.perf_counter(), _cpu_s()
    with torch.no_grad():
        y = vae.decode(x).sample if op == "decode" else vae.encode(x).latent_dist.mode()
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    peak = peak_rss_mb()
    params = resident_mb(weights)
    if out:
        save_file({"y": y.contiguous()}, out)
    z, video = (x, y) if op == "decode" else (y, x)
    return {
        "impl": impl,
        **({"exact_tile": exact_tile} if exact_tile and impl == "ours" else {}),
        "latent_frames": z.shape[2],
        "frames": video.shape[2],
        "size": video.shape[-1],
        "peak_rss_mb": round(peak, 1),
        "rss_after_load_mb": round(rss_load, 1),
        f"peak_before_{op}_mb": round(peak_load, 1),
        f"{op}_peak_increase_mb": round(peak - rss_load, 1),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "params_mb": round(sum(t.numel() * t.element_size() for t in weights) / 2**20, 1),
        "params_resident_mb": round(params, 1) if params is not None else None,
        **probe.report(params, peak, rss_load, params_load, impl == "ours"),
    }


def _run_worker(
    impl: str, folder: str, inputs: str, out: str | None, threads: int, op: str, exact_tile: list[int] | None = None
) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--folder", folder, "--inputs", inputs,
           "--threads", str(threads)] + (["--encode"] if op == "encode" else []) + (["--out", out] if out else [])
    cmd += ["--exact-tile", *map(str, exact_tile)] if exact_tile else []
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
            runs.append(_run_worker(impl, str(folder), inputs, outs[impl], args.threads, op, args.exact_tile))
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
            if "floor_mb" in o:
                summary[f"floor_ratio_{f}"] = round(o["floor_mb"] / d["peak_rss_mb"], 3)
            if "runtime_mb" in o:
                summary[f"floor_with_runtime_ratio_{f}"] = round((o["floor_mb"] + o["runtime_mb"]) / d["peak_rss_mb"], 3)
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
    ap.add_argument("--exact-tile", type=int, nargs=2, metavar=("H", "W"),
                    help="ours (wan decode): exact tiles of at most H x W pixels (enable_exact_tiling)")
    ap.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = _parse_args()
    op = "encode" if args.encode else "decode"
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.inputs, args.out, args.threads, op, args.exact_tile)))
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
        **({"exact_tile": args.exact_tile} if args.exact_tile else {}),
        "torch": torch.__version__,
        "runs": runs,
        "max_abs_diff": diffs,
        **_ratios(args, op, runs),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
