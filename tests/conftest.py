"""Test-wide setup: shared helpers import both as `tests.x` and as plain `x`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
