"""bench.parallel's argument checks and a quick run of every mode (its counting wrappers must not break the
collectives they count)."""

import argparse
import json
import subprocess
import sys

import pytest

from bench.parallel import _message_bytes


def test_message_bytes_argument():
    assert _message_bytes("auto") == "auto" and _message_bytes("none") is None and _message_bytes("4096") == 4096
    for bad in ("0", "-5", "1k", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected auto, none or a positive byte count"):
            _message_bytes(bad)


@pytest.mark.parallel
def test_quick_ring_run_counts_its_messages():
    done = subprocess.run([sys.executable, "-m", "bench.parallel", "--quick", "--mode", "ring",
                           "--ring-message-bytes", "4096"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    assert [r["world"] for r in rows] == [1, 2, 4]
    # 4 KiB messages: many more sends per layer than the P - 1 whole blocks of the classic ring
    assert rows[1]["collectives_per_layer"]["p2p_sends"] > 1 and rows[2]["collectives_per_layer"]["p2p_sends"] > 3
