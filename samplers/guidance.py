"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a model function, not a model method.

The wrapped model runs once on the doubled batch [x, x] (its conditioning is arranged as [uncond, cond] by
the caller) and returns uncond + w (cond - uncond). Guidance is linear in the output, so guiding the raw
output (eps, v, velocity) equals guiding the x0 that the denoiser derives from it.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import Tensor

from samplers.paths import ModelFn

Scale = Union[float, Callable[[Tensor], float]]


def check_guidance_scale(scale: float) -> float:
    """A finite guidance scale, or a ValueError naming the value."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r} (e.g. 6.0; 1.0 disables guidance)")
    return value


def cogvideox_dynamic_scale(scale: float, num_steps: int) -> Callable[[Tensor], float]:
    """CogVideoX's dynamic (cosine) guidance: w(t) = 1 + scale (1 - cos(pi ((N - t) / N)^5)) / 2.

    Written as CogVideoXPipeline computes it, with t the model timestep (not the step index), so that the
    same settings give the same video as diffusers.
    """
    scale = check_guidance_scale(scale)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")

    def w(t: Tensor) -> float:
        return 1 + scale * ((1 - math.cos(math.pi * ((num_steps - float(t)) / num_steps) ** 5.0)) / 2)

    return w


def classifier_free_guidance(model_fn: ModelFn, scale: Scale) -> ModelFn:
    """A model function that runs `model_fn` on [x, x] and mixes uncond + w (cond - uncond).

    `scale` is a number or a function of the timestep (see `cogvideox_dynamic_scale`).
    """
    if not callable(scale):
        check_guidance_scale(scale)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        w = scale(t) if callable(scale) else scale
        t2 = t.expand(2 * x.shape[0]) if t.ndim == 1 else t
        uncond, cond = model_fn(torch.cat([x, x]), t2).chunk(2)
        return uncond + w * (cond - uncond)

    return guided
