"""How much memory a video or image request needs, from a pipeline folder's files alone (before any weights load).

`dit generate` refuses a request whose estimate exceeds the free memory of the device, naming the figure and
the largest frame count and size that fit, instead of running into an out-of-memory kill minutes later. The
estimate is coarse on purpose: it is meant to catch requests that are far out of reach (a million frames, a 64x
relay), not to predict a peak to the megabyte. Its VAE term follows the measured streaming decode of our VAEs
(vae3d: the default CogVideoX VAE's, `_VAE_MAPS`, and the Wan 2.1 VAE's, `_WAN_VAE_MAPS`; docs/vae3d.md), which
does not grow with the number of frames, and is several times high for narrow VAEs such as the demo's; `--force`
overrides it.

Each family reads its own configs (`cogvideox_shape`, `wan_shape`, `image_shape`), through its pipeline class's
`memory_shape` hook; `video_shape(folder)` finds the family from model_index.json. An image is a request of one
frame (temporal factor 1) whose decode is the 2D VAE's (`_IMAGE_VAE_MAPS`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

GiB = 1024**3
# Live activations of one transformer block per token and hidden unit (the residual, norm output, q, k, v,
# attention output and the 4x feed-forward's two activations), in units of the compute dtype.
_BLOCK_ACTIVATIONS = 16
# The streaming VAE decoder keeps about this many full-resolution feature maps of its widest full-resolution
# level alive (caches of the causal convolutions plus the block being computed; see docs/vae3d.md's profile).
_VAE_MAPS = 48
# The Wan VAE's (vae3d.WanVAE3D) depth-first decode without autograd: the causal convolutions' caches (two frames
# or running sums each) and one piece per level, counted in maps of the full-resolution level from the measured
# decode (`python bench/vae.py --vae wan`, docs/benchmarks.md) with a little margin. Wan 2.2's VAE unpatchifies
# its last level: vae_width counts it per output pixel.
_WAN_VAE_MAPS = 36
# Exact VAE tiles (--vae-tile, vae3d.wan_tiles): the maps shrink to one tile's windows, the tile plus this margin
# of output pixels on each side, which covers the halos' share of the lower levels at the sizes measured in
# docs/benchmarks.md ("Exact tiles").
_TILE_MARGIN = 24
# diffusers' 2D AutoencoderKL decoder keeps about this many maps of its widest full-resolution width (the last
# upsampler's output channels) alive: measured ~4 for SD3's VAE at 512x512 on the CPU, fp32; 6 leaves margin.
_IMAGE_VAE_MAPS = 6
# Per output pixel and frame: the decoded video in fp32, the post-processed float copy and the written uint8s.
_OUTPUT_BYTES = 3 * (4 + 4 + 1)
# Every transformer the pipeline loads counts (Wan 2.2 A14B's two experts, CogVideoX's relay stage).
WEIGHT_FOLDERS = ("transformer", "transformer_2", "relay_transformer", "vae", "text_encoder", "text_encoder_2",
                  "text_encoder_3")  # SD3's three text encoders
WAN_TEXT_TOKENS = 512  # WanPipeline's max_sequence_length
WAN_VAE_FACTORS = (8, 4)  # AutoencoderKLWan's default scale_factor_spatial, scale_factor_temporal (Wan 2.1's VAE)


@dataclass(frozen=True)
class VideoShape:
    """What the estimate needs from a pipeline folder's configs (an image family's: temporal 1, one frame)."""

    spatial: int  # VAE spatial factor
    temporal: int  # VAE temporal factor
    patch: int
    patch_t: int
    hidden: int
    text_tokens: int
    vae_width: int  # channels of the decoder's full-resolution level
    weight_numel: int
    vae_maps: int = _VAE_MAPS  # full-resolution maps of vae_width the decode keeps alive


def safetensors_numel(path: Path) -> int:
    """Number of elements stored in a safetensors file, read from its header (no tensor is loaded)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (size,) = struct.unpack("<Q", head)
        if size > os.path.getsize(path) - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {size} past the end of the file)")
        try:
            header = json.loads(fh.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None
    numel = 0
    for name, info in header.items():
        if name != "__metadata__":
            n = 1
            for d in info["shape"]:
                n *= int(d)
            numel += n
    return numel


def folder_weight_numel(folder: Path) -> int:
    """Elements of the weights the pipeline loads (transformer(s), VAE, text encoders)."""
    total = 0
    for name in WEIGHT_FOLDERS:
        sub = folder / name
        if sub.is_dir():
            total += sum(safetensors_numel(f) for f in sorted(sub.glob("*.safetensors")))
    return total


def video_shape(folder: Path) -> VideoShape:
    """The estimate's view of a pipeline folder (video or image), read by its family's `memory_shape` hook (the
    family from model_index.json through dit.pipeline.PIPELINE_FAMILIES; nothing is loaded)."""
    from dit.pipeline import generate_pipeline_class

    return generate_pipeline_class(folder).memory_shape(folder)


def image_shape(folder: Path, geometry, *, text_tokens: int) -> VideoShape:
    """An image pipeline folder (SD3, CogView3-Plus, DiT), from dit.pipeline.image_family.image_geometry: a
    one-frame request, the 2D VAE's decode at its widest full-resolution width."""
    return VideoShape(spatial=geometry.vae_factor, temporal=1, patch=geometry.patch, patch_t=1, hidden=geometry.hidden,
                      text_tokens=text_tokens, vae_width=geometry.vae_width, weight_numel=folder_weight_numel(folder),
                      vae_maps=_IMAGE_VAE_MAPS)


def cogvideox_shape(folder: Path) -> VideoShape:
    from dit.convert import read_folder_json

    t = read_folder_json(folder / "transformer", what="a CogVideoX transformer config", required={
        "patch_size": int, "num_attention_heads": int, "attention_head_dim": int},
        optional={"patch_size_t": int | None, "max_text_seq_length": int})
    v = read_folder_json(folder / "vae", what="a CogVideoX VAE config", required={
        "block_out_channels": tuple[int, ...]}, optional={"temporal_compression_ratio": int | float})
    return VideoShape(
        spatial=2 ** (len(v["block_out_channels"]) - 1), temporal=int(v.get("temporal_compression_ratio", 4)),
        patch=t["patch_size"], patch_t=t.get("patch_size_t") or 1,
        hidden=t["num_attention_heads"] * t["attention_head_dim"], text_tokens=t.get("max_text_seq_length", 226),
        vae_width=v["block_out_channels"][0], weight_numel=folder_weight_numel(folder),
    )


def wan_shape(folder: Path) -> VideoShape:
    """A WanPipeline folder: hidden = heads x head_dim, patch_size (t, h, w), the VAE's scale factors, and the
    decoder's full-resolution width (decoder_base_dim or base_dim) x dim_mult[0], over patch_size**2 where the VAE
    (TI2V-5B's) unpatchifies its last level from a 1/patch_size grid; the decode is our WanVAE3D's
    (`_WAN_VAE_MAPS`)."""
    from dit.convert import read_folder_json

    t = read_folder_json(folder / "transformer", what="a Wan transformer config", required={
        "patch_size": tuple[int, int, int], "num_attention_heads": int, "attention_head_dim": int})
    v = read_folder_json(folder / "vae", what="a Wan VAE config", optional={
        "scale_factor_spatial": int, "scale_factor_temporal": int, "base_dim": int, "decoder_base_dim": int | None,
        "dim_mult": tuple[int, ...], "patch_size": int | None})
    width = (v.get("decoder_base_dim") or v.get("base_dim", 96)) * (v.get("dim_mult") or [1])[0]
    return VideoShape(
        spatial=v.get("scale_factor_spatial", WAN_VAE_FACTORS[0]),
        temporal=v.get("scale_factor_temporal", WAN_VAE_FACTORS[1]),
        patch=t["patch_size"][1], patch_t=t["patch_size"][0],
        hidden=t["num_attention_heads"] * t["attention_head_dim"], text_tokens=WAN_TEXT_TOKENS,
        vae_width=max(1, width // (v.get("patch_size") or 1) ** 2), weight_numel=folder_weight_numel(folder),
        vae_maps=_WAN_VAE_MAPS,
    )


def video_request_bytes(shape: VideoShape, height: int, width: int, frames: int, *, relay: int | None,
                        guidance: float, dtype_bytes: int, vae_tile: tuple[int, int] | None = None) -> int:
    """Estimated peak bytes of one generation: weights, the transformer's activations (both halves of CFG)
    and the VAE decode with its output, at the relay stage's size when relay is given (``vae_tile``: in exact
    tiles of at most that many pixels)."""
    scale = relay or 1
    h, w = height * scale, width * scale
    latent_frames = (frames - 1) // shape.temporal + 1
    grid = (h // (shape.spatial * shape.patch)) * (w // (shape.spatial * shape.patch))
    tokens = shape.text_tokens + -(-latent_frames // shape.patch_t) * grid
    batch = 2 if guidance > 1 else 1
    transformer = batch * tokens * shape.hidden * _BLOCK_ACTIVATIONS * dtype_bytes
    maps_h, maps_w = (h, w) if vae_tile is None else (min(h, vae_tile[0] + 2 * _TILE_MARGIN),
                                                        min(w, vae_tile[1] + 2 * _TILE_MARGIN))
    vae = shape.vae_maps * shape.vae_width * maps_h * maps_w * dtype_bytes + frames * h * w * _OUTPUT_BYTES
    return shape.weight_numel * dtype_bytes + max(transformer, vae)


def available_bytes(device: str) -> int | None:
    """Free memory of the device the request runs on: CUDA's free memory, else the host's MemAvailable
    (and the cgroup's remaining limit, when smaller). None where it cannot be told."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and free is not None:
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def largest_fitting(shape: VideoShape, height: int, width: int, frames: int, *, relay: int | None,
                    guidance: float, dtype_bytes: int, budget: int,
                    vae_tile: tuple[int, int] | None = None) -> tuple[int | None, tuple[int, int] | None]:
    """The largest frame count (1 + kn) at height x width, and the largest size with the same aspect at `frames`
    (multiples of the VAE x patch factor), that fit `budget`; None for either where even the smallest does not."""
    def fits(h: int, w: int, f: int) -> bool:
        return video_request_bytes(shape, h, w, f, relay=relay, guidance=guidance, dtype_bytes=dtype_bytes,
                                   vae_tile=vae_tile) <= budget

    k, m = shape.temporal, shape.spatial * shape.patch
    best_frames = _largest(lambda n: fits(height, width, 1 + k * n), (frames - 1) // k)
    steps = max(1, min(height, width) // m)  # sizes scaled by s / steps, s = 1..steps, in multiples of m

    def scaled(s: int) -> tuple[int, int]:
        return max(m, height * s // steps // m * m), max(m, width * s // steps // m * m)

    best_size = _largest(lambda i: fits(*scaled(i + 1), frames), steps - 1)
    return (None if best_frames is None else 1 + k * best_frames,
            None if best_size is None else scaled(best_size + 1))


def _largest(ok, upper: int) -> int | None:
    """The largest n in [0, upper] with ok(n), ok being monotone (true then false); None if ok(0) is false."""
    if not ok(0):
        return None
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo
