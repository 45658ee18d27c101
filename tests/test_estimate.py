"""dit.estimate: weights counted from safetensors headers, each family's configs read (CogVideoX, Wan), the request
estimate's growth, and what fits."""

import pytest
import torch
from safetensors.torch import save_file

from dit.estimate import (VideoShape, folder_weight_numel, largest_fitting, safetensors_numel, video_request_bytes,
                          video_shape)
from tests.tiny import tiny_cogvideox_pipeline, tiny_wan_pipeline

SHAPE = VideoShape(spatial=8, temporal=4, patch=2, patch_t=1, hidden=1920, text_tokens=226, vae_width=128,
                   weight_numel=2_000_000_000)
OPTS = dict(relay=None, guidance=6.0, dtype_bytes=2)


def test_numel_from_the_header_equals_the_tensors(tmp_path):
    tensors = {"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16), "c": torch.zeros(())}
    save_file(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    assert safetensors_numel(tmp_path / "w.safetensors") == 15 + 7 + 1


@pytest.mark.parametrize("content", [b"", b"\x01\x02", b"\xff" * 8 + b"{}", (8).to_bytes(8, "little") + b"not json"])
def test_a_file_that_is_not_safetensors_is_named(tmp_path, content):
    (tmp_path / "w.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match="w.safetensors: not a safetensors file"):
        safetensors_numel(tmp_path / "w.safetensors")


def test_folder_counts_the_pipeline_weights(tmp_path):
    pipe = tiny_cogvideox_pipeline(tmp_path)
    expected = sum(p.numel() for m in (pipe.transformer, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert folder_weight_numel(tmp_path) == expected
    assert video_shape(tmp_path).weight_numel == expected


def test_wan_folders_read_the_wan_configs_and_count_both_experts(tmp_path):
    pipe = tiny_wan_pipeline(tmp_path / "a14b", two_experts=True)
    expected = sum(p.numel() for m in (pipe.transformer, pipe.transformer_2, pipe.vae, pipe.text_encoder)
                   for p in m.parameters())
    assert video_shape(tmp_path / "a14b") == VideoShape(  # hidden: 2 heads x 12; UMT5's 512 text tokens
        spatial=8, temporal=4, patch=2, patch_t=1, hidden=24, text_tokens=512, vae_width=3, weight_numel=expected,
        vae_maps=36)  # our WanVAE3D's measured decode, not CogVideoX's 48 maps
    tiny_wan_pipeline(tmp_path / "ti2v", ti2v=True)
    ti2v = video_shape(tmp_path / "ti2v")  # VAE x16; its last level: base_dim 8 on a 1/2 grid, 8 / 2**2 per pixel
    assert (ti2v.spatial, ti2v.temporal, ti2v.vae_width) == (16, 4, 2)


def test_the_estimate_grows_with_every_dimension_and_relay():
    base = video_request_bytes(SHAPE, 480, 720, 49, **OPTS)
    assert video_request_bytes(SHAPE, 480, 720, 97, **OPTS) > base
    assert video_request_bytes(SHAPE, 960, 720, 49, **OPTS) > base
    assert video_request_bytes(SHAPE, 480, 720, 49, **dict(OPTS, relay=2)) > base
    assert video_request_bytes(SHAPE, 480, 720, 49, **dict(OPTS, guidance=1.0)) <= base  # no CFG half
    assert video_request_bytes(SHAPE, 480, 720, 49, **dict(OPTS, dtype_bytes=4)) > base


def test_exact_vae_tiles_shrink_the_decode_term_to_a_tile():
    wan = VideoShape(spatial=8, temporal=4, patch=2, patch_t=1, hidden=64, text_tokens=512, vae_width=96,
                     weight_numel=1000, vae_maps=36)  # a small transformer: the VAE term is the peak
    whole = video_request_bytes(wan, 480, 832, 81, **OPTS)
    tiled = video_request_bytes(wan, 480, 832, 81, **OPTS, vae_tile=(240, 416))
    output = 81 * 480 * 832 * 3 * 9  # the decoded video and its copies stay whole
    assert tiled - output == pytest.approx((whole - output) * (288 * 464) / (480 * 832), rel=1e-3)
    assert video_request_bytes(wan, 480, 832, 81, **OPTS, vae_tile=(960, 960)) == whole  # one tile: the frame
    frames, _ = largest_fitting(wan, 480, 832, 1001, budget=tiled, **OPTS)
    tiled_frames, _ = largest_fitting(wan, 480, 832, 1001, budget=tiled, **OPTS, vae_tile=(240, 416))
    assert tiled_frames >= 81 and frames is None  # untiled, no frame count fits: the maps do not shrink with frames


def test_largest_fitting_is_the_boundary():
    budget = video_request_bytes(SHAPE, 480, 720, 49, **OPTS)
    frames, size = largest_fitting(SHAPE, 480, 720, 1001, budget=budget, **OPTS)
    assert (frames - 1) % 4 == 0 and frames >= 49
    assert video_request_bytes(SHAPE, 480, 720, frames, **OPTS) <= budget
    assert video_request_bytes(SHAPE, 480, 720, frames + 4, **OPTS) > budget
    frames, size = largest_fitting(SHAPE, 4800, 7200, 49, budget=budget, **OPTS)
    h, w = size
    assert h % 16 == 0 and w % 16 == 0 and h <= 4800 and w <= 7200
    assert video_request_bytes(SHAPE, h, w, 49, **OPTS) <= budget
    assert frames is None  # at 4800x7200 not even one frame fits this budget
    assert largest_fitting(SHAPE, 480, 720, 49, budget=1, **OPTS) == (None, None)  # the weights alone do not fit
