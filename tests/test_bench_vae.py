"""bench/vae.py end to end on a tiny Wan VAE: decode and --encode run both sides in workers and compare them."""

import json
import sys

import pytest
import torch
from diffusers import AutoencoderKLWan

from bench import vae


@pytest.mark.parametrize("op", ["decode", "encode"])
def test_bench_reports_both_sides_and_their_ratios(op, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(tmp_path / "vae")
    monkeypatch.setattr(sys, "argv", ["bench/vae.py", "--vae", "wan", "--folder", str(tmp_path / "vae"),
                                      "--size", "16", "--frames", "1", "2", "--compare", "2", "--threads", "1"]
                        + (["--encode"] if op == "encode" else []))
    vae.main()
    record = json.loads(capsys.readouterr().out)
    assert record["benchmark"].startswith(f"vae {op}, default AutoencoderKLWan config")
    assert [(r["impl"], r["latent_frames"], r["frames"], r["size"]) for r in record["runs"]] == [
        ("ours", 1, 1, 16), ("diffusers", 2, 5, 16), ("ours", 2, 5, 16)]  # 2 latents: 1 + 4 frames
    assert all(r[f"{op}_peak_increase_mb"] >= 0 and f"peak_before_{op}_mb" in r for r in record["runs"])
    assert record["max_abs_diff"]["2"] < 1e-4  # the videos (encode: the latents) agree
    assert {"ours_peak_growth", f"{op}_increase_ratio_2", "peak_ratio_ours_over_diffusers_2",
            "wall_ratio_2", "cpu_ratio_2", "floor_ratio_2", "floor_with_runtime_ratio_2"} <= set(record)
    for r in record["runs"]:  # the floor, measured: the resident weights plus the caches (here tiny: kB)
        assert 0 < r["params_resident_mb"] <= r["params_mb"] + 0.1 and r["cache_by_size_mb"]
        assert r["floor_mb"] == pytest.approx(r["params_resident_mb"] + r["cache_peak_mb"], abs=0.11)
        assert r["cache_peak_mb"] == pytest.approx(sum(r["cache_by_size_mb"].values()), abs=0.1 * len(r["cache_by_size_mb"]))
    ours = [r for r in record["runs"] if r["impl"] == "ours"]
    assert all(r["cache_check"]["entries"] > 0 and r["cache_check"]["dtypes"] == ["float32"] for r in ours)
    assert all(r["cache_check"][k] == 0 for r in ours for k in ("time_kernel_1", "shared_storages", "frames_and_partials"))


def test_the_worker_decodes_ours_in_exact_tiles(tmp_path):
    """--exact-tile H W reaches ours (in the worker, here in-process): 2 x 2 tiles of the 16 x 16 frame, the
    untiled video; diffusers' worker ignores it."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(tmp_path / "vae")
    save_file({"x": torch.randn(1, 16, 2, 2, 2)}, tmp_path / "in.safetensors")
    threads = torch.get_num_threads()
    try:
        runs = {tile and tuple(tile): vae.worker("ours", str(tmp_path / "vae"), str(tmp_path / "in.safetensors"),
                                                  str(tmp_path / f"out{tile}.safetensors"), 1, "decode", tile)
                for tile in (None, [8, 8])}
        ref = vae.worker("diffusers", str(tmp_path / "vae"), str(tmp_path / "in.safetensors"), None, 1, "decode",
                         [8, 8])
    finally:
        torch.set_num_threads(threads)
    assert runs[(8, 8)]["exact_tile"] == [8, 8] and "exact_tile" not in runs[None] and "exact_tile" not in ref
    tiled, whole = (load_file(tmp_path / f"out{t}.safetensors")["y"] for t in ([8, 8], None))
    assert tiled.shape == whole.shape == (1, 3, 5, 16, 16) and (tiled - whole).abs().max().item() < 1e-5


def test_resident_mb_counts_touched_pages_only():
    """The pagemap walk sees which pages of a tensor this process has touched (64 MB: always its own mmap)."""
    t = torch.empty(16 * 2**20)  # 64 MB, untouched
    assert vae.resident_mb([t]) < 4
    t[: t.numel() // 2].fill_(1.0)
    assert 31 < vae.resident_mb([t, t[:10]]) < 36  # half of it; a view of the same storage counts once
