"""Training objectives on top of samplers' definitions (training_target / diffusion_loss / relay_loss), so
training and sampling share one definition of each path and parameterisation.

Every random draw (timesteps, noise, block noise) comes from the generator passed in: the trainer seeds it
per (seed, data-parallel rank, step), which is what makes a resumed run exact and lets the ranks of one
context-parallel group draw the same noise.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import samplers
from dit.train.config import ObjectiveConfig

ModelFn = Callable[[Tensor, Tensor], Tensor]


def vp_path(cfg: ObjectiveConfig) -> samplers.TrainPath:
    """CogVideoX's training path: DDPM betas, SNR shift by snr_shift_scale, zero terminal SNR (float64 betas)."""
    betas = samplers.ddpm_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
    acp = samplers.alphas_cumprod_from_betas(betas)
    return samplers.TrainPath.vp(samplers.rescale_zero_terminal_snr(samplers.snr_shift(acp, cfg.snr_shift_scale)))


class Objective:
    """loss(model_fn, z0, generator, z_low=None) -> scalar, for one of the configured objectives."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.kind = cfg.kind
        self.needs_low_res = cfg.kind == "relay"
        if cfg.kind == "v_prediction_zero_snr" or (cfg.kind == "relay" and cfg.relay_path == "vp"):
            self.path, self.prediction = vp_path(cfg), "v_prediction"
        else:
            self.path, self.prediction = samplers.TrainPath.flow(cfg.num_train_timesteps), "flow"

    def loss(self, model_fn: ModelFn, z0: Tensor, generator: torch.Generator, *, z_low: Tensor | None = None) -> Tensor:
        b = z0.shape[0]
        if self.kind == "relay":
            if z_low is None:
                raise ValueError("the relay objective needs z_low, the upsampled low-resolution latents")
            return samplers.relay_loss(model_fn, z0, z_low, self.path, self.cfg.relay_t, self.prediction,
                                       block_size=self.cfg.block_size, noise_alpha=self.cfg.noise_alpha,
                                       generator=generator)
        if self.kind == "v_prediction_zero_snr":
            # Uniform integer t. The v-MSE equals diffusers' CogVideoX x0-MSE weighted by 1 / (1 - alpha_bar_t).
            idx = torch.randint(0, len(self.path), (b,), generator=generator)
            alpha, sigma, t = self.path.alphas[idx], self.path.sigmas[idx], self.path.model_t[idx]
        else:
            # SD3: logit-normal t (Esser et al. 2024, sec. 3.1), then the static shift; the model sees sigma * T.
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(b, generator=generator,
                                                                                     dtype=torch.float64))
            sigma = samplers.flow_shift(u, self.cfg.shift)
            alpha, t = 1 - sigma, sigma * self.cfg.num_train_timesteps
        noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
        dev, dt = z0.device, z0.dtype
        return samplers.diffusion_loss(model_fn, z0, t.to(dev, torch.float32), alpha.to(dev, dt), sigma.to(dev, dt),
                                       self.prediction, noise=noise)


def low_resolution(video: Tensor, factor: int) -> Tensor:
    """The relay stage's input: the clip downscaled by `factor` (area) and upscaled back (bilinear), as CogView3
    feeds the super-resolution stage the upsampled base result. (B, F, 3, H, W) -> same shape."""
    b, f, c, h, w = video.shape
    x = video.reshape(b * f, c, h, w)
    low = F.interpolate(x, size=(h // factor, w // factor), mode="area")
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).reshape(b, f, c, h, w)
