"""Gaussian paths x_t = alpha_t x0 + sigma_t eps, and model parameterisations as one x0-predicting denoiser.

A model predicts eps, v (Salimans & Ho 2022), x0, or a flow velocity (Lipman et al. 2023; Esser et al. 2024).
`Denoiser` turns any of them into D(x, t, alpha, sigma) -> x0, which is all the solvers see. The training
target sits next to it, so training and sampling share one definition of each parameterisation.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
# diffusers' names and common aliases -> ours
_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "flow_prediction": "flow", "velocity": "flow"}

ModelFn = Callable[[Tensor, Tensor], Tensor]


class DenoiserFn(Protocol):
    """D(x, t, alpha, sigma) -> predicted x0. alpha, sigma are float64 scalars (0-dim) of the current state."""

    def __call__(self, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor: ...


def check_prediction(prediction: str) -> str:
    """The canonical name of a parameterisation, or a ValueError listing the accepted ones."""
    name = _ALIASES.get(prediction, prediction)
    if name not in PREDICTIONS:
        raise ValueError(
            f"unknown prediction type {prediction!r}; accepted: {', '.join(PREDICTIONS)} (aliases: {', '.join(_ALIASES)})"
        )
    return name


def _bcast(c: Tensor | float, like: Tensor) -> Tensor | float:
    """A per-sample coefficient (B,) broadcast over (B, ...), or a scalar as is."""
    if isinstance(c, Tensor) and c.ndim == 1:
        return c.view(-1, *([1] * (like.ndim - 1)))
    return c


def to_x0(output: Tensor, x: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction: str) -> Tensor:
    """The x0 implied by a model output at state (alpha, sigma).

    v and flow are exact at alpha = 0 (zero terminal SNR: x0 = -v); eps cannot predict x0 there and raises.
    """
    prediction = check_prediction(prediction)
    a, s = _bcast(alpha, x), _bcast(sigma, x)
    if prediction == "sample":
        return output
    if prediction == "v_prediction":
        return a * x - s * output
    if prediction == "flow":  # x = (1 - s) x0 + s eps, v = eps - x0  =>  x0 = x - s v
        return x - s * output
    if bool(torch.any(torch.as_tensor(alpha) == 0)):
        raise ValueError(
            "an epsilon-prediction model cannot give x0 at alpha = 0 (zero terminal SNR); use a v- or x0-prediction "
            "model, or a schedule without zero terminal SNR"
        )
    return (x - s * output) / a


def eps_from_x0(x0: Tensor, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The noise implied by an x0 prediction: eps = (x - alpha x0) / sigma (sigma > 0)."""
    return (x - _bcast(alpha, x) * x0) / _bcast(sigma, x)


def training_target(x0: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction: str) -> Tensor:
    """What the model should output at x = alpha x0 + sigma eps, for each parameterisation."""
    prediction = check_prediction(prediction)
    a, s = _bcast(alpha, x0), _bcast(sigma, x0)
    if prediction == "epsilon":
        return eps
    if prediction == "sample":
        return x0
    if prediction == "v_prediction":
        return a * eps - s * x0
    return eps - x0  # flow velocity, d x / d sigma along the straight path


def add_noise(x0: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The forward process x = alpha x0 + sigma eps (per-sample alpha, sigma of shape (B,) broadcast)."""
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


def diffusion_loss(
    model_fn: ModelFn,
    x0: Tensor,
    t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    prediction: str,
    *,
    noise: Tensor | None = None,
    weight: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean-squared error between the model output and the parameterisation's target (per-sample weights)."""
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) if noise is None else noise
    out = model_fn(add_noise(x0, eps, alpha, sigma), t)
    err = (out.float() - training_target(x0, eps, alpha, sigma, prediction).float()) ** 2
    err = err.flatten(1).mean(1)  # (B,)
    if weight is not None:
        err = err * weight
    return err.mean()


class Denoiser:
    """Wraps a model (x, t) -> output of any parameterisation into D(x, t, alpha, sigma) -> x0."""

    def __init__(self, model_fn: ModelFn, prediction: str):
        self.model_fn = model_fn
        self.prediction = check_prediction(prediction)

    def __call__(self, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return to_x0(self.model_fn(x, t), x, alpha, sigma, self.prediction)
