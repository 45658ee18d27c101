"""Reading a diffusers `scheduler_config.json` into our schedule, parameterisation and solver.

Options we do not implement are an error naming the option, never silently ignored: a checkpoint's sampler
either runs as diffusers runs it, or not at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samplers import schedules as S
from samplers.paths import check_prediction

SCHEDULER_CLASSES = (
    "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
)


@dataclass(frozen=True)
class SamplerSpec:
    """What a scheduler config amounts to: the schedule, how to read the model, which solver, its options."""

    schedule: S.Schedule
    prediction: str
    solver: str
    options: dict[str, Any] = field(default_factory=dict)


def load_scheduler_config(path_or_config: str | os.PathLike | dict) -> dict:
    """A scheduler config from a dict, a scheduler_config.json, or a folder holding one (or a pipeline's scheduler/)."""
    if isinstance(path_or_config, dict):
        return dict(path_or_config)
    p = Path(path_or_config)
    for candidate in (p, p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise ValueError(f"no scheduler_config.json at {str(p)!r} (looked in the folder and its scheduler/ subfolder)")


def _reject(cfg: dict, cls: str, **defaults: Any) -> None:
    """Error on an option set to a value we do not implement."""
    for key, default in defaults.items():
        if cfg.get(key) not in (default, None):
            raise ValueError(f"{cls}: option {key}={cfg[key]!r} is not supported (supported: {key}={default!r})")


def _ddpm_alphas_cumprod(cfg: dict, cls: str, beta_dtype: torch.dtype) -> torch.Tensor:
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32).double()
    else:
        betas = S.ddpm_betas(
            cfg.get("beta_schedule", "linear"), cfg.get("num_train_timesteps", 1000),
            cfg.get("beta_start", 0.0001), cfg.get("beta_end", 0.02), dtype=beta_dtype,
        )
    return S.alphas_cumprod_from_betas(betas, dtype=beta_dtype)


def _cogvideox_alphas_cumprod(cfg: dict, cls: str) -> torch.Tensor:
    """CogVideoX computes scaled-linear betas in float64, shifts the SNR, and rescales alpha_bar (not betas)."""
    cfg = dict(cfg)
    beta_dtype = torch.float64 if cfg.get("beta_schedule", "scaled_linear") == "scaled_linear" else torch.float32
    cfg.setdefault("beta_schedule", "scaled_linear")
    cfg.setdefault("beta_start", 0.00085)
    cfg.setdefault("beta_end", 0.012)
    acp = _ddpm_alphas_cumprod(cfg, cls, beta_dtype)
    acp = S.snr_shift(acp, cfg.get("snr_shift_scale", 3.0))
    if cfg.get("rescale_betas_zero_snr", False):
        acp = S.rescale_zero_terminal_snr(acp)
    return acp


def train_path_from_config(config: str | os.PathLike | dict) -> S.TrainPath:
    """The training discretisation of a scheduler config's path (what relay schedules and training losses use)."""
    cfg = load_scheduler_config(config)
    cls = cfg.get("_class_name")
    if cls in ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"):
        return S.TrainPath.vp(_cogvideox_alphas_cumprod(cfg, cls))
    if cls in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        acp = _ddpm_alphas_cumprod(cfg, cls, torch.float32)
        return S.TrainPath.vp(S.rescale_zero_terminal_snr(acp) if cfg.get("rescale_betas_zero_snr") else acp)
    if cls == "FlowMatchEulerDiscreteScheduler":
        return S.TrainPath.flow(cfg.get("num_train_timesteps", 1000))
    raise ValueError(f"unsupported scheduler class {cls!r}; accepted: {', '.join(SCHEDULER_CLASSES)}")


def from_diffusers_config(
    config: str | os.PathLike | dict, num_steps: int, *, mu: float | None = None
) -> SamplerSpec:
    """Our equivalent of a diffusers scheduler after `set_timesteps(num_steps, mu=mu)`."""
    cfg = load_scheduler_config(config)
    cls = cfg.get("_class_name")
    if cls not in SCHEDULER_CLASSES:
        raise ValueError(f"unsupported scheduler class {cls!r}; accepted: {', '.join(SCHEDULER_CLASSES)}")
    T = cfg.get("num_train_timesteps", 1000)
    S.check_num_steps(num_steps, T)

    if cls in ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"):
        acp = _cogvideox_alphas_cumprod(cfg, cls)
        ts = S.spaced_timesteps(num_steps, T, cfg.get("timestep_spacing", "leading"),
                                steps_offset=cfg.get("steps_offset", 0))
        final = 1.0 if cfg.get("set_alpha_to_one", True) else float(acp[0])
        schedule = S.vp_schedule(acp, ts, target="offset", final_alpha_cumprod=final, num_train_timesteps=T)
        prediction = check_prediction(cfg.get("prediction_type", "epsilon"))
        if cls == "CogVideoXDDIMScheduler":
            return SamplerSpec(schedule, prediction, "ddim")
        # diffusers' last step is first order only when its target t - T // N is negative.
        last_second_order = num_steps > 1 and int(ts[-1]) - T // num_steps >= 0
        return SamplerSpec(schedule, prediction, "cogvideox_dpm", {"last_step_second_order": last_second_order})

    if cls == "DDIMScheduler":
        _reject(cfg, cls, thresholding=False)
        acp = _ddpm_alphas_cumprod(cfg, cls, torch.float32)
        if cfg.get("rescale_betas_zero_snr", False):
            acp = S.rescale_zero_terminal_snr(acp)
        ts = S.spaced_timesteps(num_steps, T, cfg.get("timestep_spacing", "leading"),
                                steps_offset=cfg.get("steps_offset", 0))
        final = 1.0 if cfg.get("set_alpha_to_one", True) else float(acp[0])
        schedule = S.vp_schedule(acp, ts, target="offset", final_alpha_cumprod=final, num_train_timesteps=T)
        options = {"clip_x0": cfg.get("clip_sample_range", 1.0)} if cfg.get("clip_sample", True) else {}
        return SamplerSpec(schedule, check_prediction(cfg.get("prediction_type", "epsilon")), "ddim", options)

    if cls == "DPMSolverMultistepScheduler":
        _reject(cfg, cls, algorithm_type="dpmsolver++", solver_type="midpoint", thresholding=False,
                use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                use_flow_sigmas=False, euler_at_final=False, variance_type=None, use_dynamic_shifting=False)
        _reject(cfg, cls, lambda_min_clipped=-float("inf"))
        order = cfg.get("solver_order", 2)
        if order not in (1, 2):
            raise ValueError(f"{cls}: solver_order={order} is not supported (supported: 1, 2)")
        acp = _ddpm_alphas_cumprod(cfg, cls, torch.float32)
        if cfg.get("rescale_betas_zero_snr", False):
            acp = S.rescale_zero_terminal_snr(acp)
            acp[-1] = 2.0**-24  # diffusers keeps the last alpha_bar off zero to keep lambda finite
        ts = S.spaced_timesteps(num_steps, T, cfg.get("timestep_spacing", "linspace"),
                                steps_offset=cfg.get("steps_offset", 0), convention="dpmsolver")
        # diffusers stores the VE sigmas in float32 and maps back to alpha = 1 / sqrt(1 + sigma^2).
        ve = ((1 - acp.float()) / acp.float()) ** 0.5
        final_type = cfg.get("final_sigmas_type", "zero")
        if final_type not in ("zero", "sigma_min"):
            raise ValueError(f"{cls}: final_sigmas_type={final_type!r} is not supported (supported: 'zero', 'sigma_min')")
        last = torch.zeros(1) if final_type == "zero" else ve[:1]
        ve_steps = torch.cat([ve[ts], last]).float().double()
        alphas = 1 / (ve_steps**2 + 1).sqrt()
        schedule = S.Schedule.from_states(ts, alphas, ve_steps * alphas)
        solver = "dpmpp_2m" if order == 2 else "ddim"
        options = {"lower_order_final": cfg.get("lower_order_final", True)} if order == 2 else {}
        return SamplerSpec(schedule, check_prediction(cfg.get("prediction_type", "epsilon")), solver, options)

    # FlowMatchEulerDiscreteScheduler
    _reject(cfg, cls, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
            use_beta_sigmas=False, stochastic_sampling=False)
    dynamic = cfg.get("use_dynamic_shifting", False)
    if dynamic and mu is None:
        raise ValueError(f"{cls}: use_dynamic_shifting is set, so mu is required (see samplers.dynamic_shift_mu)")
    sigmas = S.flow_sigmas(num_steps, shift=cfg.get("shift", 1.0), mu=mu if dynamic else None,
                           num_train_timesteps=T, time_shift_type=cfg.get("time_shift_type", "exponential"))
    return SamplerSpec(S.flow_schedule(sigmas, num_train_timesteps=T), "flow", "euler")
