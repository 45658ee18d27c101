"""Reading a diffusers `scheduler_config.json` into our schedule, parameterisation and solver.

Options we do not implement are an error naming the option, never silently ignored: a checkpoint's sampler
either runs as diffusers runs it, or not at all.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from samplers import schedules as S
from samplers.paths import check_prediction
from samplers.solvers import get_solver

SCHEDULER_CLASSES = (
    "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "UniPCMultistepScheduler",
)


@dataclass(frozen=True)
class SamplerSpec:
    """What a scheduler config amounts to: the schedule, how to read the model, which solver, its options.

    `schedule` is what the solver walks: a Schedule, or a RelaySchedule for the "relay" solver."""

    schedule: Any
    prediction: str
    solver: str
    options: dict[str, Any] = field(default_factory=dict)


def sample(spec: SamplerSpec, denoiser: Any, x: Tensor, *, solver: str | None = None, callback: Any = None,
           **runtime: Any) -> Tensor:
    """Run the spec's solver from x, or `solver` instead (the spec's options belong to its own solver and are
    then dropped). Runtime options (eta, generator, ...) go to the solver where it takes them, as diffusers'
    pipelines pass eta and generator only to schedulers whose step() accepts them; None is "not given", a
    zero eta needs no noise, and any other option the solver does not take is an error, never dropped."""
    name = solver or spec.solver
    solve = get_solver(name)
    options = dict(spec.options) if name == spec.solver else {}
    accepted = inspect.signature(solve).parameters
    for key, value in runtime.items():
        if key in accepted and value is not None:
            options[key] = value
        elif value is not None and not (key == "eta" and value == 0) and key != "generator":
            raise ValueError(f"solver {name!r} does not take {key}={value!r}; it takes "
                             f"{', '.join(k for k in accepted if k not in ('denoiser', 'x', 'schedule'))}")
    return solve(denoiser, x, spec.schedule, callback=callback, **options)


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


def _rescale_like_diffusers(acp: torch.Tensor) -> torch.Tensor:
    """Zero terminal SNR as diffusers applies it: in float32, to the betas recovered from the rescaled alpha_bar,
    which are then accumulated again. Rescaling alpha_bar in float64 differs by up to 3e-5 (relative) near t = T,
    where 1000-step schedules sample."""
    ab = S.rescale_zero_terminal_snr(acp.float())
    betas = 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return torch.cumprod(1 - betas, dim=0).double()


def _multistep_vp_schedule(cfg: dict, cls: str, num_steps: int, timesteps: Tensor | None = None) -> S.Schedule:
    """The VP schedule of diffusers' multistep solvers (DPM-Solver, UniPC): "dpmsolver" timestep spacing (or the
    given integer `timesteps`), states stored as float32 VE sigmas, the last step to sigma = 0 ("zero") or to the
    t = 0 state ("sigma_min")."""
    T = cfg.get("num_train_timesteps", 1000)
    acp = _ddpm_alphas_cumprod(cfg, cls, torch.float32)
    if cfg.get("rescale_betas_zero_snr", False):
        acp = _rescale_like_diffusers(acp)
        acp[-1] = 2.0**-24  # diffusers keeps the last alpha_bar off zero to keep lambda finite
    ts = timesteps if timesteps is not None else S.spaced_timesteps(
        num_steps, T, cfg.get("timestep_spacing", "linspace"), steps_offset=cfg.get("steps_offset", 0),
        convention="dpmsolver")
    # diffusers stores the VE sigmas in float32 and maps back to alpha = 1 / sqrt(1 + sigma^2).
    ve = ((1 - acp.float()) / acp.float()) ** 0.5
    final_type = cfg.get("final_sigmas_type", "zero")
    if final_type not in ("zero", "sigma_min"):
        raise ValueError(f"{cls}: final_sigmas_type={final_type!r} is not supported (supported: 'zero', 'sigma_min')")
    last = torch.zeros(1) if final_type == "zero" else ve[:1]
    ve_steps = torch.cat([ve[ts], last]).float().double()
    alphas = 1 / (ve_steps**2 + 1).sqrt()
    return S.Schedule.from_states(ts, alphas, ve_steps * alphas)


def train_path_from_config(config: str | os.PathLike | dict) -> S.TrainPath:
    """The training discretisation of a scheduler config's path (what relay schedules and training losses use)."""
    cfg = load_scheduler_config(config)
    cls = cfg.get("_class_name")
    if cls in ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"):
        return S.TrainPath.vp(_cogvideox_alphas_cumprod(cfg, cls))
    if cls == "UniPCMultistepScheduler" and cfg.get("use_flow_sigmas", False):
        return S.TrainPath.flow(cfg.get("num_train_timesteps", 1000))
    if cls in ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        acp = _ddpm_alphas_cumprod(cfg, cls, torch.float32)
        return S.TrainPath.vp(S.rescale_zero_terminal_snr(acp) if cfg.get("rescale_betas_zero_snr") else acp)
    if cls == "FlowMatchEulerDiscreteScheduler":
        return S.TrainPath.flow(cfg.get("num_train_timesteps", 1000))
    raise ValueError(f"unsupported scheduler class {cls!r}; accepted: {', '.join(SCHEDULER_CLASSES)}")


def from_diffusers_config(
    config: str | os.PathLike | dict, num_steps: int | None, *, mu: float | None = None,
    sigmas: Sequence[float] | Tensor | None = None, timesteps: Sequence[float] | Tensor | None = None,
) -> SamplerSpec:
    """Our equivalent of a diffusers scheduler after `set_timesteps(num_steps, mu=mu)`, or after
    `set_timesteps(sigmas=..., timesteps=..., mu=mu)` (what diffusers' `retrieve_timesteps` does with a pipeline's
    custom `sigmas` or `timesteps`: the schedule then has their length and `num_steps` is not used). Custom values
    are taken where diffusers' scheduler takes them and we reproduce it (`CUSTOM_SCHEDULES`); anything else is an
    error saying which, never a schedule diffusers would not run."""
    cfg = load_scheduler_config(config)
    cls = cfg.get("_class_name")
    if cls not in SCHEDULER_CLASSES:
        raise ValueError(f"unsupported scheduler class {cls!r}; accepted: {', '.join(SCHEDULER_CLASSES)}")
    if sigmas is not None or timesteps is not None:
        return _custom_spec(cfg, cls, mu, sigmas, timesteps)
    S.check_num_steps(num_steps, cfg.get("num_train_timesteps", 1000))
    if cls in ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"):
        return _cogvideox_spec(cfg, cls, num_steps)
    if cls == "DDIMScheduler":
        return _ddim_spec(cfg, cls, num_steps)
    if cls == "DPMSolverMultistepScheduler":
        return _dpmsolver_spec(cfg, cls, num_steps)
    if cls == "UniPCMultistepScheduler":
        return _unipc_spec(cfg, cls, num_steps, mu)
    return _flow_euler_spec(cfg, cls, num_steps, mu)


# The custom schedules each diffusers scheduler's set_timesteps takes, and those we reproduce.
DIFFUSERS_CUSTOM = {"FlowMatchEulerDiscreteScheduler": ("sigmas", "timesteps"),
                    "DPMSolverMultistepScheduler": ("timesteps",), "UniPCMultistepScheduler": ("sigmas",)}
CUSTOM_SCHEDULES = {"FlowMatchEulerDiscreteScheduler": ("sigmas", "timesteps"),
                    "DPMSolverMultistepScheduler": ("timesteps",)}


def _custom_spec(cfg: dict, cls: str, mu: float | None, sigmas, timesteps) -> SamplerSpec:
    """A spec on custom sigmas and/or timesteps, checked: a list of finite numbers each (integers for the VP
    schedulers' timesteps, in [0, T)), positive for flow sigmas (diffusers appends the final 0 itself)."""
    for name, values in (("sigmas", sigmas), ("timesteps", timesteps)):
        if values is None:
            continue
        if name not in DIFFUSERS_CUSTOM.get(cls, ()):
            takes = DIFFUSERS_CUSTOM.get(cls, ())
            raise ValueError(f"{cls} takes no custom {name} (diffusers' {cls}.set_timesteps has no `{name}`, so "
                             f"diffusers' pipeline refuses them too); "
                             + (f"it takes custom {' and '.join(takes)}" if takes else "use num_inference_steps"))
        if name not in CUSTOM_SCHEDULES.get(cls, ()):
            raise ValueError(f"custom {name} with {cls} are not supported here; use num_inference_steps, or a "
                             "FlowMatchEulerDiscreteScheduler for custom sigmas")
    T = cfg.get("num_train_timesteps", 1000)
    if cls == "DPMSolverMultistepScheduler":
        ts = _custom_values("timesteps", timesteps)
        if (ts != np.round(ts)).any() or ts.min() < 0 or ts.max() > T - 1:
            raise ValueError(f"timesteps must be integers in [0, {T - 1}] (the training steps; diffusers casts "
                             f"others to int64), got {ts.tolist()}")
        return _dpmsolver_spec(cfg, cls, len(ts), timesteps=torch.from_numpy(ts.astype(np.int64)))
    return _flow_euler_spec(cfg, cls, None, mu, sigmas=sigmas, timesteps=timesteps)


def _custom_values(name: str, values: Sequence[float] | Tensor) -> np.ndarray:
    """A custom schedule's values as a float64 array: a non-empty 1-D list of finite numbers, else a ValueError."""
    try:
        array = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers, got {values!r}") from None
    if array.ndim != 1 or len(array) == 0 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a non-empty list of finite numbers, got {values!r}")
    return array


def _cogvideox_spec(cfg: dict, cls: str, num_steps: int) -> SamplerSpec:
    T = cfg.get("num_train_timesteps", 1000)
    acp = _cogvideox_alphas_cumprod(cfg, cls)
    ts = S.spaced_timesteps(num_steps, T, cfg.get("timestep_spacing", "leading"), steps_offset=cfg.get("steps_offset", 0))
    final = 1.0 if cfg.get("set_alpha_to_one", True) else float(acp[0])
    schedule = S.vp_schedule(acp, ts, target="offset", final_alpha_cumprod=final, num_train_timesteps=T)
    prediction = check_prediction(cfg.get("prediction_type", "epsilon"))
    if cls == "CogVideoXDDIMScheduler":
        return SamplerSpec(schedule, prediction, "ddim")
    # diffusers' last step is first order only when its target t - T // N is negative.
    last_second_order = num_steps > 1 and int(ts[-1]) - T // num_steps >= 0
    return SamplerSpec(schedule, prediction, "cogvideox_dpm", {"last_step_second_order": last_second_order})


def _ddim_spec(cfg: dict, cls: str, num_steps: int) -> SamplerSpec:
    _reject(cfg, cls, thresholding=False)
    T = cfg.get("num_train_timesteps", 1000)
    acp = _ddpm_alphas_cumprod(cfg, cls, torch.float32)
    if cfg.get("rescale_betas_zero_snr", False):
        acp = S.rescale_zero_terminal_snr(acp)
    ts = S.spaced_timesteps(num_steps, T, cfg.get("timestep_spacing", "leading"), steps_offset=cfg.get("steps_offset", 0))
    final = 1.0 if cfg.get("set_alpha_to_one", True) else float(acp[0])
    schedule = S.vp_schedule(acp, ts, target="offset", final_alpha_cumprod=final, num_train_timesteps=T)
    options = {"clip_x0": cfg.get("clip_sample_range", 1.0)} if cfg.get("clip_sample", True) else {}
    return SamplerSpec(schedule, check_prediction(cfg.get("prediction_type", "epsilon")), "ddim", options)


def _dpmsolver_spec(cfg: dict, cls: str, num_steps: int, timesteps: Tensor | None = None) -> SamplerSpec:
    _reject(cfg, cls, algorithm_type="dpmsolver++", solver_type="midpoint", thresholding=False,
            use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
            use_flow_sigmas=False, euler_at_final=False, variance_type=None, use_dynamic_shifting=False)
    _reject(cfg, cls, lambda_min_clipped=-float("inf"))
    order = cfg.get("solver_order", 2)
    if order not in (1, 2):
        raise ValueError(f"{cls}: solver_order={order} is not supported (supported: 1, 2)")
    schedule = _multistep_vp_schedule(cfg, cls, num_steps, timesteps)
    solver = "dpmpp_2m" if order == 2 else "ddim"
    options = {"lower_order_final": cfg.get("lower_order_final", True)} if order == 2 else {}
    return SamplerSpec(schedule, check_prediction(cfg.get("prediction_type", "epsilon")), solver, options)


def _flow_euler_spec(cfg: dict, cls: str, num_steps: int | None, mu: float | None, *, sigmas=None,
                     timesteps=None) -> SamplerSpec:
    """FlowMatchEulerDiscreteScheduler; custom `sigmas` and/or `timesteps` as its set_timesteps takes them."""
    _reject(cfg, cls, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
            use_beta_sigmas=False, stochastic_sampling=False)
    T = cfg.get("num_train_timesteps", 1000)
    dynamic = cfg.get("use_dynamic_shifting", False)
    if dynamic and mu is None:
        raise ValueError(f"{cls}: use_dynamic_shifting is set, so mu is required (see samplers.dynamic_shift_mu)")
    kind = cfg.get("time_shift_type", "exponential")
    if sigmas is None and timesteps is None:
        sigmas = S.flow_sigmas(num_steps, shift=cfg.get("shift", 1.0), mu=mu if dynamic else None,
                               num_train_timesteps=T, time_shift_type=kind)
        return SamplerSpec(S.flow_schedule(sigmas, num_train_timesteps=T), "flow", "euler")
    sigmas, timesteps = _custom_flow_sigmas(sigmas, timesteps, shift=cfg.get("shift", 1.0), mu=mu if dynamic else None,
                                            num_train_timesteps=T, time_shift_type=kind)
    states = torch.cat([sigmas, sigmas.new_zeros(1)])
    return SamplerSpec(S.Schedule.from_states(timesteps, 1 - states, states), "flow", "euler")


def _custom_flow_sigmas(sigmas, timesteps, *, shift: float, mu: float | None, num_train_timesteps: int,
                        time_shift_type: str) -> tuple[Tensor, Tensor]:
    """FlowMatchEuler's set_timesteps(sigmas=..., timesteps=...): the sigmas given (or timesteps / T) in float32,
    shifted (statically, or by mu) in float32 as diffusers computes them; the model's timesteps are the ones given,
    else sigma * T. Returns both as float64 (N,)."""
    T = num_train_timesteps
    if timesteps is not None:
        timesteps = _custom_values("timesteps", timesteps).astype(np.float32)
    if sigmas is not None:
        sigmas = _custom_values("sigmas", sigmas).astype(np.float32)
        if timesteps is not None and len(timesteps) != len(sigmas):
            raise ValueError(f"sigmas and timesteps must have the same length, got {len(sigmas)} and "
                             f"{len(timesteps)}")
    else:
        sigmas = timesteps / T
    if (sigmas <= 0).any():
        raise ValueError(f"sigmas must be positive (the schedule's final sigma = 0 is appended, as in diffusers), "
                         f"got {sigmas.tolist()}")
    sigmas = S.time_shift(sigmas, mu, kind=time_shift_type) if mu is not None else S.flow_shift(sigmas, shift)
    sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
    model_t = torch.from_numpy(timesteps) if timesteps is not None else sigmas * T
    return sigmas.double(), model_t.double()


# diffusers accepts these solver_type names for UniPC and runs them as bh2.
_UNIPC_SOLVER_TYPES = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


def _unipc_spec(cfg: dict, cls: str, num_steps: int, mu: float | None) -> SamplerSpec:
    """UniPCMultistepScheduler: VP (DDPM betas) or flow sigmas, and the `sample_unipc` options it amounts to."""
    _reject(cfg, cls, thresholding=False, use_karras_sigmas=False, use_exponential_sigmas=False,
            use_beta_sigmas=False, solver_p=None, shift_terminal=None)
    order, kind = cfg.get("solver_order", 2), cfg.get("solver_type", "bh2")
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"{cls}: solver_order={order!r} is not supported (supported: 1, 2, 3)")
    if kind not in _UNIPC_SOLVER_TYPES:
        raise ValueError(f"{cls}: solver_type={kind!r} is not supported (supported: {', '.join(_UNIPC_SOLVER_TYPES)})")
    prediction, flow = check_prediction(cfg.get("prediction_type", "epsilon")), cfg.get("use_flow_sigmas", False)
    if prediction == "flow" and not flow:
        raise ValueError(f"{cls}: prediction_type='flow_prediction' is supported only with use_flow_sigmas=True "
                         "(without it diffusers reads the velocity against VE sigmas)")
    options = {"order": order, "variant": _UNIPC_SOLVER_TYPES[kind], "predict_x0": cfg.get("predict_x0", True),
               "lower_order_final": cfg.get("lower_order_final", True),
               "disable_corrector": tuple(cfg.get("disable_corrector") or ())}
    if not options["predict_x0"] and prediction == "flow":
        raise ValueError(f"{cls}: predict_x0=False is not supported with prediction_type='flow_prediction' "
                         "(diffusers refuses it too; supported: predict_x0=True)")
    if flow:
        schedule = _multistep_flow_schedule(cfg, cls, num_steps, mu)
    else:
        _reject(cfg, cls, use_dynamic_shifting=False)  # only flow sigmas are shifted
        schedule = _multistep_vp_schedule(cfg, cls, num_steps)
    _check_unipc_last_step(cls, num_steps, options, schedule)
    return SamplerSpec(schedule, prediction, "unipc", options)


def _check_unipc_last_step(cls: str, num_steps: int, options: dict, schedule: S.Schedule) -> None:
    """Refuse the settings under which diffusers' last step is NaN, rather than return a sample diffusers never
    gives: a step to sigma = 0 has an infinite log-SNR step, which bh1 and the noise form multiply by zero; a step
    to sigma = 0 or of zero length (flow sigmas with 'sigma_min') has no finite divided differences above order 1."""
    to_zero = float(schedule.sigmas_next[-1]) == 0
    zero_length = float(schedule.sigmas_next[-1]) == float(schedule.sigmas[-1])
    why = " with final_sigmas_type='zero' (diffusers' last step is NaN there); use final_sigmas_type='sigma_min'"
    if to_zero and options["variant"] == "bh1":
        raise ValueError(f"{cls}: solver_type='bh1' is not supported{why} or solver_type='bh2'")
    if to_zero and not options["predict_x0"]:
        raise ValueError(f"{cls}: predict_x0=False is not supported{why} or predict_x0=True")
    if (to_zero or zero_length) and not options["lower_order_final"] and options["order"] > 1 and num_steps > 1:
        raise ValueError(f"{cls}: lower_order_final=False is not supported with solver_order > 1 when the last step "
                         "goes to sigma = 0 or has zero length (diffusers' last step is NaN there); use "
                         "lower_order_final=True")


def _multistep_flow_schedule(cfg: dict, cls: str, num_steps: int, mu: float | None) -> S.Schedule:
    """Flow sigmas with a static flow_shift, or the dynamic time shift by mu; ending at 0 or at the last sigma."""
    dynamic = cfg.get("use_dynamic_shifting", False)
    if dynamic and mu is None:
        raise ValueError(f"{cls}: use_dynamic_shifting is set, so mu is required (see samplers.dynamic_shift_mu)")
    T = cfg.get("num_train_timesteps", 1000)
    sigmas, timesteps = S.multistep_flow_sigmas(
        num_steps, shift=cfg.get("flow_shift", 1.0), mu=mu if dynamic else None, num_train_timesteps=T,
        time_shift_type=cfg.get("time_shift_type", "exponential"))
    final_type = cfg.get("final_sigmas_type", "zero")
    if final_type not in ("zero", "sigma_min"):
        raise ValueError(f"{cls}: final_sigmas_type={final_type!r} is not supported (supported: 'zero', 'sigma_min')")
    states = torch.cat([sigmas, sigmas.new_zeros(1) if final_type == "zero" else sigmas[-1:]])
    return S.Schedule.from_states(timesteps, 1 - states, states)
