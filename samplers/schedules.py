"""Noise schedules: DDPM betas, CogVideoX's SNR shift, zero terminal SNR, timestep spacing, flow sigmas.

Everything here produces plain float64 tensors, plus `Schedule`, the one object the solvers take: a
discretised Gaussian path x = alpha * x0 + sigma * eps, walked from noise to data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
TIME_SHIFT_TYPES = ("exponential", "linear")


def _check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(repr(a) for a in accepted)}")


def check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    """A step count must be an integer in [1, num_train_timesteps]."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"number of steps must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= num_train_timesteps:
        nearest = min(max(int(num_steps), 1), num_train_timesteps)
        raise ValueError(
            f"number of steps {num_steps} is outside [1, {num_train_timesteps}] (the training steps); nearest valid: {nearest}"
        )


# ----------------------------------------------------------------------------------------------------------------
# DDPM betas and cumulative alphas
# ----------------------------------------------------------------------------------------------------------------


def ddpm_betas(
    schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """DDPM betas (Ho et al. 2020; cosine: Nichol & Dhariwal 2021), (T,).

    `dtype` is the precision the betas are computed in: diffusers' DDIM and DPM-Solver schedulers compute
    them in float32, CogVideoX's in float64; reproducing a checkpoint's sampler to 1e-6 needs the same.
    """
    _check_choice("beta schedule", schedule, BETA_SCHEDULES)
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=dtype)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=dtype) ** 2
    else:  # squaredcos_cap_v2: betas from the cosine alpha_bar, capped at 0.999 (computed in float64, stored float32)

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=torch.float32
        )
    return betas.double()


def alphas_cumprod_from_betas(betas: Tensor, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), accumulated in `dtype` (float32 in most diffusers schedulers)."""
    return torch.cumprod(1.0 - betas.to(dtype), dim=0).double()


def snr_shift(alphas_cumprod: Tensor, scale: float) -> Tensor:
    """CogVideoX's SNR shift: alpha_bar' = alpha_bar / (s + (1 - s) alpha_bar), i.e. SNR' = SNR / s."""
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"snr_shift_scale must be a positive finite number, got {scale}")
    return alphas_cumprod / (scale + (1 - scale) * alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Zero terminal SNR (Lin et al. 2024, Algorithm 1): shift and scale sqrt(alpha_bar) so the last is exactly 0."""
    s = alphas_cumprod.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * (s0 / (s0 - sT))
    return s**2


# ----------------------------------------------------------------------------------------------------------------
# Timestep spacing
# ----------------------------------------------------------------------------------------------------------------


def spaced_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    spacing: str = "leading",
    *,
    steps_offset: int = 0,
    convention: str = "ddim",
) -> Tensor:
    """Integer timesteps, descending (Lin et al. 2024, Table 2 names: leading, trailing, linspace), (N,) int64.

    diffusers has two conventions that differ for leading and linspace: "ddim" (DDIM and CogVideoX schedulers)
    spaces N points over [0, T); "dpmsolver" spaces N + 1 points and drops the last.
    """
    _check_choice("timestep spacing", spacing, SPACINGS)
    _check_choice("spacing convention", convention, ("ddim", "dpmsolver"))
    check_num_steps(num_steps, num_train_timesteps)
    T, N = num_train_timesteps, num_steps
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1
    elif convention == "ddim":
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
        else:
            ts = (np.arange(0, N) * (T // N)).round()[::-1].astype(np.int64) + steps_offset
    else:
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, N + 1).round()[::-1][:-1].astype(np.int64)
        else:
            ts = (np.arange(0, N + 1) * (T // (N + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    return torch.from_numpy(ts.copy())


# ----------------------------------------------------------------------------------------------------------------
# Flow matching sigmas
# ----------------------------------------------------------------------------------------------------------------


def flow_shift(t: Tensor | float, shift: float) -> Tensor | float:
    """SD3's static shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def time_shift(t: Tensor, mu: float, *, kind: str = "exponential", sigma: float = 1.0) -> Tensor:
    """Resolution-dependent shift with exponent mu: exp(mu) / (exp(mu) + (1/t - 1)^sigma) (or the linear form)."""
    _check_choice("time shift type", kind, TIME_SHIFT_TYPES)
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    return mu / (mu + (1 / t - 1) ** sigma)


def dynamic_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu linear in the token count between (base_seq_len, base_shift) and (max_seq_len, max_shift) (Flux / SD3.5)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flow_sigmas(
    num_steps: int,
    *,
    shift: float = 1.0,
    mu: float | None = None,
    num_train_timesteps: int = 1000,
    time_shift_type: str = "exponential",
) -> Tensor:
    """Flow-matching sigmas for sampling, (N,) descending, as diffusers' FlowMatchEulerDiscreteScheduler sets them.

    With a static shift, the end points of the linspace are the training grid's already-shifted sigmas, and the
    linspace is shifted again (diffusers' behaviour, reproduced so that schedules match to the digit).
    With `mu`, the resolution-dependent exponential (or linear) time shift is applied instead.
    The result is rounded to float32 like diffusers', then returned as float64.
    """
    check_num_steps(num_steps, num_train_timesteps)
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"flow shift must be a positive finite number, got {shift}")
    T = num_train_timesteps
    train = np.linspace(1, T, T, dtype=np.float32)[::-1] / T  # training sigmas, float32 as in diffusers
    if mu is None:
        train = shift * train / (1 + (shift - 1) * train)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * T, sigma_min * T, num_steps) / T
    if mu is not None:
        sigmas = time_shift(sigmas, mu, kind=time_shift_type)
    else:
        sigmas = flow_shift(sigmas, shift)
    return torch.from_numpy(np.asarray(sigmas, dtype=np.float32).astype(np.float64))


def multistep_flow_sigmas(
    num_steps: int,
    *,
    shift: float = 1.0,
    mu: float | None = None,
    num_train_timesteps: int = 1000,
    time_shift_type: str = "exponential",
) -> tuple[Tensor, Tensor]:
    """Flow sigmas (N,) and the model's integer timesteps (N,), as diffusers' multistep solvers (UniPC, with
    use_flow_sigmas) set them.

    Unlike `flow_sigmas` (FlowMatchEuler): a linspace of N + 1 points from 1 to 1/T with the last dropped, shifted
    once; a first sigma of 1 is moved to 1 - 1e-6 so that its log-SNR stays finite; the model sees sigma * T
    truncated to an integer. Sigmas are rounded to float32 like diffusers', then returned as float64.
    """
    check_num_steps(num_steps, num_train_timesteps)
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"flow shift must be a positive finite number, got {shift}")
    T = num_train_timesteps
    sigmas = np.linspace(1, 1 / T, num_steps + 1)[:-1]
    sigmas = time_shift(sigmas, mu, kind=time_shift_type) if mu is not None else flow_shift(sigmas, shift)
    if abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    timesteps = torch.from_numpy((sigmas * T).astype(np.int64))
    return torch.from_numpy(sigmas.astype(np.float32).astype(np.float64)), timesteps


# ----------------------------------------------------------------------------------------------------------------
# The discretised path the solvers walk
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A sampling discretisation of x = alpha * x0 + sigma * eps.

    Step i takes the state at (alphas[i], sigmas[i]), which the model sees as `timesteps[i]`, to
    (alphas_next[i], sigmas_next[i]). For most schedules the target of step i is the start of step i + 1;
    diffusers' DDIM-family schedulers target t_i - T // N instead, which can differ by one training step,
    so the targets are kept explicitly. The last target is the data (alpha = 1, sigma = 0) unless a schedule
    says otherwise. All coefficient tensors are float64, (N,).
    """

    timesteps: Tensor
    alphas: Tensor
    sigmas: Tensor
    alphas_next: Tensor
    sigmas_next: Tensor

    def __post_init__(self) -> None:
        n = len(self.timesteps)
        for name in ("alphas", "sigmas", "alphas_next", "sigmas_next"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Schedule.{name} has {len(getattr(self, name))} entries, timesteps has {n}")

    def __len__(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_states(cls, timesteps: Tensor, alphas: Tensor, sigmas: Tensor) -> "Schedule":
        """From N + 1 consecutive states (the last one the end point) and the N model timesteps."""
        if len(alphas) != len(timesteps) + 1 or len(sigmas) != len(timesteps) + 1:
            raise ValueError(
                f"from_states needs N + 1 = {len(timesteps) + 1} alphas and sigmas, got {len(alphas)} and {len(sigmas)}"
            )
        a, s = alphas.double(), sigmas.double()
        return cls(timesteps, a[:-1], s[:-1], a[1:], s[1:])

    @property
    def is_chained(self) -> bool:
        """True when each step's target is the next step's start (needed by multistep / Heun solvers)."""
        return bool(
            torch.equal(self.alphas_next[:-1], self.alphas[1:]) and torch.equal(self.sigmas_next[:-1], self.sigmas[1:])
        )

    def truncate(self, start: int) -> "Schedule":
        """The schedule from step `start` on (img2img strength, relay stages)."""
        if not 0 <= start < len(self):
            raise ValueError(f"start step {start} is outside [0, {len(self) - 1}]")
        return Schedule(*(getattr(self, f)[start:] for f in ("timesteps", "alphas", "sigmas", "alphas_next", "sigmas_next")))


def vp_schedule(
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    target: str = "next",
    final_alpha_cumprod: float = 1.0,
    num_train_timesteps: int | None = None,
) -> Schedule:
    """A variance-preserving schedule (alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)) at integer timesteps.

    target="next": step i goes to timesteps[i + 1] and the last to `final_alpha_cumprod`.
    target="offset": step i goes to t_i - T // N (diffusers' DDIM and CogVideoX schedulers), or to
    `final_alpha_cumprod` where that is negative.
    """
    _check_choice("schedule target", target, ("next", "offset"))
    acp = alphas_cumprod.double()
    T = num_train_timesteps or len(acp)
    ts = timesteps.long()
    if target == "next":
        nxt = torch.cat([ts[1:], ts.new_tensor([-1])])
    else:
        nxt = ts - T // len(ts)
    final = torch.tensor(float(final_alpha_cumprod), dtype=torch.float64)
    a_bar = acp[ts]
    a_bar_next = torch.where(nxt >= 0, acp[nxt.clamp(min=0)], final)
    return Schedule(ts, a_bar.sqrt(), (1 - a_bar).sqrt(), a_bar_next.sqrt(), (1 - a_bar_next).sqrt())


def flow_schedule(sigmas: Tensor, *, num_train_timesteps: int = 1000) -> Schedule:
    """The rectified-flow path x = (1 - s) x0 + s eps at the given sigmas, ending at s = 0; t = s * T."""
    s = torch.cat([sigmas.double(), sigmas.new_zeros(1, dtype=torch.float64)])
    # The model's timestep is the float32 product, as diffusers feeds it.
    timesteps = (sigmas.float() * num_train_timesteps).double()
    return Schedule.from_states(timesteps, 1 - s, s)


@dataclass(frozen=True)
class TrainPath:
    """The training discretisation of a path: for each integer training step t in [0, T), the state
    (alphas[t], sigmas[t]) and the timestep value the model is conditioned on (`model_t[t]`)."""

    alphas: Tensor
    sigmas: Tensor
    model_t: Tensor

    def __len__(self) -> int:
        return len(self.alphas)

    @classmethod
    def vp(cls, alphas_cumprod: Tensor) -> "TrainPath":
        """Variance preserving: alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar); the model sees t."""
        acp = alphas_cumprod.double()
        return cls(acp.sqrt(), (1 - acp).sqrt(), torch.arange(len(acp), dtype=torch.float64))

    @classmethod
    def flow(cls, num_train_timesteps: int = 1000) -> "TrainPath":
        """Rectified flow with sigma = (t + 1) / T (diffusers' training grid); the model sees sigma * T."""
        s = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        return cls(1 - s, s, s * num_train_timesteps)
