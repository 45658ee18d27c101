"""The relay super-resolution stage every pipeline shares (CogView3, Zheng et al. 2024; samplers.relay).

A pipeline with `relay=k` samples its base result at H x W as usual, upsamples it k times to z_L, and runs the
relay sampler from training step T_r = relay_start of the folder's own training path (variance preserving or
flow matching, read from its scheduler config) with block noise of block size k. `relay_stage` checks every
relay argument and builds the stage's sampler spec before any model runs; `RelayStage.z_low` makes z_L from the
base latents in any layout ((B, C, H, W) images, (B, F, C, H, W) or (B, C, F, H, W) video: only the last two
dimensions are spatial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

import samplers

RELAY_UPSAMPLE = ("latent-nearest", "latent-bilinear", "pixel")


@dataclass(frozen=True)
class RelayStage:
    """A checked relay stage: the upscale factor k (also the block size of its noise), its sampler spec (solver
    "relay"), how the base result is upsampled, and the eta of the noise it re-injects."""

    factor: int
    spec: samplers.SamplerSpec
    upsample: str
    eta: float

    @property
    def steps(self) -> int:
        return len(self.spec.schedule)

    def z_low(self, latents: torch.Tensor, *, to_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None,
              from_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """z_L: the base latents upsampled k times over their last two dimensions, in latent space (nearest or
        bilinear), or ("pixel", CogView3's choice) decoded by `to_pixels`, upsampled bilinearly, clamped to the
        VAE's [-1, 1] and encoded again by `from_pixels` (the pipeline's VAE, in its latent layout)."""
        if self.upsample != "pixel":
            return samplers.upsample(latents, self.factor, mode=self.upsample.removeprefix("latent-")).to(latents.dtype)
        if to_pixels is None or from_pixels is None:
            raise ValueError("relay_upsample='pixel' needs the pipeline's VAE decode and encode")
        pixels = samplers.upsample(to_pixels(latents), self.factor, mode="bilinear").clamp(-1, 1)
        return from_pixels(pixels).to(latents.dtype)


def _check_non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def scheduler_config(scheduler: Any) -> dict:
    """A diffusers scheduler's config as samplers reads it (with its class name)."""
    return dict(scheduler.config, _class_name=type(scheduler).__name__)


def relay_stage(scheduler: Any, relay: int | None, *, steps: int, start: int, upsample: str, noise_alpha: float,
                eta: float) -> RelayStage | None:
    """None without relay; else every relay argument checked, each error naming the value and what is accepted,
    and the stage built on the scheduler's training path (samplers.train_path_from_config): `steps` evenly
    spaced steps from training step T_r = `start`, reading the model in the folder's own parameterisation."""
    if relay is None:
        return None
    for name, value in (("relay", relay), ("relay_steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if upsample not in RELAY_UPSAMPLE:
        raise ValueError(f"relay_upsample {upsample!r} is not one of {', '.join(RELAY_UPSAMPLE)}")
    noise_alpha = _check_non_negative("relay_noise_alpha", noise_alpha)
    eta = _check_non_negative("relay_eta", eta)
    config = scheduler_config(scheduler)
    path = samplers.train_path_from_config(config)
    # The parameterisation of a one-step spec: the step count and the shift's mu change the steps, not it.
    prediction = samplers.from_diffusers_config(config, 1, mu=0.0).prediction
    spec = samplers.relay_spec(path, start, steps, prediction, block_size=relay, noise_alpha=noise_alpha)
    return RelayStage(relay, spec, upsample, eta)
