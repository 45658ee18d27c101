"""Relay diffusion with block noise (RDM, Teng et al. 2023; CogView3, Zheng et al. 2024).

Block noise carries the low-frequency noise power of a low-resolution schedule to a higher resolution;
the relay forward process starts the high-resolution stage from the upsampled low-resolution result z_L
and blurs linearly towards it: F(z0, t) = (1 - t / T_r) z0 + (t / T_r) z_L, x_t = alpha_t F(z0, t) + sigma_t n.
Everything here works for any Gaussian path (variance preserving with zero terminal SNR, flow matching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from samplers.from_diffusers import SamplerSpec
from samplers.paths import DenoiserFn, ModelFn, check_prediction, diffusion_loss
from samplers.schedules import Schedule, TrainPath
from samplers.solvers import SOLVERS, Callback, _after_step, _compute, _exp_neg_h, randn

BLUR_MODES = ("time", "step")
UPSAMPLE_MODES = ("nearest", "bilinear")


def _check_block_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Block noise
# ----------------------------------------------------------------------------------------------------------------


def block_filter(e: Tensor, block_size: int) -> Tensor:
    """Block[s](e)[x, y] = (1/s) sum_{i, j < s} e[x - i, y - j], with wrap-around, over the last two dims.

    A box filter: linear, unit variance for white input, covariance (s - |dx|)(s - |dy|) / s^2.
    Separable, so it costs 2 (s - 1) shifted adds instead of s^2.
    """
    _check_block_size("block size", block_size)
    out = e
    for dim in (-2, -1):
        acc = out
        for i in range(1, block_size):
            acc = acc + torch.roll(out, shifts=i, dims=dim)
        out = acc
    return out / block_size


def _temporal_box(e: Tensor, size: int, dim: int) -> Tensor:
    """(1 / sqrt(k)) sum over k consecutive frames, without wrap-around: e has F + k - 1 frames on `dim`."""
    frames = e.shape[dim] - size + 1
    csum = torch.cumsum(e, dim=dim)
    zero = torch.zeros_like(csum.narrow(dim, 0, 1))
    csum = torch.cat([zero, csum], dim=dim)  # (.., F + k, ..)
    return (csum.narrow(dim, size, frames) - csum.narrow(dim, 0, frames)) / math.sqrt(size)


def block_noise(
    shape: tuple[int, ...] | torch.Size,
    block_size: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    temporal_block_size: int = 1,
    time_dim: int | None = None,
) -> Tensor:
    """RDM block noise over the last two dimensions (any leading dims: (B, C, H, W), (B, C, F, H, W), ...).

    Unit variance per element; s = 1 is white noise. Sizes need not divide by s (the filter wraps around),
    but s may not exceed them. `temporal_block_size` k > 1 (our extension for video, to be measured) also
    sums k consecutive frames along `time_dim`, without wrap-around so that the first and last frames stay
    independent; the result stays unit-variance with temporal covariance (k - |dt|) / k.
    """
    _check_block_size("block size", block_size)
    _check_block_size("temporal block size", temporal_block_size)
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"block noise needs at least 2 dimensions (..., H, W), got shape {shape}")
    if block_size > min(shape[-2:]):
        raise ValueError(f"block size {block_size} exceeds the spatial size {shape[-2:]}; use at most {min(shape[-2:])}")
    dtype = dtype or torch.get_default_dtype()
    draw = list(shape)
    if temporal_block_size > 1:
        if time_dim is None:
            raise ValueError("temporal_block_size > 1 needs time_dim, the index of the frame dimension")
        time_dim = time_dim % len(shape)
        if time_dim >= len(shape) - 2:
            raise ValueError(f"time_dim {time_dim} must be a leading dimension, not one of the last two of {shape}")
        draw[time_dim] += temporal_block_size - 1
    e = randn(tuple(draw), generator=generator, device=torch.device(device or "cpu"), dtype=dtype)
    out = block_filter(e, block_size)
    if temporal_block_size > 1:
        out = _temporal_box(out, temporal_block_size, time_dim)
    return out


def mixed_noise(
    shape: tuple[int, ...] | torch.Size,
    block_size: int,
    *,
    alpha: float = 0.15,
    normalize: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    temporal_block_size: int = 1,
    time_dim: int | None = None,
) -> Tensor:
    """White plus block noise, (e + a Block[s](e')) / sqrt(1 + a^2) (RDM's normalised form; unit variance).

    `normalize=False` gives RDM's released code, which omits the normalisation.
    """
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"block noise weight alpha must be a finite number >= 0, got {alpha}")
    dtype = dtype or torch.get_default_dtype()
    white = randn(tuple(shape), generator=generator, device=torch.device(device or "cpu"), dtype=dtype)
    block = block_noise(shape, block_size, generator=generator, dtype=dtype, device=device,
                        temporal_block_size=temporal_block_size, time_dim=time_dim)
    out = white + alpha * block
    return out / math.sqrt(1 + alpha**2) if normalize else out


# ----------------------------------------------------------------------------------------------------------------
# Upsampling the base result
# ----------------------------------------------------------------------------------------------------------------


def upsample(z: Tensor, factor: float, *, mode: str = "nearest") -> Tensor:
    """Upsample the last two dims of a latent (B, C, H, W) or video latent (..., H, W) by `factor`."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsampling mode {mode!r}; accepted: {', '.join(UPSAMPLE_MODES)}")
    h, w = z.shape[-2:]
    th, tw = h * factor, w * factor
    if not (math.isfinite(factor) and factor > 0) or th != int(th) or tw != int(tw):
        raise ValueError(
            f"upscale factor {factor} makes the size {h}x{w} -> {th}x{tw}, which is not a whole number of latent pixels"
        )
    lead = z.shape[:-2]
    flat = z.reshape(-1, 1, h, w)  # (B*, 1, H, W): interpolate treats every leading dim alike
    out = F.interpolate(flat.float(), size=(int(th), int(tw)), mode=mode,
                        **({"align_corners": False} if mode == "bilinear" else {}))
    return out.to(z.dtype).reshape(*lead, int(th), int(tw))


# ----------------------------------------------------------------------------------------------------------------
# The relay forward process and sampler
# ----------------------------------------------------------------------------------------------------------------


def relay_blur(z0: Tensor, z_low: Tensor, b: float | Tensor) -> Tensor:
    """F = (1 - b) z0 + b z_L, with b = t / T_r the blur fraction (per sample if a (B,) tensor)."""
    if isinstance(b, Tensor) and b.ndim == 1:
        b = b.view(-1, *([1] * (z0.ndim - 1)))
    return (1 - b) * z0 + b * z_low


@dataclass(frozen=True)
class RelaySchedule:
    """A truncated schedule from t = T_r down to the data, with the blur fraction of every state.

    `blur[i]` belongs to the start of step i and `blur_next[i]` to its target; blur is 1 at the first state
    (the relay starts from z_L) and 0 at the last.
    """

    schedule: Schedule
    blur: Tensor
    blur_next: Tensor

    def __len__(self) -> int:
        return len(self.schedule)

    @property
    def timesteps(self) -> Tensor:
        return self.schedule.timesteps


def relay_schedule(path: TrainPath, t_relay: int, num_steps: int, *, blur: str = "time") -> RelaySchedule:
    """M = num_steps evenly spaced steps from training step T_r = t_relay down to the data.

    blur="time": b = t / T_r (CogView3, Algorithm 1); blur="step": b = k / M for the k-th step from the end
    (CogView3's released sampler). They coincide when the steps divide T_r evenly.
    """
    T = len(path)
    if isinstance(t_relay, bool) or not isinstance(t_relay, int) or not 1 <= t_relay <= T - 1:
        raise ValueError(f"relay start T_r = {t_relay!r} is outside the schedule's training steps [1, {T - 1}]")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= t_relay:
        raise ValueError(f"number of relay steps {num_steps!r} must be an integer in [1, T_r = {t_relay}]")
    if blur not in BLUR_MODES:
        raise ValueError(f"unknown relay blur mode {blur!r}; accepted: {', '.join(BLUR_MODES)}")
    k = torch.arange(num_steps, 0, -1, dtype=torch.float64)  # M, M-1, ..., 1
    ts = torch.round(t_relay * k / num_steps).long()  # (M,), ts[0] = T_r
    alphas = torch.cat([path.alphas[ts], torch.ones(1, dtype=torch.float64)])
    sigmas = torch.cat([path.sigmas[ts], torch.zeros(1, dtype=torch.float64)])
    b = ts.double() / t_relay if blur == "time" else k / num_steps
    b = torch.cat([b, torch.zeros(1, dtype=torch.float64)])
    return RelaySchedule(Schedule.from_states(path.model_t[ts], alphas, sigmas), b[:-1], b[1:])


def relay_step(
    x: Tensor, x0: Tensor, z_low: Tensor,
    alpha: float, sigma: float, b: float, alpha_next: float, sigma_next: float, b_next: float,
    *, eta: float = 0.0, noise: Tensor | None = None,
) -> Tensor:
    """CogView3 Algorithm 1 for any Gaussian path (deterministic at eta = 0):

    n^ = (x - alpha F(x0^, t)) / sigma;  x' = alpha' F(x0^, t') + sqrt(sigma'^2 - c^2) n^ + c n,
    c = eta sigma' sqrt(1 - e^{-2h}) re-injects fresh (block) noise n, as DDIM's eta does.
    """
    dtype = x.dtype
    xc, x0c, zl = _compute(x), _compute(x0), _compute(z_low)
    n_hat = (xc - alpha * relay_blur(x0c, zl, b)) / sigma
    c = 0.0
    if eta > 0:
        if noise is None:
            raise ValueError("relay_step with eta > 0 needs the noise tensor")
        e = _exp_neg_h(alpha, sigma, alpha_next, sigma_next)
        c = eta * sigma_next * math.sqrt(max(1.0 - e * e, 0.0))
    out = alpha_next * relay_blur(x0c, zl, b_next) + math.sqrt(max(sigma_next**2 - c * c, 0.0)) * n_hat
    if c > 0:
        out = out + c * _compute(noise)
    return out.to(dtype)


def relay_coefficients(alpha: float, sigma: float, b: float, alpha_next: float, sigma_next: float,
                       b_next: float) -> tuple[float, float, float]:
    """Coefficients (on y, x0^, z_L) of the deterministic relay step in the path's flow frame
    y = x / (alpha + sigma); they sum to 1, so a constant latent is a fixed point."""
    k, k_next = alpha + sigma, alpha_next + sigma_next
    s, s_next = sigma / k, sigma_next / k_next
    r = s_next / s
    c_y = r
    c_x0 = (1 - s_next) * (1 - b_next) - r * (1 - s) * (1 - b)
    c_zl = (1 - s_next) * b_next - r * (1 - s) * b
    return c_y, c_x0, c_zl


def relay_start(z_low: Tensor, schedule: RelaySchedule, noise: Tensor) -> Tensor:
    """The first state: x = alpha_{T_r} z_L + sigma_{T_r} n (F(., T_r) = z_L)."""
    return (float(schedule.schedule.alphas[0]) * _compute(z_low) + float(schedule.schedule.sigmas[0]) * _compute(noise)).to(z_low.dtype)


def sample_relay(
    denoiser: DenoiserFn,
    z_low: Tensor,
    schedule: RelaySchedule,
    *,
    noise: Tensor | None = None,
    eta: float = 0.0,
    block_size: int = 1,
    noise_alpha: float = 0.15,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """The relay super-resolution stage: from the upsampled base result z_L to a sample at its resolution.

    The starting noise is `noise`, or mixed block noise (white + noise_alpha x Block[block_size]) drawn from
    `generator`; with eta > 0 the re-injected noise is drawn the same way.
    """
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")

    def draw() -> Tensor:
        return mixed_noise(z_low.shape, block_size, alpha=noise_alpha, generator=generator, dtype=torch.float32,
                           device=z_low.device)

    sched = schedule.schedule
    x = relay_start(z_low, schedule, draw() if noise is None else noise)
    for i in range(len(sched)):
        a, s = float(sched.alphas[i]), float(sched.sigmas[i])
        x0 = denoiser(x, sched.timesteps[i], sched.alphas[i], sched.sigmas[i])
        fresh = draw() if eta > 0 else None
        x_new = relay_step(x, x0, z_low, a, s, float(schedule.blur[i]), float(sched.alphas_next[i]),
                           float(sched.sigmas_next[i]), float(schedule.blur_next[i]), eta=eta, noise=fresh)
        x = _after_step(callback, i, x_new, x0)
    return x


def relay_loss(
    model_fn: ModelFn,
    z0: Tensor,
    z_low: Tensor,
    path: TrainPath,
    t_relay: int,
    prediction: str,
    *,
    block_size: int = 1,
    noise_alpha: float = 0.15,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training loss of the relay super-resolution stage.

    t ~ U{0..T_r} per sample; x_t = alpha_t F(z0, t) + sigma_t n with mixed block noise n. The model is
    trained to give z0 (in its own parameterisation): the effective noise is (x_t - alpha_t z0) / sigma_t,
    so this is the ordinary diffusion loss with that noise, and sampling with `sample_relay` inverts it.
    """
    prediction = check_prediction(prediction)
    if not 1 <= t_relay <= len(path) - 1:
        raise ValueError(f"relay start T_r = {t_relay!r} is outside the schedule's training steps [1, {len(path) - 1}]")
    if z_low.shape != z0.shape:
        raise ValueError(f"z_low has shape {tuple(z_low.shape)}; it must be upsampled to z0's {tuple(z0.shape)}")
    b = z0.shape[0]
    gen_device = generator.device if generator is not None else z0.device
    t = torch.randint(0, t_relay + 1, (b,), generator=generator, device=gen_device).to(z0.device)
    alpha, sigma = path.alphas.to(z0.device)[t], path.sigmas.to(z0.device)[t]
    n = mixed_noise(z0.shape, block_size, alpha=noise_alpha, generator=generator, dtype=z0.dtype, device=z0.device)
    view = (-1,) + (1,) * (z0.ndim - 1)
    x_t = alpha.view(view) * relay_blur(z0, z_low, t.double() / t_relay) + sigma.view(view) * n
    eps_eff = ((x_t - alpha.view(view) * z0) / sigma.view(view)).to(z0.dtype)
    return diffusion_loss(model_fn, z0, path.model_t.to(z0.device)[t], alpha.to(z0.dtype), sigma.to(z0.dtype),
                          prediction, noise=eps_eff)


def relay_spec(path: TrainPath, t_relay: int, num_steps: int, prediction: str, *, block_size: int,
               noise_alpha: float = 0.15, blur: str = "time") -> SamplerSpec:
    """The relay stage as a sampler spec (solver "relay"): `samplers.sample(spec, denoiser, z_low, eta=...,
    generator=...)` runs it like any other sampler."""
    return SamplerSpec(relay_schedule(path, t_relay, num_steps, blur=blur), prediction, "relay",
                       {"block_size": block_size, "noise_alpha": noise_alpha})


SOLVERS["relay"] = sample_relay  # registered here: solvers.py cannot import this module back
