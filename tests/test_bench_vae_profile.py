"""bench/vae_profile.py end to end on a tiny VAE: the sampler runs, frame batches and blocks are attributed."""

import json
import sys

import torch
from diffusers import AutoencoderKLCogVideoX

from bench import vae_profile


def test_profile_attributes_memory_to_frame_batches_and_blocks(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).save_pretrained(tmp_path / "vae")
    monkeypatch.setattr(sys, "argv", ["bench.vae_profile", "--folder", str(tmp_path / "vae"), "--size", "64",
                                      "--latent-frames", "5", "--threads", str(torch.get_num_threads())])
    vae_profile.main()
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(record["resident_at_batch_start_mb"]) == 2  # 5 latent frames: diffusers' batches of 3 and 2
    # Which blocks a 3 ms sampler catches in a decode this small varies; every one it names is a decoder block.
    blocks = {"conv_in", "mid_block", "norm_out", "conv_out"} | {f"up_blocks.{i}" for i in range(4)}
    assert record["block_max_increase_mb"] and set(record["block_max_increase_mb"]) <= blocks
    assert record["decode_peak_increase_mb"] >= 0
