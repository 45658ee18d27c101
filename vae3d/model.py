"""CogVideoX causal 3D VAE (Yang et al. 2024, "CogVideoX"): encoder, decoder, KL wrapper, presets.

Reads top to bottom like the architecture: down/mid/up blocks, the encoder (8x space, 4x time),
the decoder with latent-conditioned SpatialNorm, and ``CausalVAE3D``, the AutoencoderKL-style
wrapper whose config keys equal diffusers' ``AutoencoderKLCogVideoX`` so that its folders load.

Every module works on one frame batch (B, C, T, H, W) at a time; the state between batches (conv
caches, whether the batch starts the video) is a ``ConvCache`` passed down. Frame batching,
tiling and slicing live in ``streaming``.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from . import lowmem, streaming
from .autoencoder import CausalAutoencoder
from .blocks import Downsample3D, ResnetBlock3D, SpatialNorm3D, Upsample3D, cache_stats, group_norm_transform
from .causal_conv import CausalConv3d, ConvCache, checkpointed, checkpointing

DOWN_BLOCK = "CogVideoXDownBlock3D"
UP_BLOCK = "CogVideoXUpBlock3D"


class DownBlock3D(nn.Module):
    """ResNet blocks, then (except for the last block) 2x spatial and optionally 2x time downsampling.

    Blocks are named as in diffusers. Without gradient checkpointing the encoder/decoder loop over
    their layers themselves, so that a block's input is freed as soon as its first layer is done with
    it; ``forward`` is the block as one call, what the encoder checkpoints (as diffusers' blocks, each
    ResNet block is checkpointed again inside it).
    """

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, eps: float,
        dropout: float, add_downsample: bool, compress_time: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps, dropout)
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample3D(out_channels, out_channels, compress_time)]) if add_downsample else None
        )
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        at_start = cache is None or cache.at_start
        for resnet in self.resnets:
            x = checkpointed(self, resnet, x, None, cache=cache)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, at_start)  # (B, C, T', H / 2, W / 2)
        return x


class MidBlock3D(nn.Module):
    """Two ResNet blocks at the lowest resolution (SpatialNorm in the decoder)."""

    def __init__(
        self, channels: int, groups: int, eps: float, dropout: float, spatial_norm_dim: int | None = None
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(channels, channels, groups, eps, dropout, spatial_norm_dim) for _ in range(2)
        )
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None, cache: ConvCache | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = checkpointed(self, resnet, x, zq, cache=cache)
        return x


class UpBlock3D(nn.Module):
    """ResNet blocks with SpatialNorm, then (except for the last block) 2x space, optionally 2x time."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, eps: float,
        dropout: float, spatial_norm_dim: int, add_upsample: bool, compress_time: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps, dropout, spatial_norm_dim)
            for i in range(num_layers)
        )
        self.upsamplers = (
            nn.ModuleList([Upsample3D(out_channels, out_channels, compress_time)]) if add_upsample else None
        )
        self.gradient_checkpointing = False

    def forward(
        self, x: torch.Tensor, zq: torch.Tensor, image_first: bool, cache: ConvCache | None = None
    ) -> torch.Tensor:
        """The block as one call (what the decoder checkpoints); ``image_first``: the decoder's."""
        for resnet in self.resnets:
            x = checkpointed(self, resnet, x, zq, cache=cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, image_first)  # (B, C, T', 2h, 2w)
        return x


def _check_block_types(types: tuple[str, ...], expected: str, name: str) -> None:
    bad = [t for t in types if t != expected]
    if bad:
        raise ValueError(f"{name} {bad!r} is not supported; every entry must be {expected!r}")


def _check_config(
    down_block_types: tuple[str, ...], up_block_types: tuple[str, ...], block_out_channels: tuple[int, ...],
    act_fn: str, temporal_compression_ratio: float,
) -> int:
    """ValueError naming what the architecture does not support; else the number of time-compressing levels."""
    _check_block_types(tuple(down_block_types), DOWN_BLOCK, "down_block_types")
    _check_block_types(tuple(up_block_types), UP_BLOCK, "up_block_types")
    if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
        raise ValueError(
            f"need one block type per entry of block_out_channels {tuple(block_out_channels)}; got "
            f"{len(down_block_types)} down and {len(up_block_types)} up block types"
        )
    if act_fn not in ("silu", "swish"):
        raise ValueError(f"act_fn {act_fn!r} is not supported; use 'silu'")
    level = math.log2(temporal_compression_ratio)
    if not level.is_integer() or level >= len(block_out_channels):
        raise ValueError(
            f"temporal_compression_ratio {temporal_compression_ratio} must be a power of two below "
            f"{2 ** len(block_out_channels)}"
        )
    return int(level)


class Encoder3D(nn.Module):
    """Video (B, 3, 1 + 4k, H, W) -> posterior moments (B, 2 * latent, 1 + k, H / 8, W / 8)."""

    def __init__(
        self, in_channels: int, latent_channels: int, block_out_channels: tuple[int, ...],
        layers_per_block: int, norm_eps: float, norm_num_groups: int, temporal_compress_level: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], kernel_size=3)
        self.down_blocks = nn.ModuleList()
        prev = block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            self.down_blocks.append(
                DownBlock3D(
                    prev, ch, layers_per_block, norm_num_groups, norm_eps, dropout,
                    add_downsample=i < len(block_out_channels) - 1, compress_time=i < temporal_compress_level,
                )
            )
            prev = ch
        self.mid_block = MidBlock3D(prev, norm_num_groups, norm_eps, dropout)
        self.norm_out = nn.GroupNorm(norm_num_groups, prev, eps=1e-6)
        self.conv_out = CausalConv3d(prev, 2 * latent_channels, kernel_size=3)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        at_start = cache is None or cache.at_start
        h = self.conv_in(x, cache)  # (B, C0, T, H, W)
        if checkpointing(self):  # diffusers' levels: each down block, then the mid block
            for block in self.down_blocks:
                h = checkpointed(self, block, h, cache=cache)
            h = checkpointed(self, self.mid_block, h, None, cache=cache)
        else:
            for block in self.down_blocks:
                for resnet in block.resnets:
                    h = checkpointed(block, resnet, h, None, cache=cache)
                    _release_freed_memory(h)
                if block.downsamplers is not None:
                    h = block.downsamplers[0](h, at_start)  # (B, C, T', H / 2, W / 2)
            for resnet in self.mid_block.resnets:
                h = checkpointed(self.mid_block, resnet, h, None, cache=cache)
        tf = group_norm_transform(self.norm_out, h, stats=cache_stats(cache))
        return self.conv_out(h, cache, tf)  # (B, 2 * latent, T', h, w)


def _release_freed_memory(h: torch.Tensor) -> None:
    """Between ResNet blocks of a no-autograd pass on the CPU: return the heap holes the block's temporaries left.

    A block's temporaries (a few frames each) come from glibc's heap; freed, their pages stay resident
    until trimmed, and the later (larger, full-resolution) blocks of the same frame batch can peak on
    top of them (docs/vae3d.md has the measurement). A trim costs a heap walk (~3 ms).
    """
    if not torch.is_grad_enabled() and h.device.type == "cpu":
        streaming.release_freed_memory()


class Decoder3D(nn.Module):
    """Latents (B, latent, 1 + k, h, w) -> video (B, 3, 1 + 4k, 8h, 8w); every norm sees the latents."""

    def __init__(
        self, latent_channels: int, out_channels: int, block_out_channels: tuple[int, ...],
        layers_per_block: int, norm_eps: float, norm_num_groups: int, temporal_compress_level: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(latent_channels, channels[0], kernel_size=3)
        self.mid_block = MidBlock3D(channels[0], norm_num_groups, norm_eps, dropout, latent_channels)
        self.up_blocks = nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            self.up_blocks.append(
                UpBlock3D(
                    prev, ch, layers_per_block + 1, norm_num_groups, norm_eps, dropout, latent_channels,
                    add_upsample=i < len(channels) - 1, compress_time=i < temporal_compress_level,
                )
            )
            prev = ch
        self.norm_out = SpatialNorm3D(prev, latent_channels, groups=norm_num_groups)
        self.conv_out = CausalConv3d(prev, out_channels, kernel_size=3)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        # z's first frame is the image frame (never repeated in time) when this batch starts the video
        # with an odd latent count (diffusers' rule); a time shard knows it from the whole clip instead.
        shard = cache.shard if cache is not None else None
        at_start = cache is None or cache.at_start
        image_first = shard.image_first if shard is not None else at_start and z.shape[2] % 2 == 1
        h = self.conv_in(z, cache)  # (B, C, T, h, w)
        if checkpointing(self):  # diffusers' levels: the mid block, then each up block
            h = checkpointed(self, self.mid_block, h, z, cache=cache)
            for block in self.up_blocks:
                h = checkpointed(self, block, h, z, image_first, cache=cache)
        else:
            for resnet in self.mid_block.resnets:
                h = checkpointed(self.mid_block, resnet, h, z, cache=cache)
            for block in self.up_blocks:
                for resnet in block.resnets:
                    h = checkpointed(block, resnet, h, z, cache=cache)
                    _release_freed_memory(h)
                if block.upsamplers is not None:
                    up = block.upsamplers[0]
                    if lowmem.hand_on_lazily(up, h, image_first, shard):
                        h = up.lazy(h, image_first)  # read frame by frame by the next block
                    else:
                        h = up(h, image_first)  # (B, C, T', 2h, 2w)
        tf = self.norm_out.transform(h, z, stats=cache_stats(cache))
        return self.conv_out(h, cache, tf)  # (B, 3, T', H, W)


# Named configurations. "cogvideox" is diffusers' default (CogVideoX-2b/5b VAE); the others are
# ours, for VAEs trained from scratch (same architecture, fewer channels and layers).
PRESETS: dict[str, dict] = {
    "cogvideox": {},
    "tiny": dict(block_out_channels=(32, 32, 64, 64), latent_channels=4, layers_per_block=1, norm_num_groups=8,
                 sample_height=64, sample_width=64, scaling_factor=1.0),
    "small": dict(block_out_channels=(64, 128, 128, 256), latent_channels=16, layers_per_block=2, norm_num_groups=32,
                  sample_height=256, sample_width=256, scaling_factor=1.0),
}


class CausalVAE3D(CausalAutoencoder, ModelMixin, ConfigMixin):
    """KL autoencoder with the CogVideoX causal 3D encoder/decoder; drop-in for AutoencoderKLCogVideoX.

    ``encode(x).latent_dist`` / ``decode(z).sample`` run in frame batches with carried conv caches
    (``streaming``), so memory does not grow with the number of frames. The API around the
    encoder/decoder is ``CausalAutoencoder``'s (shared with Wan's ``WanVAE3D``).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResnetBlock3D"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = (DOWN_BLOCK,) * 4,
        up_block_types: tuple[str, ...] = (UP_BLOCK,) * 4,
        block_out_channels: tuple[int, ...] = (128, 256, 256, 512),
        latent_channels: int = 16,
        layers_per_block: int = 3,
        act_fn: str = "silu",
        norm_eps: float = 1e-6,
        norm_num_groups: int = 32,
        temporal_compression_ratio: float = 4,
        sample_height: int = 480,
        sample_width: int = 720,
        scaling_factor: float = 1.15258426,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: float = True,
        use_quant_conv: bool = False,
        use_post_quant_conv: bool = False,
        invert_scale_latents: bool = False,
    ) -> None:
        super().__init__()
        level = _check_config(down_block_types, up_block_types, block_out_channels, act_fn, temporal_compression_ratio)
        args = (block_out_channels, layers_per_block, norm_eps, norm_num_groups, level)
        self.encoder = Encoder3D(in_channels, latent_channels, *args)
        self.decoder = Decoder3D(latent_channels, out_channels, *args)
        # diffusers sizes these by out_channels (not latent_channels); kept identical for loading.
        self.quant_conv = nn.Conv3d(2 * out_channels, 2 * out_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv3d(out_channels, out_channels, 1) if use_post_quant_conv else None

        # Frame batching (diffusers' semantics): latents are decoded 2 at a time and frames encoded
        # 8 at a time; the first batch also takes the remainder. GroupNorm statistics are per batch.
        # "causal" instead: the first frame alone, then fixed-size batches, so that encoding any prefix
        # of 1 + 4k frames (for k a multiple of the batch) is a prefix of the latents.
        self.init_options(latent_batch=2, sample_batch=8, frame_batching="diffusers")
        self.tile_sample_min_height = sample_height // 2
        self.tile_sample_min_width = sample_width // 2
        self.tile_overlap_factor_height = 1 / 6
        self.tile_overlap_factor_width = 1 / 5

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CausalVAE3D":
        """A randomly initialised model from a named preset (``PRESETS``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # -- shapes and hooks (what streaming and parallel ask) -----------------------------------------

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def temporal_compression(self) -> int:
        return int(self.config.temporal_compression_ratio)

    @property
    def video_in_channels(self) -> int:
        return self.config.in_channels

    @property
    def video_out_channels(self) -> int:
        return self.config.out_channels

    @property
    def z_channels(self) -> int:
        return self.config.latent_channels

    def first_frame_is_image(self, latent_frames: int) -> bool:
        """diffusers' rule: a first decode batch with an odd latent count starts with the image frame."""
        return latent_frames % 2 == 1

    def tile_grid(self, encode: bool, height: int, width: int) -> streaming.TileGrid:
        """diffusers' CogVideoX geometry: tiles of tile_sample_min (latents: / s), overlaps by the factors."""
        sample = (self.tile_sample_min_height, self.tile_sample_min_width)
        latent = (self.tile_latent_min_height, self.tile_latent_min_width)
        in_tile, out_tile = (sample, latent) if encode else (latent, sample)
        fh, fw = self.tile_overlap_factor_height, self.tile_overlap_factor_width
        stride = (int(in_tile[0] * (1 - fh)), int(in_tile[1] * (1 - fw)))
        blend = (int(out_tile[0] * fh), int(out_tile[1] * fw))
        keep = (out_tile[0] - blend[0], out_tile[1] - blend[1])
        return streaming.TileGrid(in_tile, list(range(0, height, stride[0])), list(range(0, width, stride[1])),
                                  blend, keep)

    # -- options (diffusers' AutoencoderMixin API; the rest is CausalAutoencoder's) ------------------

    def enable_tiling(
        self,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        tile_overlap_factor_height: float | None = None,
        tile_overlap_factor_width: float | None = None,
    ) -> None:
        """Encode/decode large frames in overlapping spatial tiles blended linearly (as diffusers)."""
        self.use_tiling = True
        self.tile_sample_min_height = tile_sample_min_height or self.tile_sample_min_height
        self.tile_sample_min_width = tile_sample_min_width or self.tile_sample_min_width
        self.tile_overlap_factor_height = tile_overlap_factor_height or self.tile_overlap_factor_height
        self.tile_overlap_factor_width = tile_overlap_factor_width or self.tile_overlap_factor_width

    # -- latent scaling (what a diffusion model sees) ------------------------------------------------

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior sample -> diffusion-model latents: (z - shift) * scale, or / scale if inverted."""
        shift = self.config.shift_factor or 0.0
        s = self.config.scaling_factor
        return (z - shift) / s if self.config.invert_scale_latents else (z - shift) * s

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``scale_latents``: what ``decode`` takes."""
        shift = self.config.shift_factor or 0.0
        s = self.config.scaling_factor
        return z * s + shift if self.config.invert_scale_latents else z / s + shift
