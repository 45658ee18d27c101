"""Solvers as plain functions over an x0-predicting denoiser D(x, t, alpha, sigma) and a `Schedule`.

Every step is written for any Gaussian path x = alpha x0 + sigma eps (variance preserving, with zero terminal
SNR, or flow matching), in (alpha, sigma) form: no variance-exploding sigma = sigma / alpha appears, because it
is infinite at the first step of a zero-terminal-SNR schedule. Coefficients are computed in float64; tensors
are updated in at least float32 and returned in the dtype they came in.

Samplers (k-diffusion style): `sample_x(denoiser, x, schedule, *, callback=None, ...) -> x`. A callback is
called as callback(i, x, x0) after step i; if it returns a tensor, that tensor replaces x.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from samplers.paths import DenoiserFn
from samplers.schedules import Schedule

Callback = Callable[[int, Tensor, Tensor], "Tensor | None"]


def randn(shape: torch.Size | tuple[int, ...], *, generator: torch.Generator | None, device: torch.device,
          dtype: torch.dtype) -> Tensor:
    """Gaussian noise drawn like diffusers' randn_tensor: on the generator's device, then moved. A list of
    generators draws batch element i from generator i (so a sample does not depend on its batch)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}; give one per batch element")
        return torch.cat([randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _f(v: Tensor | float) -> float:
    return float(v)


def _lambda(alpha: float, sigma: float) -> float:
    """Half log-SNR, log(alpha / sigma); -inf at alpha = 0, +inf at sigma = 0."""
    if alpha == 0:
        return -math.inf
    if sigma == 0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def _exp_neg_h(alpha: float, sigma: float, alpha_next: float, sigma_next: float) -> float:
    """exp(-(lambda_next - lambda)) = (alpha sigma_next) / (sigma alpha_next): finite where lambda is not."""
    return (alpha * sigma_next) / (sigma * alpha_next)


def _history_ratio(alpha: float, sigma: float, alpha_next: float, sigma_next: float, alpha_prev: float,
                   sigma_prev: float) -> float:
    """h / h_prev, the step in log-SNR over the previous one; 0 when the previous state had alpha = 0."""
    h = _lambda(alpha_next, sigma_next) - _lambda(alpha, sigma)
    return h / (_lambda(alpha, sigma) - _lambda(alpha_prev, sigma_prev))


def _compute(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _state(schedule: Schedule, i: int) -> tuple[Tensor, float, float, float, float]:
    return (
        schedule.timesteps[i],
        _f(schedule.alphas[i]),
        _f(schedule.sigmas[i]),
        _f(schedule.alphas_next[i]),
        _f(schedule.sigmas_next[i]),
    )


def _after_step(callback: Callback | None, i: int, x: Tensor, x0: Tensor) -> Tensor:
    if callback is None:
        return x
    replaced = callback(i, x, x0)
    return x if replaced is None else replaced


# ----------------------------------------------------------------------------------------------------------------
# Single steps (closed forms; tested against their formulas and against diffusers)
# ----------------------------------------------------------------------------------------------------------------


def ddim_step(
    x: Tensor, x0: Tensor, alpha: float, sigma: float, alpha_next: float, sigma_next: float,
    *, eta: float = 0.0, noise: Tensor | None = None, eps: Tensor | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) for any Gaussian path.

    x' = alpha' x0 + sqrt(sigma'^2 - c^2) eps^ + c n, with eps^ = (x - alpha x0) / sigma and
    c = eta sigma' sqrt(1 - e^{-2h}) (the DDPM posterior's standard deviation at eta = 1).
    At eta = 0 this is also the probability-flow Euler step and, on the flow path, flow-matching Euler.
    `eps` overrides eps^ (diffusers keeps the unclipped model's eps when it clips x0).
    """
    dtype = x.dtype
    xc, x0c = _compute(x), _compute(x0)
    eps = (xc - alpha * x0c) / sigma if eps is None else _compute(eps)
    if eta == 0:
        return (alpha_next * x0c + sigma_next * eps).to(dtype)
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs the noise tensor")
    e = _exp_neg_h(alpha, sigma, alpha_next, sigma_next)
    c = eta * sigma_next * math.sqrt(max(1.0 - e * e, 0.0))
    direction = math.sqrt(max(sigma_next**2 - c**2, 0.0))
    return (alpha_next * x0c + direction * eps + c * _compute(noise)).to(dtype)


def dpmpp_2m_step(
    x: Tensor, x0: Tensor, x0_prev: Tensor | None,
    alpha: float, sigma: float, alpha_next: float, sigma_next: float,
    alpha_prev: float | None = None, sigma_prev: float | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; midpoint form as diffusers' 'midpoint' solver_type).

    x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) (D0 + D1 / 2), D0 = x0, D1 = (x0 - x0_prev) h / h_prev.
    Without a previous prediction (first step) it is the first-order step, equal to DDIM.
    """
    dtype = x.dtype
    xc, d = _compute(x), _compute(x0)
    e = _exp_neg_h(alpha, sigma, alpha_next, sigma_next)
    if x0_prev is not None:
        ratio = _history_ratio(alpha, sigma, alpha_next, sigma_next, alpha_prev, sigma_prev)  # 1 / r0
        d = d + (0.5 * ratio) * (d - _compute(x0_prev))
    return ((sigma_next / sigma) * xc + (alpha_next * (1.0 - e)) * d).to(dtype)


def cogvideox_dpm_step(
    x: Tensor, x0: Tensor, x0_prev: Tensor | None,
    alpha: float, sigma: float, alpha_next: float, sigma_next: float,
    alpha_back: float | None, sigma_back: float | None, noise: Tensor,
) -> Tensor:
    """CogVideoX's DPM variant: SDE-DPM-Solver++ (Lu et al. 2022) with a 2M-style history term.

    x' = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) D + sigma' sqrt(1 - e^{-2h}) n,
    D = x0 (first order) or (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = h_prev / h.
    """
    dtype = x.dtype
    xc, d = _compute(x), _compute(x0)
    e = _exp_neg_h(alpha, sigma, alpha_next, sigma_next)
    if x0_prev is not None:
        half_inv_r = 0.5 * _history_ratio(alpha, sigma, alpha_next, sigma_next, alpha_back, sigma_back)
        d = (1 + half_inv_r) * d - half_inv_r * _compute(x0_prev)
    noise_scale = sigma_next * math.sqrt(max(1.0 - e * e, 0.0))
    return ((sigma_next / sigma) * e * xc + (alpha_next * (1.0 - e * e)) * d + noise_scale * _compute(noise)).to(dtype)


def heun_step(
    x: Tensor, x0: Tensor, alpha: float, sigma: float, alpha_next: float, sigma_next: float,
    denoise_next: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1) on the flow form of the path.

    Any Gaussian path is a rectified flow in y = x / (alpha + sigma), s = sigma / (alpha + sigma):
    y = (1 - s) x0 + s eps, dy/ds = (y - x0) / s. That frame is finite at alpha = 0 (unlike the VE frame) and is
    exactly the frame of flow-matching models. The last step to s = 0 is an Euler step, as in Karras et al.
    """
    dtype = x.dtype
    xc, x0c = _compute(x), _compute(x0)
    k, k_next = alpha + sigma, alpha_next + sigma_next
    s, s_next = sigma / k, sigma_next / k_next
    y = xc / k
    d = (y - x0c) / s
    y_next = y + (s_next - s) * d
    if s_next > 0 and denoise_next is not None:
        x0_next = _compute(denoise_next((y_next * k_next).to(dtype)))
        d_next = (y_next - x0_next) / s_next
        y_next = y + (s_next - s) * 0.5 * (d + d_next)
    return (y_next * k_next).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------


def sample_ddim(
    denoiser: DenoiserFn, x: Tensor, schedule: Schedule, *, eta: float = 0.0,
    generator: torch.Generator | None = None, clip_x0: float | None = None, callback: Callback | None = None,
) -> Tensor:
    """DDIM sampling (Song et al. 2021); eta = 0 is deterministic, eta = 1 is DDPM-like ancestral sampling.

    `clip_x0` clamps the predicted x0 to [-r, r] for pixel-space models (diffusers' clip_sample), keeping
    the unclipped prediction's noise for the direction term as diffusers does.
    """
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    for i in range(len(schedule)):
        t, a, s, a_next, s_next = _state(schedule, i)
        x0 = denoiser(x, t, schedule.alphas[i], schedule.sigmas[i])
        eps = None
        if clip_x0 is not None:
            eps = (_compute(x) - a * _compute(x0)) / s
            x0 = x0.clamp(-clip_x0, clip_x0)
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x0.dtype) if eta > 0 else None
        x = _after_step(callback, i, ddim_step(x, x0, a, s, a_next, s_next, eta=eta, noise=noise, eps=eps), x0)
    return x


def sample_euler(
    denoiser: DenoiserFn, x: Tensor, schedule: Schedule, *, callback: Callback | None = None
) -> Tensor:
    """Probability-flow Euler; on a flow schedule this is flow-matching Euler (SD3). Same step as DDIM, eta = 0."""
    return sample_ddim(denoiser, x, schedule, eta=0.0, callback=callback)


def sample_heun(
    denoiser: DenoiserFn, x: Tensor, schedule: Schedule, *, callback: Callback | None = None
) -> Tensor:
    """Heun's second-order sampler (Karras et al. 2022): two denoiser calls per step except the last."""
    _require_chained(schedule, "heun")
    n = len(schedule)
    for i in range(n):
        t, a, s, a_next, s_next = _state(schedule, i)
        x0 = denoiser(x, t, schedule.alphas[i], schedule.sigmas[i])
        denoise_next = None
        if i + 1 < n:
            def denoise_next(xn: Tensor, j: int = i + 1) -> Tensor:
                return denoiser(xn, schedule.timesteps[j], schedule.alphas[j], schedule.sigmas[j])
        x = _after_step(callback, i, heun_step(x, x0, a, s, a_next, s_next, denoise_next), x0)
    return x


def sample_dpmpp_2m(
    denoiser: DenoiserFn, x: Tensor, schedule: Schedule, *, lower_order_final: bool = True,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022).

    The first step is first order (no history). The last step is first order when it lands on sigma = 0
    (the second-order term is degenerate there), or when `lower_order_final` and fewer than 15 steps are
    taken (diffusers' stabilisation for few-step sampling).
    """
    _require_chained(schedule, "dpmpp_2m")
    n = len(schedule)
    x0_prev = None
    for i in range(n):
        t, a, s, a_next, s_next = _state(schedule, i)
        x0 = denoiser(x, t, schedule.alphas[i], schedule.sigmas[i])
        first_order = x0_prev is None or (i == n - 1 and (s_next == 0 or (lower_order_final and n < 15)))
        if first_order:
            x_new = dpmpp_2m_step(x, x0, None, a, s, a_next, s_next)
        else:
            x_new = dpmpp_2m_step(x, x0, x0_prev, a, s, a_next, s_next, _f(schedule.alphas[i - 1]),
                                  _f(schedule.sigmas[i - 1]))
        x0_prev = x0
        x = _after_step(callback, i, x_new, x0)
    return x


def sample_cogvideox_dpm(
    denoiser: DenoiserFn, x: Tensor, schedule: Schedule, *, generator: torch.Generator | None = None,
    last_step_second_order: bool = False, callback: Callback | None = None,
) -> Tensor:
    """CogVideoX's DPM sampler (CogVideoXDPMScheduler): stochastic, first order at the first and last steps.

    The noise is drawn exactly as diffusers draws it (one tensor per step, and a second one on second-order
    steps, in the latents' dtype), so the same generator gives the same video. diffusers takes a second-order
    last step when t_last - T // N >= 0 (step counts that do not divide T); `last_step_second_order` reproduces
    that, and `from_diffusers_config` sets it.
    """
    n = len(schedule)
    x0_prev = None
    for i in range(n):
        t, a, s, a_next, s_next = _state(schedule, i)
        x0 = denoiser(x, t, schedule.alphas[i], schedule.sigmas[i])
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if x0_prev is None or (i == n - 1 and not last_step_second_order):
            x_new = cogvideox_dpm_step(x, x0, None, a, s, a_next, s_next, None, None, noise)
        else:
            noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_new = cogvideox_dpm_step(x, x0, x0_prev, a, s, a_next, s_next, _f(schedule.alphas[i - 1]),
                                       _f(schedule.sigmas[i - 1]), noise)
        x0_prev = x0
        x = _after_step(callback, i, x_new, x0)
    return x


SOLVERS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "cogvideox_dpm": sample_cogvideox_dpm,
}


def get_solver(name: str) -> Callable[..., Tensor]:
    """A sampler by name, or a ValueError listing the accepted names."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; accepted: {', '.join(SOLVERS)}")
    return SOLVERS[name]


def _require_chained(schedule: Schedule, solver: str) -> None:
    if not schedule.is_chained:
        raise ValueError(
            f"the {solver} solver needs a schedule whose step targets are the next steps' starts "
            "(build it with target='next'); this one targets t - T // N like diffusers' DDIM"
        )
