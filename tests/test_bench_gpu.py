"""bench/gpu.py without a GPU: --dry-run validates the plan (time boxes, shapes, models built on the meta device,
memory against an H100's), the sections run at toy sizes on the CPU, and a section cut off by its time box leaves
the figures it had recorded in the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = str(ROOT / "bench" / "gpu.py")


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_dry_run_validates_the_full_plan_without_cuda(tmp_path):
    out = _run("--out", str(tmp_path), "--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["plan_ok"] and line["problems"] == []
    report = json.loads((tmp_path / "gpu.json").read_text())
    plan = report["plan"]
    assert [s["name"] for s in plan["sections"]] == ["env", "attention", "parity", "cogvideox", "wan", "vae",
                                                          "wan_vae"]
    assert plan["sum_of_time_boxes_s"] <= 480 and plan["budget_s"] <= 480
    cog, wan = plan["models"]["cogvideox"], plan["models"]["wan"]
    assert cog["tokens"] == 226 + 13 * 30 * 45 and cog["batch"] == 2  # 49 x 480 x 720, guidance batch
    assert wan["tokens"] == 21 * 30 * 52  # 81 x 480 x 832
    assert 1.6e9 < cog["parameters"] < 1.8e9 and 1.3e9 < wan["parameters"] < 1.5e9
    assert max(cog["memory_bound_gib"], wan["memory_bound_gib"]) < 78
    assert plan["sizes"]["vae"]["latent"] == [1, 16, 13, 60, 90]
    assert plan["sizes"]["wan_vae"]["latent"] == [1, 16, 21, 60, 104]  # 81 x 480 x 832


def test_dry_run_reports_a_plan_over_budget(tmp_path):
    out = _run("--out", str(tmp_path), "--dry-run", "--budget", "100")
    assert out.returncode == 1
    assert "over the budget of 100" in json.loads(out.stdout.strip().splitlines()[-1])["problems"][0]


def test_bad_arguments_are_refused(tmp_path):
    out = _run("--out", str(tmp_path), "--sections", "env,warp")
    assert out.returncode == 2 and "unknown sections ['warp']" in out.stderr
    out = _run("--out", str(tmp_path), "--device", "cpu")
    assert out.returncode == 2 and "add --tiny" in out.stderr


def test_without_cuda_the_real_run_stops_at_once(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = _run("--out", str(tmp_path), "--sections", "env")
    assert out.returncode == 2 and "CUDA is not available" in out.stderr


def test_sections_run_at_toy_sizes_on_the_cpu(tmp_path):
    """Every measurement's code path, in-process (one import of torch and diffusers), at toy sizes."""
    sys.path.insert(0, str(ROOT))
    import torch

    from bench import gpu

    args = gpu.parse_args(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--compile-backend", "aot_eager"])
    names = ("env", "attention", "parity", "cogvideox", "vae", "wan_vae")
    for name in names:
        gpu.run_section_in_process(name, args, tmp_path)
    torch._dynamo.reset()
    read = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in names}
    assert read["env"]["attention_kernels"]["sdpa"] == "installed"
    row = read["attention"]["cogvideox_2b"]["sdpa"]
    assert "error" not in row, row
    assert row["out_rel_error"] < 1e-2 and row["ring_merge_rel_error"] < 1e-2 and row["lse_max_abs_error"] < 1e-2
    for kind in ("cogvideox", "sd3", "wan"):
        p = read["parity"][kind]
        assert p["fp32_ours_vs_diffusers"] < 1e-5 and p["finite"], (kind, p)
        assert p["bf16_ours_vs_fp32"] < 2 * p["bf16_diffusers_vs_fp32"] + 1e-3, (kind, p)
    cog = read["cogvideox"]
    for name in ("ours_eager", "diffusers_eager", "ours_compiled", "diffusers_compiled"):
        assert "median_s" in cog[name], (name, cog[name])
    assert cog["ours_compiled"]["graphs_compiled"] == 1 and cog["ours_compiled"]["graphs_compiled_by_later_steps"] == 0
    assert cog["diffusers_eager"]["rel_error_vs_ours_eager"] < 1e-2
    assert "eager_median_s_ours_over_diffusers" in cog["ratios"]
    assert read["vae"]["rel_error_ours_vs_diffusers"] < 1e-2
    wan_vae = read["wan_vae"]
    assert wan_vae["rel_error_ours_vs_diffusers"] < 1e-2 and wan_vae["rel_error_ours_exact_tiles_vs_diffusers"] < 1e-2
    assert wan_vae["ours_exact_tiles"]["output_shape"] == wan_vae["diffusers"]["output_shape"] == [1, 3, 9, 64, 64]


def test_a_section_over_its_time_box_keeps_its_figures(tmp_path):
    out = _run("--out", str(tmp_path), "--tiny", "--device", "cpu", "--sections", "_selftest_sleep", "--budget", "30",
               timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "gpu.json").read_text())
    section = report["sections"]["_selftest_sleep"]
    assert section["status"].startswith("timeout") and section["before_sleep"] == 1
    assert (tmp_path / "gpu.log").exists()
