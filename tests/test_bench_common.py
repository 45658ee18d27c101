"""bench.common: the peak memory a benchmark worker reports is its own, not its parent's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_workers_peak_is_not_its_parents():
    """Linux carries ru_maxrss over fork and exec: a small worker of a large parent would report the
    parent's size (as bench/vae.py's workers did after the bench had built and saved the model)."""
    ballast = torch.ones(64 * 2**20)  # 256 MB, resident: the parent is now much larger than the worker
    parent = _rss_mb()
    code = "from bench.common import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    worker = float(out.stdout.strip())
    assert worker < 100 < parent - 200, (worker, parent)  # a bare Python process: tens of MB
    del ballast
