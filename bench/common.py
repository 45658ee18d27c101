"""Shared benchmark helpers: medians of wall time, peak memory of a fresh process, JSON output."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
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
