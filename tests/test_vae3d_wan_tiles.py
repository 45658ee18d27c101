"""Exact spatial tiles of the Wan decoder (vae3d.wan_tiles): equal to the untiled decode (and diffusers'), the
halos no wider than needed, tiles that partition the frame, one tile's caches at a time, validation."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

import vae3d
import vae3d.wan_tiles as wan_tiles
from vae3d.wan_tiles import Span, Window

STATS = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
TINY21 = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
              **STATS)
TINY22 = dict(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
              temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
              out_channels=12, scale_factor_spatial=16, **STATS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """version -> (diffusers' model, ours loaded from the folder diffusers saved)."""
    out = {}
    for version, config in (("2.1", TINY21), ("2.2", TINY22)):
        folder = tmp_path_factory.mktemp(f"wan{version}")
        torch.manual_seed(0)
        ref = AutoencoderKLWan(**config).eval()
        ref.save_pretrained(folder)
        out[version] = ref, vae3d.load_vae(folder)
    return out


def _latents(frames: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _decode(vae, z: torch.Tensor, tile: tuple[int, int] | None) -> torch.Tensor:
    with torch.no_grad():
        if tile is None:
            vae.disable_exact_tiling()
        else:
            vae.enable_exact_tiling(*tile)
        try:
            return vae.decode(z).sample
        finally:
            vae.disable_exact_tiling()


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_exact_tiles_equal_the_untiled_decode_and_diffusers(models, version):
    ref, ours = models[version]
    z = _latents(3, 9, 7)  # 3 latent frames: the image frame, then two of 4 frames; tiles of uneven sizes
    s = ours.spatial_compression
    with torch.no_grad():
        expected = ref.decode(z).sample
    whole = _decode(ours, z, None)
    assert (whole - expected).abs().max().item() < 1e-5
    for tile in [(3 * s, 2 * s), (4 * s, 7 * s), (s, 7 * s), (9 * s, s)]:  # one-latent rows, then columns
        tiled = _decode(ours, z, tile)
        assert tiled.shape == whole.shape
        assert (tiled - whole).abs().max().item() < 1e-5, tile
        assert (tiled - expected).abs().max().item() < 1e-5, tile


def test_a_narrower_halo_changes_the_output(models, monkeypatch):
    """The halos are what the decoder sees: two convolutions fewer at either of the top levels and the seams
    differ (so the equality above is not a property of any tiling)."""
    _, ours = models["2.1"]
    z = _latents(2, 12, 12, seed=1)
    whole = _decode(ours, z, None)
    full = wan_tiles.level_convs
    for level in (2, 3):
        monkeypatch.setattr(wan_tiles, "level_convs",
                            lambda dec, level=level: [c - 2 * (i == level) for i, c in enumerate(full(dec))])
        tiled = _decode(ours, z, (48, 48))
        assert (tiled - whole).abs().max().item() > 1e-4, level
    monkeypatch.setattr(wan_tiles, "level_convs", full)
    assert (_decode(ours, z, (48, 48)) - whole).abs().max().item() < 1e-5


@pytest.mark.parametrize("latent, tile", [((9, 7), (24, 16)), ((12, 12), (48, 48)), ((5, 30), (40, 100))])
def test_tiles_partition_the_frame(models, latent, tile):
    dec = models["2.1"][1].decoder
    plans = wan_tiles.plan_tiles(dec, latent, tile)
    height, width = 8 * latent[0], 8 * latent[1]
    covered = torch.zeros(height, width, dtype=torch.int64)
    for plan in plans:
        r, c = plan.tile.rows, plan.tile.cols
        assert r.stop - r.start <= tile[0] and c.stop - c.start <= tile[1]
        assert r.start % 8 == 0 and c.start % 8 == 0  # on the latent grid
        covered[r.start : r.stop, c.start : c.stop] += 1
        # each level's window holds what it hands on, and the last one the tile
        for inner, outer in [*zip(plan.keep, plan.levels), (plan.tile, plan.levels[-1])]:
            assert outer.rows.start <= inner.rows.start and inner.rows.stop <= outer.rows.stop
            assert outer.cols.start <= inner.cols.start and inner.cols.stop <= outer.cols.stop
    assert bool((covered == 1).all())
    assert len(plans) == -(-height // tile[0]) * -(-width // tile[1])


def test_plan_windows_by_hand(models):
    """One axis worked out by hand for Wan 2.1 at 2 residual blocks per level (4 convolutions; 5 with conv_out)."""
    dec = models["2.1"][1].decoder  # num_res_blocks 1: two blocks, 4 convolutions per level
    plan = wan_tiles.plan_tile(dec, (12, 12), Window(Span(48, 96), Span(0, 96)))
    # last level (96 rows): 48..96 + 5 -> 43..96; its upsampler: 42..96 at 96 -> 21..48 at 48;
    # level 2: + 4 -> 17..48, upsampler 16..48 -> 8..24; level 1: 4..24 -> 3..24 -> 1..12; level 0: 0..12
    assert [w.rows for w in plan.levels] == [Span(0, 12), Span(2, 24), Span(16, 48), Span(42, 96)]
    assert [k.rows for k in plan.keep] == [Span(1, 12), Span(8, 24), Span(21, 48)]
    assert plan.levels[-1].cols == Span(0, 96)


def test_one_tile_of_caches_at_a_time(models):
    """Each tile has caches of its own, freed before the next: their largest total is a tile's, not the frame's."""
    _, ours = models["2.1"]
    z = _latents(3, 16, 16, seed=2)
    seen: list[int] = []
    forward = ours.decoder.forward

    def record(zi, cache=None, plan=None):
        out = forward(zi, cache) if plan is None else forward(zi, cache, plan)
        tensors = [t for t in cache.frames.values()] + [t for ts in cache.partials.values() for t in ts]
        seen.append(sum(t.numel() * t.element_size() for t in tensors))
        return out

    ours.decoder.forward = record
    try:
        _decode(ours, z, None)
        whole, seen[:] = max(seen), []
        _decode(ours, z, (64, 64))
        tiled = max(seen)
    finally:
        del ours.decoder.forward
    assert tiled < 0.6 * whole, (tiled, whole)


def test_exact_tiling_refuses_bad_input_before_decoding(models):
    _, ours = models["2.1"]
    with pytest.raises(ValueError, match=r"tile_height 100 .* multiple of the spatial compression 8; nearest valid: "
                                         r"96 or 104"):
        ours.enable_exact_tiling(100, 64)
    with pytest.raises(ValueError, match="tile_width 0"):
        ours.enable_exact_tiling(64, 0)
    assert ours.exact_tile_size is None
    ours.enable_exact_tiling(64, 64)
    try:
        with pytest.raises(ValueError, match="without autograd"):
            ours.decode(_latents(2, 4, 4))
        ours.time_parallel = object()  # what enable_parallelism sets (checked before any exchange)
        with pytest.raises(ValueError, match="exact tiles and time sharding are not combined"), torch.no_grad():
            ours.decode(_latents(2, 4, 4))
    finally:
        ours.disable_exact_tiling()
        ours.disable_parallelism()
    plan = wan_tiles.plan_tiles(ours.decoder, (4, 4), (16, 16))[0]
    with pytest.raises(ValueError, match="an exact tile is decoded without autograd"):
        ours.decoder(_latents(1, 4, 4), None, plan)  # the decoder called directly, autograd on
