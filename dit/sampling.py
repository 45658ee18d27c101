"""The one denoising path: a model function, classifier-free guidance, a sampler spec and its solver.

Every pipeline (through `DiTPipeline._sample`, which adds the progress bar and diffusers' step callbacks), the
trainer's validation and the benches run their samplers through `denoise`, so guidance and solver options are
assembled in one place.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

import samplers

GuidanceScale = float | Callable[[Tensor], float]


def guided(model_fn: Callable[[Tensor, Tensor], Tensor], guidance_scale: GuidanceScale, *,
           guide: Callable[[Tensor], bool] | None = None,
           skip_layer: samplers.SkipLayerGuidance | None = None) -> Callable:
    """model_fn itself without guidance (a constant scale <= 1 and no `guide`, as diffusers' pipelines read it),
    else classifier-free guidance around it: model_fn then sees the doubled batch, its conditioning arranged as
    [uncond, cond] by the caller, on the calls where `guide(t)` (default: all of them), and the batch alone on the
    others. `skip_layer` adds skip-layer guidance (SD3.5) to the guided calls."""
    if guide is not None or callable(guidance_scale) or guidance_scale > 1:
        return samplers.classifier_free_guidance(model_fn, guidance_scale, active=guide, skip_layer=skip_layer)
    return model_fn


def denoise(model_fn: Callable[[Tensor, Tensor], Tensor], latents: Tensor, spec: samplers.SamplerSpec, *,
            guidance_scale: GuidanceScale = 1.0, guide: Callable[[Tensor], bool] | None = None,
            skip_layer: samplers.SkipLayerGuidance | None = None, solver: str | None = None,
            callback: Callable | None = None, **runtime: Any) -> Tensor:
    """Sample from `latents` with the spec's solver (or `solver`): model_fn(x, t) is the raw model output, read
    as the spec's prediction, guided as `guided` says; runtime options (eta, generator, ...) go where the solver
    takes them."""
    denoiser = samplers.Denoiser(guided(model_fn, guidance_scale, guide=guide, skip_layer=skip_layer),
                                 spec.prediction)
    return samplers.sample(spec, denoiser, latents, solver=solver, callback=callback, **runtime)
