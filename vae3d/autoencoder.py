"""What the two causal VAEs share around their encoder and decoder: the diffusers API and the hooks
that streaming, tiling and time sharding call.

``CausalAutoencoder`` is a mixin of ``CausalVAE3D`` (CogVideoX) and ``WanVAE3D`` (Wan 2.1 / 2.2):
``encode(x).latent_dist``, ``decode(z).sample``, ``forward``, slicing, time sharding
(``enable_parallelism``), validation before any compute. A model supplies the configuration-specific
parts: its shapes (compressions, channel counts), the first-frame rule of its decoder, its tile
geometry, and what happens to a frame batch before the encoder and after the decoder (Wan 2.2's
patchify / unpatchify, Wan's clamp). ``streaming`` and ``parallel`` only talk to these.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from . import parallel, streaming


class CausalAutoencoder:
    """The diffusers AutoencoderKL API over a causal encoder/decoder pair (a mixin of an ``nn.Module``).

    Needs ``encoder(x, cache)``, ``decoder(z, cache)``, ``quant_conv`` / ``post_quant_conv`` (or None)
    and the attributes set by ``init_options``; subclasses define the properties and hooks below.
    """

    encoder: nn.Module
    decoder: nn.Module
    quant_conv: nn.Module | None
    post_quant_conv: nn.Module | None

    def init_options(self, latent_batch: int, sample_batch: int, frame_batching: str) -> None:
        """Runtime options (attributes, as in diffusers), off by default."""
        self.use_slicing = False
        self.use_tiling = False
        # Set by a model's enable_exact_tiling (Wan): decode in exact spatial tiles of at most this many pixels.
        self.exact_tile_size: tuple[int, int] | None = None
        # Frames per encoder call and latent frames per decoder call (``streaming.frame_batches``).
        self.num_latent_frames_batch_size = latent_batch
        self.num_sample_frames_batch_size = sample_batch
        self.frame_batching = frame_batching
        # Set by enable_parallelism: encode/decode are then time-sharded over a process group.
        self.time_parallel: parallel.TimeParallel | None = None

    # -- what a configuration defines ------------------------------------------------------------------

    @property
    def spatial_compression(self) -> int:
        raise NotImplementedError

    @property
    def temporal_compression(self) -> int:
        raise NotImplementedError

    @property
    def video_in_channels(self) -> int:
        """Channels of the video ``encode`` takes."""
        raise NotImplementedError

    @property
    def video_out_channels(self) -> int:
        """Channels of the video ``decode`` returns."""
        raise NotImplementedError

    @property
    def z_channels(self) -> int:
        """Channels of the latents ``decode`` takes."""
        raise NotImplementedError

    @property
    def tile_latent_min_height(self) -> int:
        return int(self.tile_sample_min_height / self.spatial_compression)

    @property
    def tile_latent_min_width(self) -> int:
        return int(self.tile_sample_min_width / self.spatial_compression)

    def first_frame_is_image(self, latent_frames: int) -> bool:
        """Whether a decoder call that starts the video with ``latent_frames`` latents treats the first as the
        image frame (decoded to one frame, not ``temporal_compression``)."""
        raise NotImplementedError

    def tile_grid(self, encode: bool, height: int, width: int) -> streaming.TileGrid:
        """The tiles of an input of height x width (pixels to encode, or latents to decode)."""
        raise NotImplementedError

    def exact_tile_plans(self, height: int, width: int) -> tuple[list, int]:
        """Exact tiles of the decoder's output for latents of height x width (``vae3d.wan_tiles.TilePlan``s)
        and the output pixels per decoder pixel; only a model without statistics over space has them."""
        raise NotImplementedError(f"{type(self).__name__} has no exact tiles")

    def to_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """A frame batch of the video as the encoder takes it."""
        return x

    def from_decoder(self, y: torch.Tensor) -> torch.Tensor:
        """A frame batch of the decoder's output as ``decode`` returns it."""
        return y

    # -- options (diffusers' AutoencoderMixin API) -------------------------------------------------

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode/decode one batch element at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_parallelism(
        self,
        config: parallel.ParallelConfig,
        *,
        group: dist.ProcessGroup | None = None,
        norm_stats: str = "exact",
    ) -> None:
        """Shard encode/decode along time over ``config.world_size`` ranks (``vae3d.parallel``).

        ``config``: a ``dit.parallel.ContextParallelConfig``; its ring x ulysses ranks form one time
        axis. ``group``: the process group sharing each clip (default: the whole world, or with more
        ranks than the config, consecutive blocks of them as ``dit.parallel`` lays them out).
        ``norm_stats`` (GroupNorm models): "exact" (default; equals the unsharded model on the whole
        clip) or "parity" (equals the single-process frame-batched result, i.e. diffusers'); a model
        without statistics over frames (Wan) gives the same result with either. Every rank passes the
        whole input and gets the whole output.
        """
        device_type = next(self.parameters()).device.type
        self.time_parallel = parallel.time_parallel(config, group, norm_stats, device_type)

    def disable_parallelism(self) -> None:
        self.time_parallel = None

    @property
    def is_parallel(self) -> bool:
        return self.time_parallel is not None

    def _check_checkpointing(self) -> None:
        """Gradient checkpointing (diffusers' ``enable_gradient_checkpointing``) recomputes each block in backward;
        a time shard's blocks exchange halos with the other ranks, collectives that a recomputation would run
        again inside backward, where nothing keeps the ranks in step: the two are refused together, before any
        compute."""
        if self.is_parallel and torch.is_grad_enabled() and self.is_gradient_checkpointing:
            raise ValueError("gradient checkpointing and time sharding cannot be combined; call "
                             "disable_gradient_checkpointing() or disable_parallelism()")

    # -- encode / decode -------------------------------------------------------------------------

    @apply_forward_hook
    def encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """Video (B, C, 1 + r k, H, W) in [-1, 1] -> posterior over latents (B, Z, 1 + k, H / s, W / s)."""
        streaming.check_video(self, x)
        self._check_checkpointing()
        moments = parallel.encode(self, x) if self.is_parallel else streaming.encode(self, x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Latents (B, Z, F, h, w) -> video (B, C, 1 + r (F - 1), s h, s w) (r F frames when the first
        latent frame is not an image frame: CogVideoX's even batches)."""
        streaming.check_latents(self, z)
        self._check_checkpointing()
        video = parallel.decode(self, z) if self.is_parallel else streaming.decode(self, z)
        return DecoderOutput(sample=video) if return_dict else (video,)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        video = self.decode(z).sample
        return DecoderOutput(sample=video) if return_dict else (video,)
