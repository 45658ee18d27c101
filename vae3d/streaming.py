"""Streaming encode/decode: frame batches with carried conv caches, spatial tiling, batch slicing.

For either VAE (``vae3d.autoencoder.CausalAutoencoder``). Frame batching ``"diffusers"`` reproduces
diffusers' CogVideoX ``_encode``/``_decode``: frames in batches of ``num_sample_frames_batch_size``
(latents: ``num_latent_frames_batch_size``), the first batch also taking the remainder. ``"causal"``
puts the first frame alone and then fixed batches, so a prefix of the video encodes to a prefix of the
latents (Wan's default, as diffusers' Wan: 1 then 4 frames, 1 latent frame at a time). CogVideoX's
GroupNorm statistics are per batch in both (that is what the released weights were run with in
diffusers); Wan has no statistics over frames, so its batching changes nothing but memory and speed.

Only one batch's activations are alive at a time plus the caches, so peak memory does not grow
with the number of frames; the output is written into one preallocated tensor.

Tiling reproduces diffusers' ``tiled_encode``/``tiled_decode`` (tile grid, linear blending of the
already blended neighbours, cropping; the geometry is the model's ``tile_grid``) but loops over frame
batches outside the tiles, with one cache per tile, so it streams too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .causal_conv import ConvCache

if TYPE_CHECKING:
    from .autoencoder import CausalAutoencoder as CausalVAE3D  # either VAE
    from .wan_tiles import TilePlan

FRAME_BATCHING = ("diffusers", "causal")


# -- validation (before any compute) ------------------------------------------------------------


def nearest_multiples(value: int, step: int, offset: int = 0) -> list[int]:
    """The valid values ``offset + step * k`` (>= offset + step if offset == 0) around ``value``."""
    low = offset + step * ((value - offset) // step)
    cands = [v for v in (low, low + step) if v >= max(offset, 1)]
    return sorted(set(cands))


def check_video(vae: CausalVAE3D, x: torch.Tensor) -> None:
    """ValueError naming the value and the accepted ones if x is not (B, C, 1 + r*k, s*i, s*j)."""
    if x.ndim != 5:
        raise ValueError(f"expected a video tensor (B, C, F, H, W), got shape {tuple(x.shape)}")
    _, c, f, h, w = x.shape
    if c != vae.video_in_channels:
        raise ValueError(f"got {c} input channels (shape {tuple(x.shape)}); this VAE takes {vae.video_in_channels}")
    r, s = vae.temporal_compression, vae.spatial_compression
    if f < 1 or (f - 1) % r != 0:
        near = " or ".join(map(str, nearest_multiples(f, r, offset=1)))
        raise ValueError(f"num_frames {f} is not 1 + {r}k; nearest valid frame counts: {near}")
    for name, v in (("height", h), ("width", w)):
        if v < 1 or v % s != 0:
            near = " or ".join(map(str, nearest_multiples(v, s)))
            raise ValueError(f"{name} {v} is not a multiple of the spatial compression {s}; nearest valid: {near}")
    _check_batching(vae)


def check_latents(vae: CausalVAE3D, z: torch.Tensor) -> None:
    if z.ndim != 5:
        raise ValueError(f"expected latents (B, C, F, h, w), got shape {tuple(z.shape)}")
    c = z.shape[1]
    if c != vae.z_channels:
        raise ValueError(f"got {c} latent channels (shape {tuple(z.shape)}); this VAE has {vae.z_channels}")
    if min(z.shape[2:]) < 1:
        raise ValueError(f"latents have an empty dimension: shape {tuple(z.shape)}")
    _check_batching(vae)
    if vae.exact_tile_size is not None:
        _check_exact_tiles(vae)


def _check_exact_tiles(vae: CausalVAE3D) -> None:
    """Exact tiles run the depth-first decoder, which keeps nothing for autograd, on one process."""
    if torch.is_grad_enabled():
        raise ValueError("exact tiles decode without autograd: call decode under torch.no_grad() (or "
                         "torch.inference_mode()), or disable_exact_tiling() to decode with gradients")
    if vae.is_parallel:
        raise ValueError("exact tiles and time sharding are not combined: call disable_exact_tiling() or "
                         "disable_parallelism()")


def _check_batching(vae: CausalVAE3D) -> None:
    if vae.frame_batching not in FRAME_BATCHING:
        raise ValueError(f"frame_batching {vae.frame_batching!r}; choose one of {FRAME_BATCHING}")
    r = vae.temporal_compression
    if vae.num_sample_frames_batch_size % r != 0 or vae.num_sample_frames_batch_size < r:
        raise ValueError(
            f"num_sample_frames_batch_size {vae.num_sample_frames_batch_size} must be a positive multiple of {r}"
        )
    if vae.num_latent_frames_batch_size < 1:
        raise ValueError(f"num_latent_frames_batch_size {vae.num_latent_frames_batch_size} must be >= 1")


def _load_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Give memory freed by the last frame batch back to the OS (glibc ``malloc_trim``).

    Mid-sized tensors (a few frames) come from glibc's heap, not from mmap; without this, holes
    left by one batch's temporaries add up over batches and resident memory creeps with length.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# -- frame batches ----------------------------------------------------------------------------------


def frame_batches(num_frames: int, batch_size: int, mode: str = "diffusers") -> list[slice]:
    """The frame ranges processed together.

    diffusers: ``max(F // n, 1)`` batches of n, the remainder ``F % n`` added to the first.
    causal: ``[0, 1)`` then batches of n (the last one may be shorter).
    """
    if mode == "causal":
        return [slice(0, 1)] + [slice(s, min(s + batch_size, num_frames)) for s in range(1, num_frames, batch_size)]
    count = max(num_frames // batch_size, 1)
    rem = num_frames % batch_size
    return [
        slice(batch_size * i + (0 if i == 0 else rem), min(batch_size * (i + 1) + rem, num_frames))
        for i in range(count)
    ]


def decoded_frames(vae: CausalVAE3D, latent_frames: int, at_start: bool) -> int:
    """Frames one decoder call gives for a batch of latent frames (the model's first-frame rule)."""
    r = vae.temporal_compression
    if at_start and vae.first_frame_is_image(latent_frames):
        return 1 + r * (latent_frames - 1)
    return r * latent_frames


# -- whole-frame streaming ---------------------------------------------------------------------------


def _encode_frames(vae: CausalVAE3D, x: torch.Tensor):
    """Yield the posterior moments of each frame batch of x (B, C, F, H, W)."""
    cache = ConvCache()
    for sl in frame_batches(x.shape[2], vae.num_sample_frames_batch_size, vae.frame_batching):
        h = vae.encoder(vae.to_encoder(x[:, :, sl].contiguous()), cache)  # (B, 2 * latent, f, h, w)
        cache.at_start = False
        release_freed_memory()
        if vae.quant_conv is not None:
            h = vae.quant_conv(h)
        yield h


def _decode_frames(vae: CausalVAE3D, z: torch.Tensor, plan: TilePlan | None = None):
    """Yield the decoded frames of each latent-frame batch of z (B, latent, F, h, w) (``plan``: of one exact
    tile, ``vae3d.wan_tiles``)."""
    cache = ConvCache()
    for sl in frame_batches(z.shape[2], vae.num_latent_frames_batch_size, vae.frame_batching):
        zi = z[:, :, sl].contiguous()
        if vae.post_quant_conv is not None:
            zi = vae.post_quant_conv(zi)
        y = vae.decoder(zi, cache) if plan is None else vae.decoder(zi, cache, plan)
        y = vae.from_decoder(y)  # (B, C, f, H, W)
        cache.at_start = False
        release_freed_memory()
        yield y


def _output_frames(vae: CausalVAE3D, latent_frames: int) -> int:
    batches = frame_batches(latent_frames, vae.num_latent_frames_batch_size, vae.frame_batching)
    return sum(decoded_frames(vae, len(range(latent_frames)[sl]), i == 0) for i, sl in enumerate(batches))


def encode(vae: CausalVAE3D, x: torch.Tensor) -> torch.Tensor:
    """x (B, C, F, H, W) -> moments (B, 2 * latent, 1 + (F - 1) / r, H / s, W / s), sliced/tiled as enabled."""
    if vae.use_slicing and x.shape[0] > 1:
        return torch.cat([encode(vae, xs) for xs in x.split(1)])
    if vae.use_tiling and (x.shape[4] > vae.tile_sample_min_width or x.shape[3] > vae.tile_sample_min_height):
        return tiled_encode(vae, x)
    return torch.cat(list(_encode_frames(vae, x)), dim=2)


def decode(vae: CausalVAE3D, z: torch.Tensor) -> torch.Tensor:
    """z (B, latent, F, h, w) -> video (B, C, frames, h * s, w * s), sliced/tiled as enabled."""
    if vae.use_slicing and z.shape[0] > 1:
        return torch.cat([decode(vae, zs) for zs in z.split(1)])
    if vae.exact_tile_size is not None:
        return exact_tiled_decode(vae, z)
    if vae.use_tiling and (z.shape[4] > vae.tile_latent_min_width or z.shape[3] > vae.tile_latent_min_height):
        return tiled_decode(vae, z)
    out = _new_video(vae, z)
    t = 0
    for y in _decode_frames(vae, z):
        out[:, :, t : t + y.shape[2]] = y
        t += y.shape[2]
    assert t == out.shape[2], (t, out.shape)
    return out


def _new_video(vae: CausalVAE3D, z: torch.Tensor) -> torch.Tensor:
    """The uninitialised video that latents z (B, latent, F, h, w) decode to."""
    b, _, f, h, w = z.shape
    s = vae.spatial_compression
    return z.new_empty(b, vae.video_out_channels, _output_frames(vae, f), h * s, w * s)


def exact_tiled_decode(vae: CausalVAE3D, z: torch.Tensor) -> torch.Tensor:
    """Decode one exact spatial tile at a time, each over all frames with caches of its own, into one
    video: equal to the untiled decode (``vae3d.wan_tiles``)."""
    out = _new_video(vae, z)
    plans, p = vae.exact_tile_plans(z.shape[3], z.shape[4])
    for plan in plans:
        rows = slice(p * plan.tile.rows.start, p * plan.tile.rows.stop)
        cols = slice(p * plan.tile.cols.start, p * plan.tile.cols.stop)
        t = 0
        for y in _decode_frames(vae, z, plan):  # y (B, C, f, rows, cols)
            out[:, :, t : t + y.shape[2], rows, cols] = y
            t += y.shape[2]
        assert t == out.shape[2], (t, out.shape)
    return out


# -- tiling -------------------------------------------------------------------------------------------


def _blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Blend the bottom rows of a into the top rows of b, linearly (in place on b, as diffusers)."""
    extent = min(a.shape[3], b.shape[3], extent)
    for y in range(extent):
        b[:, :, :, y, :] = a[:, :, :, -extent + y, :] * (1 - y / extent) + b[:, :, :, y, :] * (y / extent)
    return b


def _blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    extent = min(a.shape[4], b.shape[4], extent)
    for x in range(extent):
        b[:, :, :, :, x] = a[:, :, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, :, x] * (x / extent)
    return b


@dataclass(frozen=True)
class TileGrid:
    """Spatial tiles: each ``size`` (input units) at every (row, col) start; ``blend`` output rows/columns
    blended with the upper/left neighbour, ``keep`` kept; the stitched result cropped to ``crop`` (or not)."""

    size: tuple[int, int]
    rows: list[int]
    cols: list[int]
    blend: tuple[int, int]
    keep: tuple[int, int]
    crop: tuple[int, int] | None = None


def _stitch(tiles: list[list[torch.Tensor]], grid: TileGrid) -> torch.Tensor:
    """Blend each tile with its (already blended) upper and left neighbours, crop, concatenate."""
    rows = []
    for i, row in enumerate(tiles):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend_v(tiles[i - 1][j], tile, grid.blend[0])
            if j > 0:
                tile = _blend_h(row[j - 1], tile, grid.blend[1])
            out_row.append(tile[:, :, :, : grid.keep[0], : grid.keep[1]])
        rows.append(torch.cat(out_row, dim=4))
    out = torch.cat(rows, dim=3)
    return out if grid.crop is None else out[:, :, :, : grid.crop[0], : grid.crop[1]]


def tiled_encode(vae: CausalVAE3D, x: torch.Tensor) -> torch.Tensor:
    """Encode in overlapping spatial tiles (diffusers' geometry and blending), streamed over frames.

    The tiles are cut from what the encoder takes (``to_encoder``: Wan 2.2's patches), as diffusers does.
    """
    out = []
    grid, caches = None, {}
    for sl in frame_batches(x.shape[2], vae.num_sample_frames_batch_size, vae.frame_batching):
        xs = vae.to_encoder(x[:, :, sl].contiguous())  # (B, C, f, H, W)
        if grid is None:
            grid = vae.tile_grid(True, xs.shape[3], xs.shape[4])
            caches = {(i, j): ConvCache() for i in grid.rows for j in grid.cols}
        th, tw = grid.size
        tiles = []
        for i in grid.rows:
            row = []
            for j in grid.cols:
                cache = caches[(i, j)]
                h = vae.encoder(xs[:, :, :, i : i + th, j : j + tw].contiguous(), cache)
                cache.at_start = False
                row.append(vae.quant_conv(h) if vae.quant_conv is not None else h)
            tiles.append(row)
        out.append(_stitch(tiles, grid))
        release_freed_memory()
    return torch.cat(out, dim=2)


def tiled_decode(vae: CausalVAE3D, z: torch.Tensor) -> torch.Tensor:
    """Decode in overlapping spatial tiles (diffusers' geometry and blending), streamed over frames."""
    grid = vae.tile_grid(False, z.shape[3], z.shape[4])
    lh, lw = grid.size
    caches = {(i, j): ConvCache() for i in grid.rows for j in grid.cols}
    out = []
    for sl in frame_batches(z.shape[2], vae.num_latent_frames_batch_size, vae.frame_batching):
        tiles = []
        for i in grid.rows:
            row = []
            for j in grid.cols:
                zi = z[:, :, sl, i : i + lh, j : j + lw].contiguous()
                if vae.post_quant_conv is not None:
                    zi = vae.post_quant_conv(zi)
                cache = caches[(i, j)]
                row.append(vae.decoder(zi, cache))
                cache.at_start = False
            tiles.append(row)
        out.append(vae.from_decoder(_stitch(tiles, grid)))
        release_freed_memory()
    return torch.cat(out, dim=2)
