"""bench.cache runs end to end on the demo model, and at each threshold ours and diffusers' hooks (on diffusers'
transformer with the same weights) run the same blocks and give the same clips."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_ours_equals_diffusers():
    out = subprocess.run([sys.executable, "-m", "bench.cache", "--quick", "--every", "100", "--thresholds", "0.3",
                          "--mag-thresholds", "0.3"], capture_output=True, text=True, check=True, cwd=ROOT)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {r["setting"]: r for r in record["rows"]}
    assert rows["uncached"]["block_evaluations"] == record["steps"] * record["layers"]
    for ours, theirs in [("ours fbc:0.3", "diffusers FirstBlockCacheConfig(0.3)"),
                         ("ours mag:0.3", "diffusers MagCacheConfig(0.3)")]:
        assert rows[ours]["block_evaluations"] == rows[theirs]["block_evaluations"]
        assert rows[ours]["block_evaluations"] < rows["uncached"]["block_evaluations"]
        assert abs(rows[ours]["psnr_db"] - rows[theirs]["psnr_db"]) < 0.01
    assert len(record["mag_ratios"]) == record["steps"]
