"""Test-wide setup: shared helpers import both as `tests.x` and as plain `x`; torch's thread count kept per test."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _torch_threads():
    """A benchmark's main(), called in-process by its test, sets torch's thread count for the whole process (e.g.
    --threads 1): put it back, so that the tests after it do not run on one core."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
