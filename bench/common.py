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
    """This process's peak resident memory (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(module: str, *args: str) -> dict:
    """Run `python -m module args` in a fresh process (so peak memory is its own) and parse its JSON line."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def emit(record: dict) -> None:
    print(json.dumps(record, sort_keys=True))
