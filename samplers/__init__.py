"""Samplers as plain functions: noise schedules, Gaussian paths, solvers, guidance, relay diffusion.

This package is a leaf: it imports torch and numpy only, never `dit` or `vae3d`.
"""

from samplers.from_diffusers import (SamplerSpec, from_diffusers_config, load_scheduler_config, sample,
                                     train_path_from_config)
from samplers.guidance import (SkipLayerGuidance, check_guidance_scale, classifier_free_guidance,
                               cogvideox_dynamic_scale)
from samplers.paths import (Denoiser, add_noise, check_prediction, diffusion_loss, eps_from_x0, to_x0,
                            training_target)
from samplers.relay import (block_filter, block_noise, mixed_noise, relay_blur, relay_loss, relay_schedule,
                            relay_spec, relay_step, sample_relay, upsample)
from samplers.schedules import (Schedule, TrainPath, alphas_cumprod_from_betas, ddpm_betas, dynamic_shift_mu, flow_schedule,
                                flow_shift, flow_sigmas, multistep_flow_sigmas, rescale_zero_terminal_snr, snr_shift, spaced_timesteps,
                                time_shift, vp_schedule)
from samplers.solvers import (SOLVERS, cogvideox_dpm_step, ddim_step, dpmpp_2m_step, get_solver, heun_step,
                              sample_cogvideox_dpm, sample_ddim, sample_dpmpp_2m, sample_euler, sample_heun)
from samplers.unipc import sample_unipc, unipc_rhos, unipc_update

__all__ = [name for name in dir() if not name.startswith("_")]
