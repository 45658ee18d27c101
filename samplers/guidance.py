"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a model function, not a model method.

The wrapped model runs once on the doubled batch [x, x] (its conditioning is arranged as [uncond, cond] by
the caller) and returns uncond + w (cond - uncond). Guidance is linear in the output, so guiding the raw
output (eps, v, velocity) equals guiding the x0 that the denoiser derives from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance (Stability AI's SD3.5): on the steps where `active(t)`, the guided output gains
    scale (cond - skipped), where `skipped` is `model_fn(x, t)`: the conditional output of the model with some of its
    layers skipped, on the un-doubled batch."""

    model_fn: ModelFn
    scale: float
    active: Callable[[Tensor], bool]

    def __post_init__(self) -> None:
        check_guidance_scale(self.scale)


def classifier_free_guidance(model_fn: ModelFn, scale: Scale, *, active: Callable[[Tensor], bool] | None = None,
                             skip_layer: SkipLayerGuidance | None = None) -> ModelFn:
    """A model function that runs `model_fn` on [x, x] and mixes uncond + w (cond - uncond).

    `scale` is a number or a function of the timestep (see `cogvideox_dynamic_scale`), read at every call.
    `active(t)` (default: always) says whether this call is guided: where it is False, `model_fn` runs on x alone
    (diffusers' pipelines re-read `do_classifier_free_guidance` at every step, and a step callback may turn it
    off). `skip_layer` adds skip-layer guidance to the guided calls.
    """
    if not callable(scale):
        check_guidance_scale(scale)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        w = scale(t) if callable(scale) else scale
        if active is not None and not active(t):
            return model_fn(x, t)
        t2 = t.expand(2 * x.shape[0]) if t.ndim == 1 else t
        uncond, cond = model_fn(torch.cat([x, x]), t2).chunk(2)
        out = uncond + w * (cond - uncond)
        if skip_layer is not None and skip_layer.active(t):
            out = out + (cond - skip_layer.model_fn(x, t)) * skip_layer.scale
        return out

    return guided
