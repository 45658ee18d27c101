"""The Wan VAE (Wan 2.1: 16 latent channels, 8x space, 4x time; Wan 2.2 TI2V-5B: 48 channels, patches of
2 x 2, residual levels, 16x space): encoder, decoder, and ``WanVAE3D``, a drop-in for diffusers'
``AutoencoderKLWan`` (same config keys, parameter names, outputs).

It is the causal VAE of ``vae3d`` in another configuration: the same causal convolution (starting
from zero frames), cache, streaming, tiling and time sharding as CogVideoX's ``CausalVAE3D`` (the
API around encoder and decoder is ``CausalAutoencoder``'s), with Wan's blocks (``vae3d.wan``). The
encoder takes the first frame alone and then 4 frames at a time, the decoder one latent frame at a
time, as diffusers does; without autograd the decoder runs depth first (``vae3d.wan_lowmem``).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn

from . import lowmem, streaming, wan_lowmem, wan_tiles
from .autoencoder import CausalAutoencoder
from .causal_conv import ConvCache, FlatCausalConv3d, checkpointed
from .streaming import release_freed_memory
from .wan_tiles import TilePlan
from .wan import (AttentionBlock, MidBlock, Resample, ResidualBlock, ResidualDownBlock, ResidualUpBlock, RMSNorm,
                  UpBlock)

# diffusers' AutoencoderKLWan defaults (the Wan 2.1 VAE's latent statistics).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class WanEncoder3d(nn.Module):
    """Video (B, C, 1 + 4k, H, W) -> moments (B, 2 Z, 1 + k, H / 8, W / 8) (WanEncoder3d).

    Wan 2.1: ``down_blocks`` is a flat list of residual blocks (attention where ``attn_scales`` says)
    and resamplers; Wan 2.2 (``is_residual``): one ``ResidualDownBlock`` per level.
    """

    def __init__(
        self, in_channels: int, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
        attn_scales: tuple[float, ...], temperal_downsample: tuple[bool, ...], dropout: float, is_residual: bool,
    ) -> None:
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv_in = FlatCausalConv3d(in_channels, dims[0], 3)
        self.down_blocks = nn.ModuleList()
        scale = 1.0
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dim_mult) - 1
            if is_residual:
                temporal = bool(temperal_downsample[i]) if not last else False
                self.down_blocks.append(ResidualDownBlock(a, b, dropout, num_res_blocks, temporal, down=not last))
                continue
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResidualBlock(a, b, dropout))
                if scale in attn_scales:
                    self.down_blocks.append(AttentionBlock(b))
                a = b
            if not last:
                self.down_blocks.append(Resample(b, "downsample3d" if temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.mid_block = MidBlock(dims[-1], dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = FlatCausalConv3d(dims[-1], z_dim, 3)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        h = self.conv_in(x, cache)  # (B, C0, T, H, W)
        for layer in self.down_blocks:  # each layer (2.1) or level (2.2) checkpointed when that is on
            h = checkpointed(self, layer, h, cache=cache)
            if not torch.is_grad_enabled() and h.device.type == "cpu":
                release_freed_memory()  # heap holes of the block's temporaries (see CogVideoX's encoder)
        h = checkpointed(self, self.mid_block, h, cache=cache)
        return self.conv_out(h, cache, self.norm_out.transform())  # (B, 2 Z, T', h, w)


class WanDecoder3d(nn.Module):
    """Latents (B, Z, F, h, w) -> video (B, C, 1 + 4 (F - 1), 8 h, 8 w) (WanDecoder3d).

    Wan 2.1: ``UpBlock`` levels whose upsamplers halve the channels; Wan 2.2: ``ResidualUpBlock``s.
    """

    def __init__(
        self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
        temperal_upsample: tuple[bool, ...], dropout: float, out_channels: int, is_residual: bool,
    ) -> None:
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv_in = FlatCausalConv3d(z_dim, dims[0], 3)
        self.mid_block = MidBlock(dims[0], dropout)
        self.up_blocks = nn.ModuleList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0 and not is_residual:
                a //= 2  # Wan 2.1's upsamplers halve the channels
            mode = None
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            level = ResidualUpBlock if is_residual else UpBlock
            self.up_blocks.append(level(a, b, num_res_blocks, dropout, mode))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = FlatCausalConv3d(dims[-1], out_channels, 3)
        self.gradient_checkpointing = False
        self.time_factor = 2 ** sum(block.up is not None and block.up.mode == "upsample3d" for block in self.up_blocks)

    def forward(self, z: torch.Tensor, cache: ConvCache | None = None, plan: TilePlan | None = None) -> torch.Tensor:
        """``plan``: decode only that exact tile (``vae3d.wan_tiles``; without autograd, unsharded)."""
        # z's first frame is the video's image frame when the batch starts it (a time shard: rank 0's)
        shard = cache.shard if cache is not None else None
        image_first = shard.image_first if shard is not None else cache is None or cache.at_start
        if lowmem.active() and shard is None:  # a shard runs whole: its halos are exchanged once per call
            return wan_lowmem.decode(self, z, cache, image_first, plan)
        if plan is not None:
            raise ValueError("an exact tile is decoded without autograd and unsharded (vae3d.wan_tiles)")
        h = checkpointed(self, self.mid_block, self.conv_in(z, cache), cache=cache)  # (B, C, F, h, w)
        for block in self.up_blocks:  # each level checkpointed when that is on (diffusers' levels)
            h = checkpointed(self, block, h, image_first, cache=cache)
        return self.conv_out(h, cache, self.norm_out.transform())  # (B, C_out, T, H, W)


def spatial_factor(dim_mult: tuple[int, ...], patch_size: int | None) -> int:
    """Pixels per latent along height and width: 2 per level after the first, times the patch size (Wan 2.2)."""
    return 2 ** (len(dim_mult) - 1) * (patch_size or 1)


def patchify(x: torch.Tensor, p: int | None) -> torch.Tensor:
    """Video (B, C, T, p H, p W) -> (B, C p p, T, H, W), diffusers' channel order (c, column, row)."""
    if not p or p == 1:
        return x
    return rearrange(x, "b c t (h ph) (w pw) -> b (c pw ph) t h w", ph=p, pw=p)


def unpatchify(x: torch.Tensor, p: int | None) -> torch.Tensor:
    """The inverse of ``patchify``: (B, C p p, T, H, W) -> (B, C, T, p H, p W)."""
    if not p or p == 1:
        return x
    return rearrange(x, "b (c pw ph) t h w -> b c t (h ph) (w pw)", ph=p, pw=p)


# Named configurations: diffusers' defaults (Wan 2.1) and the Wan 2.2 TI2V-5B VAE.
PRESETS: dict[str, dict] = {
    "wan2.1": {},
    "wan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16, latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48),
}


def _check_config(dim_mult, temperal_downsample, in_channels: int, out_channels: int, patch_size) -> None:
    """ValueError naming what the architecture cannot be built from."""
    if len(dim_mult) < 1 or len(temperal_downsample) < len(dim_mult) - 1:
        raise ValueError(
            f"temperal_downsample {list(temperal_downsample)} needs an entry for each of the {len(dim_mult) - 1} "
            f"resampling levels of dim_mult {list(dim_mult)}"
        )
    p2 = (patch_size or 1) ** 2
    for name, c in (("in_channels", in_channels), ("out_channels", out_channels)):
        if c % p2:
            raise ValueError(f"{name} {c} is not a multiple of patch_size^2 = {p2} (patch_size {patch_size})")


class WanVAE3D(CausalAutoencoder, ModelMixin, ConfigMixin):
    """KL autoencoder with the Wan causal 3D encoder/decoder; drop-in for diffusers' AutoencoderKLWan.

    ``encode(x).latent_dist`` / ``decode(z).sample`` (clamped to [-1, 1], as diffusers) run in frame
    batches with carried caches, so memory does not grow with the number of frames; tiling, slicing
    and time sharding as ``CausalVAE3D``. The pipeline maps latents with the config's ``latents_mean``
    / ``latents_std`` (``scale_latents`` / ``unscale_latents``).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResidualBlock", "AttentionBlock", "Resample"]

    @register_to_config
    def __init__(
        self,
        base_dim: int = 96,
        decoder_base_dim: int | None = None,
        z_dim: int = 16,
        dim_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: tuple[float, ...] = (),
        temperal_downsample: tuple[bool, ...] = (False, True, True),
        dropout: float = 0.0,
        latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN,
        latents_std: tuple[float, ...] = WAN21_LATENTS_STD,
        is_residual: bool = False,
        in_channels: int = 3,
        out_channels: int = 3,
        patch_size: int | None = None,
        scale_factor_temporal: int | None = 4,
        scale_factor_spatial: int | None = 8,
    ) -> None:
        super().__init__()
        dim_mult, temperal_downsample = tuple(dim_mult), tuple(bool(t) for t in temperal_downsample)
        _check_config(dim_mult, temperal_downsample, in_channels, out_channels, patch_size)
        self.z_dim = z_dim
        self.temperal_downsample = list(temperal_downsample)  # diffusers' attribute names (pipelines read them)
        self.temperal_upsample = list(temperal_downsample[::-1])
        args = (dim_mult, num_res_blocks)
        self.encoder = WanEncoder3d(in_channels, base_dim, z_dim * 2, *args, tuple(attn_scales), temperal_downsample,
                                    dropout, is_residual)
        self.quant_conv = FlatCausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.post_quant_conv = FlatCausalConv3d(z_dim, z_dim, 1)
        self.decoder = WanDecoder3d(decoder_base_dim or base_dim, z_dim, *args, tuple(self.temperal_upsample),
                                    dropout, out_channels, is_residual)
        # diffusers' Wan batching: the first frame alone, then one latent frame's worth at a time.
        levels = len(dim_mult) - 1
        self._time = 2 ** sum(temperal_downsample[:levels])
        self._space = spatial_factor(dim_mult, patch_size)
        self.init_options(latent_batch=1, sample_batch=self._time, frame_batching="causal")
        self.tile_sample_min_height = self.tile_sample_min_width = 256
        self.tile_sample_stride_height = self.tile_sample_stride_width = 192

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "WanVAE3D":
        """A randomly initialised model from a named preset (``PRESETS``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # -- shapes and hooks (what streaming and parallel ask) -----------------------------------------

    @property
    def spatial_compression(self) -> int:
        return self._space

    @property
    def temporal_compression(self) -> int:
        return self._time

    @property
    def video_in_channels(self) -> int:
        return self.config.in_channels // (self.config.patch_size or 1) ** 2

    @property
    def video_out_channels(self) -> int:
        return self.config.out_channels // (self.config.patch_size or 1) ** 2

    @property
    def z_channels(self) -> int:
        return self.config.z_dim

    def first_frame_is_image(self, latent_frames: int) -> bool:
        return True  # Wan decodes the first latent frame to one frame, whatever the batch

    def to_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.config.patch_size)

    def from_decoder(self, y: torch.Tensor) -> torch.Tensor:
        """Unpatchify, then clamp to [-1, 1] (diffusers' output range; in place without autograd)."""
        y = unpatchify(y, self.config.patch_size)
        return y.clamp_(-1.0, 1.0) if lowmem.active() else y.clamp(-1.0, 1.0)

    def tile_grid(self, encode: bool, height: int, width: int) -> streaming.TileGrid:
        """diffusers' Wan geometry. Encoding: tiles of tile_sample_min (in the patched input's units) every
        tile_sample_stride; decoding: tiles of tile_sample_min / s latents; the overlap is blended."""
        p, s = self.config.patch_size or 1, self.spatial_compression
        size = (self.tile_sample_min_height, self.tile_sample_min_width)
        stride = (self.tile_sample_stride_height, self.tile_sample_stride_width)
        if encode:  # height, width: the patched input's; outputs in latents (s / p of them)
            e = s // p
            tile, step = size, stride
            out, out_stride, crop = [n // e for n in size], [n // e for n in stride], (height // e, width // e)
        else:  # height, width: latents; outputs in the decoder's (patched) pixels
            tile, step = [n // s for n in size], [n // s for n in stride]
            out, out_stride, crop = [n // p for n in size], [n // p for n in stride], (height * s // p, width * s // p)
        blend = (out[0] - out_stride[0], out[1] - out_stride[1])
        return streaming.TileGrid(tuple(tile), list(range(0, height, step[0])), list(range(0, width, step[1])), blend,
                                  tuple(out_stride), crop)

    # -- options (diffusers' AutoencoderMixin API; the rest is CausalAutoencoder's) ------------------

    def enable_tiling(
        self,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        tile_sample_stride_height: int | None = None,
        tile_sample_stride_width: int | None = None,
    ) -> None:
        """Encode/decode large frames in overlapping spatial tiles blended linearly (as diffusers)."""
        self.use_tiling = True
        self.tile_sample_min_height = tile_sample_min_height or self.tile_sample_min_height
        self.tile_sample_min_width = tile_sample_min_width or self.tile_sample_min_width
        self.tile_sample_stride_height = tile_sample_stride_height or self.tile_sample_stride_height
        self.tile_sample_stride_width = tile_sample_stride_width or self.tile_sample_stride_width

    def enable_exact_tiling(self, tile_height: int = 256, tile_width: int = 256) -> None:
        """Decode in spatial tiles of at most tile_height x tile_width pixels, one at a time over all frames,
        with a result equal to the untiled decode (``vae3d.wan_tiles``: each tile's windows reach past it as
        far as the decoder sees; no blending). Memory: one tile's caches and activations instead of the whole
        frame's; time: the halos' compute. Decode only (encode is unaffected), without autograd, unsharded."""
        s = self.spatial_compression
        for name, v in (("tile_height", tile_height), ("tile_width", tile_width)):
            if not isinstance(v, int) or v < s or v % s:
                near = " or ".join(map(str, streaming.nearest_multiples(v, s))) if isinstance(v, int) else ""
                near = near or str(s)
                raise ValueError(f"{name} {v!r} is not a positive multiple of the spatial compression {s}; "
                                 f"nearest valid: {near}")
        self.exact_tile_size = (tile_height, tile_width)

    def disable_exact_tiling(self) -> None:
        self.exact_tile_size = None

    def exact_tile_plans(self, height: int, width: int) -> tuple[list[TilePlan], int]:
        p = self.config.patch_size or 1
        size = (self.exact_tile_size[0] // p, self.exact_tile_size[1] // p)
        return wan_tiles.plan_tiles(self.decoder, (height, width), size), p

    # -- latent normalisation (what a diffusion model sees) ------------------------------------------

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=z.dtype, device=z.device).view(shape)
        return mean, std

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior sample -> diffusion-model latents: (z - latents_mean) / latents_std, as diffusers' pipelines."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``scale_latents``: what ``decode`` takes."""
        mean, std = self._stats(z)
        return z * std + mean
