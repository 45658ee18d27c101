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
from torch import Tensor, nn

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
            # SD3, Wan: logit-normal t (Esser et al. 2024, sec. 3.1), then the static shift; the model sees sigma * T.
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(b, generator=generator,
                                                                                     dtype=torch.float64))
            sigma = samplers.flow_shift(u, self.cfg.flow_shift)
            alpha, t = 1 - sigma, sigma * self.cfg.num_train_timesteps
        noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
        dev, dt = z0.device, z0.dtype
        return samplers.diffusion_loss(model_fn, z0, t.to(dev, torch.float32), alpha.to(dev, dt), sigma.to(dev, dt),
                                       self.prediction, noise=noise)


class AutoencoderStep(nn.Module):
    """The VAE's training forward as one module call, so that a DDP / FSDP wrapper sees a single forward:
    video (B, 3, F, H, W) in [-1, 1] -> (reconstruction of a posterior sample, posterior mean, log-variance)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, video: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        dist = self.vae.encode(video).latent_dist
        return self.vae.decode(dist.sample(generator=generator)).sample, dist.mean, dist.logvar


def autoencoder_loss(step: nn.Module, video: Tensor, generator: torch.Generator, kl_weight: float,
                     l2_weight: float = 0.0) -> Tensor:
    """L1 + l2_weight x squared reconstruction error + kl_weight x KL(q(z|x) || N(0, I)), each averaged per
    element. `step` is an AutoencoderStep (possibly wrapped); video (B, 3, F, H, W) in [-1, 1]."""
    recon, mean, logvar = step(video, generator=generator)
    err = recon.float() - video.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return err.abs().mean() + l2_weight * err.pow(2).mean() + kl_weight * kl.float()


def low_resolution(video: Tensor, factor: int) -> Tensor:
    """The relay stage's input: the clip downscaled by `factor` (area) and upscaled back (bilinear), as CogView3
    feeds the super-resolution stage the upsampled base result. (B, F, 3, H, W) -> same shape."""
    b, f, c, h, w = video.shape
    x = video.reshape(b * f, c, h, w)
    low = F.interpolate(x, size=(h // factor, w // factor), mode="area")
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).reshape(b, f, c, h, w)
