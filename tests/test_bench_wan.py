"""bench/wan.py: a --quick run end to end (the JSON it prints, outputs that agree), and its argument checks,
which must not need CUDA or build a model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import wan

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_prints_the_comparison():
    done = subprocess.run([sys.executable, "bench/wan.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["setup"] == "quick" and record["device"] == "cpu"
    for row in ("fp32", "bf16"):
        r = record[row]
        for impl in ("ours", "diffusers"):
            assert r[f"{impl}_median_s"] > 0 and r[f"{impl}_memory"]["peak_rss_mb"] > 0
            assert "forward_extra_mb" in r[f"{impl}_memory"]
        assert "paired_ratio_ours_over_diffusers_median" in r
        for key in ("time", "peak", "forward_extra"):
            assert record["ratios"][f"{row}_{key}_ours_over_diffusers"] > 0
    # The same weights and inputs: the same output, to fp32 / bf16 rounding.
    assert record["fp32"]["max_abs_diff_rel_to_scale"] <= 1e-5
    assert record["bf16"]["max_abs_diff_rel_to_scale"] <= 5e-2
    assert record["targets"] == {"time_ours_over_diffusers": {"fp32": 0.9, "bf16": 0.85},
                                 "peak_ours_over_diffusers": 0.9}
    assert set(record["targets_met"]) == {
        "time ours <= 0.9x diffusers, fp32", "time ours <= 0.85x diffusers, bf16",
        "peak memory ours <= 0.9x diffusers, fp32", "peak memory ours <= 0.9x diffusers, bf16"}


@pytest.mark.parametrize("argv, message", [
    (["--reps", "0"], "--reps 0: give at least 1"),
    (["--warmup", "0"], "--warmup 0: give at least 1"),
    (["--threads", "0"], "--threads 0: give at least 1"),
    (["--quick", "--full"], "not allowed with argument"),
    (["--full"], "--full is the GPU run (the whole 1.3B at 81 x 480 x 832, 30 layers): add --device cuda"),
    (["--device", "cuda"], "--device cuda: CUDA is not available here"),
    (["--full", "--device", "cuda"], "--device cuda: CUDA is not available here"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_arguments_fail_without_cuda(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(wan.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        wan.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_arguments_are_accepted_where_cuda_is(monkeypatch):
    monkeypatch.setattr(wan.torch.cuda, "is_available", lambda: True)
    args = wan.parse_args(["--full", "--device", "cuda"])
    assert (args.setup, args.warmup, args.reps) == ("full", 2, 5)
    assert [row[0] for row in wan.SETUPS["full"]["rows"]] == ["bf16", "bf16_compiled"]
    assert wan.parse_args(["--quick"]).setup == "quick" and wan.parse_args([]).setup == "default"
