"""DiTPipeline, the base of our pipelines: family dispatch on load, our samplers for the denoising loop, the
memory switches, and the request checks all families share."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

import samplers
from dit.pipeline.loading import _check_index, _check_roles, _family, _load_component, _read_index, _settings
from dit.sampling import GuidanceScale, denoise


logger = logging.getLogger(__name__)

class NonFiniteLatentsError(FloatingPointError):
    """The latents became NaN or inf during denoising (e.g. a huge guidance_scale overflowing the dtype).

    `step` is the 1-based denoising step after which they were first non-finite, `total` the steps of that
    sampling stage."""

    def __init__(self, step: int, total: int):
        super().__init__(f"latents became non-finite (NaN or inf) at step {step} of {total}; lower guidance_scale "
                         "or use a wider dtype")
        self.step, self.total = step, total

    def __reduce__(self) -> tuple:  # picklable (multiprocessing, distributed): rebuilt from (step, total)
        return type(self), (self.step, self.total)


class DiTPipelineOutput(BaseOutput):
    """`.frames` for video ((B, F, H, W, 3) in [0, 1] for output_type="np"), `.images` for images."""

    frames: Any = None
    images: Any = None


class DiTPipeline(DiffusionPipeline):
    """Base of our pipelines: family dispatch on load, our samplers for the denoising loop.

    A video family is what `dit generate` drives; it has these hooks, found through PIPELINE_FAMILIES from a
    folder's model_index.json (`video_pipeline_class`): `check_folder_request(folder, height, width, num_frames)`
    (defaults and sizes from the folder's configs, before any weights load), `memory_shape(folder)` (what
    dit.estimate needs), `check_request(prompt, negative_prompt, height, width, num_frames, num_inference_steps,
    guidance_scale)` (after loading, before generating), `generation_defaults` (the family's defaults where the
    folder has no generation_config.json) and `supports_relay` (whether `relay=k` is a call argument)."""

    diffusers_class_name: str = ""
    supports_relay: bool = False
    generation_defaults: dict[str, Any] = {}

    def denoisers(self) -> list[torch.nn.Module]:
        """The transformers that run the denoising steps (context parallelism is enabled on each)."""
        return [self.transformer]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **kwargs: Any) -> "DiTPipeline":
        """Load a local diffusers pipeline folder (never downloads) into the pipeline for its family."""
        if kwargs:
            raise ValueError(f"unsupported from_pretrained arguments: {sorted(kwargs)}; accepted: torch_dtype, device")
        folder = Path(pretrained_model_name_or_path)
        index = _read_index(folder)
        entries = _check_index(folder, index)  # before any import or load: the folder names only what we load
        target = _family(folder, index)
        if not issubclass(target, cls):
            raise ValueError(f"{str(folder)!r} holds a {index['_class_name']}, which {cls.__name__} cannot load")
        _check_roles(folder, target, entries)
        components = {name: _load_component(folder, name, *spec, torch_dtype) for name, spec in entries.items()}
        pipe = target(**components, **_settings(index, target))
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' save_pretrained, with model_index.json naming the diffusers pipeline class, so that
        `diffusers.DiffusionPipeline.from_pretrained` builds diffusers' pipeline around our components."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = self.diffusers_class_name
        tmp = index_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, index_path)

    # -- memory switches (diffusers' pipeline-level names) --------------------------------------------------------

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) in overlapping spatial tiles, blended: memory bounded by the tile size."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def enable_vae_slicing(self) -> None:
        """Decode one batch element at a time."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    # -- shared helpers ----------------------------------------------------------------------------------------------

    def _sampler(self, num_inference_steps: int, *, mu: float | None = None) -> samplers.SamplerSpec:
        config = dict(self.scheduler.config, _class_name=type(self.scheduler).__name__)
        return samplers.from_diffusers_config(config, num_inference_steps, mu=mu)

    def _sample(self, model_fn: Callable, latents: torch.Tensor, spec: samplers.SamplerSpec, *,
                guidance_scale: GuidanceScale, callback_on_step_end: Callable | None, tensor_inputs, state: dict,
                solver: str | None = None, **runtime: Any) -> torch.Tensor:
        """dit.sampling.denoise with a progress bar and diffusers' callback_on_step_end; NonFiniteLatentsError as
        soon as a step leaves NaN or inf in the latents."""
        steps = len(spec.schedule)
        state["timesteps"] = spec.schedule.timesteps.to(latents.device)
        with self.progress_bar(total=steps) as progress:
            callback = self._step_callback(callback_on_step_end, list(tensor_inputs), state, progress, steps)
            return denoise(model_fn, latents, spec, guidance_scale=guidance_scale, solver=solver, callback=callback,
                           **runtime)

    def _step_callback(self, callback_on_step_end: Callable | None, tensor_inputs: list[str], state: dict,
                       progress, total: int) -> Callable:
        """Our solvers' callback(i, x, x0) -> diffusers' callback_on_step_end(pipe, i, t, kwargs) and a progress bar.

        Every pipeline's steps pass through here, so this is where non-finite latents are caught: once NaN or
        inf is in the latents every later step and the decoded frames are garbage (an all-black video), so the
        run stops at that step instead of writing it as a success. The check is one reduction per step.
        """

        def on_step(i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor | None:
            progress.update()
            if not torch.isfinite(x).all():
                raise NonFiniteLatentsError(i + 1, total)
            if callback_on_step_end is None:
                return None
            state["latents"] = x
            outputs = callback_on_step_end(self, i, state["timesteps"][i], {k: state[k] for k in tensor_inputs})
            for key in ("prompt_embeds", "negative_prompt_embeds"):
                if key in outputs:
                    state[key] = outputs[key]
            return outputs.get("latents")

        return on_step



def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_sizes(height: int, width: int, num_frames: int, spatial_multiple: int, temporal: int) -> None:
    """Pixel sizes must divide by VAE x patch; frame counts must be 1 + kn (the causal VAE's first frame)."""
    for name, value in (("height", height), ("width", width), ("num_frames", num_frames)):
        _check_positive_int(name, value)
    for name, value in (("height", height), ("width", width)):
        if value % spatial_multiple:
            lo = max(spatial_multiple, value // spatial_multiple * spatial_multiple)
            raise ValueError(f"{name} {value} must be divisible by {spatial_multiple}; "
                             f"nearest valid: {lo} or {lo + spatial_multiple}")
    if (num_frames - 1) % temporal:
        lo = (num_frames - 1) // temporal * temporal + 1
        raise ValueError(f"num_frames {num_frames} must be 1 + {temporal}n for this VAE; "
                         f"nearest valid: {lo} or {lo + temporal}")

