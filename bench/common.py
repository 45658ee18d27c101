"""Shared benchmark helpers: medians of wall time, ours and a reference timed rep by rep, peak memory of a
fresh process (VmHWM around one forward), seeded random weights, JSON output.

torch is imported inside the helpers that need it: a worker that only reports its peak stays a bare process.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def median_time(fn: Callable[[], object], *, warmup: int = 1, reps: int = 3) -> float:
    """Median wall time of fn() in seconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """This process's own peak resident memory in MB: VmHWM, the high-water mark of its address space.

    Not ru_maxrss: Linux carries that over fork and exec, so a worker started by a parent that was
    larger at the time (a bench that has just built and saved a model) reports the parent's size.
    ru_maxrss (KiB) only where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(module: str, *args: str) -> dict:
    """Run `python -m module args` in a fresh process (so peak memory is its own) and parse its JSON line."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def emit(record: dict) -> None:
    print(json.dumps(record, sort_keys=True))


def status_kb(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def forward_peak_rss(fn: Callable[[], object]) -> dict:
    """Peak resident memory of this process while fn() runs: reset the kernel's peak-RSS mark
    (/proc/self/clear_refs "5") to the resident set just before, run fn, read VmHWM. Returns the peak and that
    peak minus the resident set before it (activations and workspace), in MB."""
    before = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    fn()
    peak = status_kb("VmHWM")
    return {"peak_rss_mb": round(peak / 1024, 1), "forward_extra_mb": round((peak - before) / 1024, 1)}


def run_json(argv: list[str]) -> dict:
    """Run argv in a fresh process (so its peak memory is its own) and parse the last line of its stdout as JSON;
    a failure raises with the tail of the child's stderr."""
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def randomize_weights_(model, seed: int = 0, std: float = 0.02):
    """Overwrite every parameter with seeded N(0, std^2), in parameter order, so that both implementations
    load the same non-trivial weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def interleaved_times(fns: dict[str, Callable[[], object]], *, warmup: int, reps: int,
                      sync: Callable[[], object] | None = None) -> tuple[dict[str, object], dict[str, list[float]]]:
    """Call every fn once (its output is returned: the first warm-up), `warmup - 1` more rounds untimed, then
    `reps` timed rounds, the fns one after another in each round, so that load from other processes hits all
    alike. `sync` (e.g. torch.cuda.synchronize) runs before each clock read. Returns (outputs, times in s)."""
    sync = sync or (lambda: None)
    outs = {name: fn() for name, fn in fns.items()}
    for _ in range(warmup - 1):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return outs, times


def time_summary(times: dict[str, list[float]], ours: str = "ours", ref: str = "diffusers") -> dict:
    """Median and minimum per implementation (in `times`' order), the median of the per-rep ratios ours / ref,
    and every time, rounded to ms."""
    return {
        **{f"{impl}_median_s": round(statistics.median(t), 3) for impl, t in times.items()},
        **{f"{impl}_min_s": round(min(t), 3) for impl, t in times.items()},
        # Rep by rep the two ran back to back, so their ratio cancels most of the load from other processes.
        f"paired_ratio_{ours}_over_{ref}_median": round(
            statistics.median(o / d for o, d in zip(times[ours], times[ref])), 3),
        **{f"{impl}_all_s": [round(x, 3) for x in t] for impl, t in times.items()},
    }


def max_abs_diff(ours, ref) -> tuple[float, float]:
    """max |ours - ref| over two tensors (compared in fp32), absolute and relative to max |ref|."""
    ours, ref = ours.float(), ref.float()
    diff = (ours - ref).abs().max()
    return diff.item(), (diff / ref.abs().max()).item()
