"""DiTPipeline, the base of our pipelines: family dispatch on load, our samplers for the denoising loop, the
memory switches, and the request checks all families share."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

import samplers
from dit.pipeline.loading import (_check_index, _check_roles, _family, _load_component, _read_index, _settings,
                                  check_load_options, check_torch_dtype, component_dtype, component_variants,
                                  init_parameters, resolve_pretrained)
from dit.cache import CacheConfig, caching, check_cache, merge_reports
from dit.pipeline.relay import RelayStage, relay_stage
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


# diffusers' pipeline-level LoRA API (LoraBaseMixin): families whose diffusers pipeline has a LoRA loader inherit it
# (CogVideoX, SD3, Wan); on the others these names are a clear AttributeError (DiTPipeline.__getattr__).
LORA_METHODS = frozenset({"load_lora_weights", "lora_state_dict", "save_lora_weights", "fuse_lora", "unfuse_lora",
                          "unload_lora_weights", "set_adapters", "delete_adapters", "get_active_adapters",
                          "get_list_adapters", "set_lora_device", "enable_lora", "disable_lora",
                          "load_lora_into_transformer", "enable_lora_hotswap"})


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
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *,
                        torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
                        device: str | torch.device | None = None, variant: str | None = None,
                        low_cpu_mem_usage: bool = True, cache_dir: str | os.PathLike | None = None,
                        revision: str | None = None, local_files_only: bool | None = None,
                        use_safetensors: bool | None = None,
                        dtype: torch.dtype | dict[str, torch.dtype] | None = None,
                        compile: bool | dict | None = None, **kwargs: Any) -> "DiTPipeline":
        """Load a diffusers pipeline folder into the pipeline for its family, as diffusers' from_pretrained does.

        - `pretrained_model_name_or_path`: a local folder, or a repository id ("THUDM/CogVideoX-2b") found in the
          local Hugging Face cache (HF_HUB_CACHE, or `cache_dir`; `revision` picks the snapshot). Nothing is ever
          downloaded, whatever `local_files_only` says: a repository missing from the cache is an error naming the
          command that downloads it.
        - `torch_dtype` (or `dtype`, diffusers 0.42's name for it): one dtype, or a dict by component name with
          "default" for the others (float32 where a dict has no "default"). None: diffusers' models (transformer,
          VAE) in float32, as diffusers loads them, and transformers' text encoders in their checkpoint's dtype,
          as transformers 5 loads them.
        - `variant` ("fp16", ...): the weights save_pretrained(variant=...) wrote, for each component that has them;
          the others load their plain weights (diffusers' rule). It is an error if no component has them.
        - `low_cpu_mem_usage`: accepted, True or False, with the same result either way: every component is
          always loaded the way diffusers' True loads (built on the meta device, then given the checkpoint's
          tensors: no random initialisation, no second copy of the weights).
        - `use_safetensors`: True or None; weights are safetensors only (pickles can run code), so False is refused.
        - Other keyword arguments are the pipeline's constructor arguments, as in diffusers: a component passed
          here (`vae=None` to encode prompts alone, or a module) is used instead of loading the folder's, and a
          setting (`boundary_ratio=...`) overrides model_index.json's.
        - `device`: where the loaded pipeline is moved (`pipe.to(device)`).
        - `compile`: True, or a dict of `dit.compile.CompileOptions` ({"mode": "max-autotune", ...}): regional
          torch.compile of every denoising transformer (`enable_compile`).
        """
        from dit.compile import compile_options

        compile = compile_options(compile)  # checked before anything loads
        torch_dtype = check_load_options(torch_dtype, dtype, low_cpu_mem_usage, use_safetensors, local_files_only)
        folder = resolve_pretrained(pretrained_model_name_or_path, cache_dir=cache_dir, revision=revision)
        index = _read_index(folder)
        entries = _check_index(folder, index)  # before any import or load: the folder names only what we load
        target = _family(folder, index)
        if not issubclass(target, cls):
            raise ValueError(f"{str(folder)!r} holds a {index['_class_name']}, which {cls.__name__} cannot load")
        target_params = init_parameters(target)
        unknown = sorted(set(kwargs) - set(target_params))
        if unknown:
            raise ValueError(f"unsupported from_pretrained arguments: {unknown}; accepted: torch_dtype, dtype, device, "
                             f"variant, low_cpu_mem_usage, cache_dir, revision, local_files_only, use_safetensors, and "
                             f"{target.__name__}'s components and settings: {', '.join(target_params)}")
        _check_roles(folder, target, entries, kwargs)
        check_torch_dtype(torch_dtype, list(entries))
        to_load = [name for name in entries if name not in kwargs]
        variants = component_variants(folder, to_load, variant)
        components = {name: _load_component(folder, name, *entries[name], component_dtype(torch_dtype, name),
                                            variants[name]) for name in to_load}
        pipe = target(**{**components, **_settings(index, target), **kwargs})
        if compile is not None:
            pipe.enable_compile(compile)
        return pipe.to(device) if device is not None else pipe

    def enable_compile(self, options: bool | dict | Any = True) -> None:
        """Regional torch.compile (`dit.compile.compile_blocks`) of every transformer that denoises, the relay
        stage's too: each block class compiled once at the first step, reused by all blocks and steps. Composes
        with `cache=`, context parallelism and offload; `options` as `from_pretrained(compile=...)`."""
        from dit.compile import compile_blocks

        models = [*self.denoisers(), getattr(self, "relay_transformer", None)]
        for model in {id(m): m for m in models if m is not None}.values():
            compile_blocks(model, options)

    def disable_compile(self) -> None:
        """Run every transformer eagerly again."""
        from dit.compile import uncompile_blocks

        for model in [*self.denoisers(), getattr(self, "relay_transformer", None)]:
            if model is not None:
                uncompile_blocks(model)

    def __getattr__(self, name: str) -> Any:
        """diffusers' LoRA methods on a family whose diffusers pipeline has no LoRA loader: an AttributeError that
        says so (hasattr stays False, as on diffusers' class)."""
        if name in LORA_METHODS:
            raise AttributeError(
                f"{type(self).__name__} has no {name}: diffusers' {self.diffusers_class_name} has no LoRA loader "
                "either (diffusers reads no LoRA format for this family). To train or apply an adapter, add it to "
                "pipe.transformer with peft (its modules have diffusers' names: attn1.to_q, ff.net.0.proj, ...)")
        return super().__getattr__(name)

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

    # -- the steps every call shares -------------------------------------------------------------------------------

    def _check_outputs(self, output_type: str, tensor_inputs=()) -> None:
        """diffusers' output types, and the step callback's tensor inputs among `_callback_tensor_inputs`."""
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"output_type {output_type!r} is not one of 'np', 'pil', 'pt', 'latent'")
        bad = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback tensor inputs {sorted(bad)} are not among {self._callback_tensor_inputs}")

    def _plan_stages(self, cache: CacheConfig | None, relay: int | None, relay_steps: int, relay_start: int,
                     relay_upsample: str, relay_noise_alpha: float, relay_eta: float) -> RelayStage | None:
        """A call's `cache=` checked and its relay stage planned (None without `relay`; dit.pipeline.relay), so
        that their errors come before any model runs."""
        check_cache(cache)
        return relay_stage(self.scheduler, relay, steps=relay_steps, start=relay_start, upsample=relay_upsample,
                           noise_alpha=relay_noise_alpha, eta=relay_eta)

    def _start_call(self, guidance_scale: float, **properties: Any) -> None:
        """What diffusers' pipelines keep for a call's callbacks and properties, set as it starts: guidance_scale,
        current_timestep (None), interrupt (False) and the family's own (`attention_kwargs=...`), each as
        `_<name>`."""
        properties.update(guidance_scale=guidance_scale, current_timestep=None, interrupt=False)
        for name, value in properties.items():
            setattr(self, f"_{name}", value)

    def _relay_model(self) -> torch.nn.Module:
        """The relay stage's transformer: the folder's `relay_transformer`, else the base one."""
        return self.transformer if getattr(self, "relay_transformer", None) is None else self.relay_transformer

    def _relay(self, plan: RelayStage | None, latents: torch.Tensor, run: Callable[..., torch.Tensor], *,
               to_pixels: Callable | None = None, from_pixels: Callable | None = None,
               **runtime: Any) -> torch.Tensor:
        """The relay stage on the base stage's result: the latents as they are without a plan; else z_L made from
        them (RelayStage.z_low, with the VAE's `to_pixels` / `from_pixels` for pixel upsampling) and the plan's
        steps run by `run(model, z_L, spec, factor, eta=..., **runtime)`, the family's stage (its `_sample` call
        for `model` at `factor` times the base size, as the base stage's run(..., 1, ...)), on `_relay_model()`."""
        if plan is None:
            return latents
        z_low = plan.z_low(latents, to_pixels=to_pixels, from_pixels=from_pixels)
        return run(self._relay_model(), z_low, plan.spec, plan.factor, eta=plan.eta, **runtime)

    # -- shared helpers ----------------------------------------------------------------------------------------------

    def _sampler(self, num_inference_steps: int, *, mu: float | None = None, sigmas=None,
                 timesteps=None) -> samplers.SamplerSpec:
        """The scheduler's sampler spec, for num_inference_steps or for a call's custom `sigmas` / `timesteps`
        (then their length; as diffusers' retrieve_timesteps, refused where the scheduler takes none)."""
        config = dict(self.scheduler.config, _class_name=type(self.scheduler).__name__)
        return samplers.from_diffusers_config(config, num_inference_steps, mu=mu, sigmas=sigmas, timesteps=timesteps)

    def _sample(self, model_fn: Callable, latents: torch.Tensor, spec: samplers.SamplerSpec, *,
                guidance_scale: GuidanceScale, callback_on_step_end: Callable | None, tensor_inputs, state: dict,
                solver: str | None = None, cache: CacheConfig | None = None,
                guide: Callable[[torch.Tensor], bool] | None = None,
                skip_layer: samplers.SkipLayerGuidance | None = None, **runtime: Any) -> torch.Tensor:
        """dit.sampling.denoise with a progress bar and diffusers' callback_on_step_end; NonFiniteLatentsError as
        soon as a step leaves NaN or inf in the latents. `cache` (dit.cache) skips transformer blocks on steps where
        they would change little; its report is kept for `pop_cache_reports`. A cache enabled on a transformer
        the diffusers way (`transformer.enable_cache(...)`) runs in the "cond_uncond" context, as in diffusers'
        pipelines. `guide` and `skip_layer`: dit.sampling.guided's.

        What diffusers' denoising loops keep on the pipeline is kept here too: `num_timesteps`, `current_timestep`
        (the timestep of the model call under way, None after the loop), and `interrupt`: once `pipe._interrupt`
        is True (set by a step callback, say), the steps left are skipped, as diffusers `continue`s its loop, and
        the latents are returned as they are (a later stage, such as a relay stage, runs no step either)."""
        steps = len(spec.schedule)
        self._num_timesteps = steps
        if getattr(self, "_interrupt", False):
            return latents
        state["timesteps"] = _diffusers_timesteps(spec.schedule.timesteps, latents.device)

        def model_step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self._current_timestep = _diffusers_timesteps(t, latents.device)
            return model_fn(x, t)

        with contextlib.ExitStack() as stack, self.progress_bar(total=steps) as progress:
            for model in self.denoisers():
                if hasattr(model, "cache_context"):
                    stack.enter_context(model.cache_context("cond_uncond"))
            caches = stack.enter_context(caching(self.denoisers(), cache, steps))
            callback = self._step_callback(callback_on_step_end, list(tensor_inputs), state, progress, steps)
            try:
                out = denoise(model_step, latents, spec, guidance_scale=guidance_scale, guide=guide,
                              skip_layer=skip_layer, solver=solver, callback=callback, **runtime)
            except _Interrupted as stop:
                out = stop.latents
            finally:
                self._current_timestep = None
        if caches:
            self._cache_reports = [*getattr(self, "_cache_reports", []), merge_reports(caches)]
        return out

    def pop_cache_reports(self) -> list[dict]:
        """The step caches' reports (dit.cache.StepCache.report) of the denoising runs since the last pop, one per
        run (a relay call has two)."""
        reports, self._cache_reports = getattr(self, "_cache_reports", []), []
        return reports

    def _step_callback(self, callback_on_step_end: Callable | None, tensor_inputs: list[str], state: dict,
                       progress, total: int) -> Callable:
        """Our solvers' callback(i, x, x0) -> diffusers' callback_on_step_end(pipe, i, t, kwargs) and a progress bar.

        `state` holds what the callback may read, under the names of the pipeline's `_callback_tensor_inputs`
        and with diffusers' meaning for each (prompt_embeds under guidance is the [negative; positive] batch the
        transformer sees, in the families whose diffusers pipeline concatenates them); the model functions read
        it at every step, so a tensor the callback returns under one of those names takes effect from the next
        step on, as in diffusers. Every pipeline's steps pass through here, so this is also where non-finite latents
        are caught: once NaN or inf is in the latents every later step and the decoded frames are garbage (an
        all-black video), so the run stops at that step instead of writing it as a success (one reduction per
        step); and where `pipe._interrupt` ends the loop (DiTPipeline._sample).
        """

        def on_step(i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor | None:
            progress.update()
            if not torch.isfinite(x).all():
                raise NonFiniteLatentsError(i + 1, total)
            if callback_on_step_end is not None:
                state["latents"] = x
                outputs = callback_on_step_end(self, i, state["timesteps"][i],
                                               {k: state[k] for k in tensor_inputs}) or {}
                for key in self._callback_tensor_inputs:
                    if key != "latents" and key in outputs:
                        state[key] = outputs[key]
                x = outputs.get("latents", x)
            if getattr(self, "_interrupt", False):
                raise _Interrupted(x)
            return x

        return on_step


class _Interrupted(Exception):
    """Raised by a step callback once `pipe._interrupt` is set; carries the latents the run returns."""

    def __init__(self, latents: torch.Tensor):
        super().__init__("interrupted")
        self.latents = latents


def _diffusers_timesteps(timesteps: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Timesteps as diffusers' schedulers hold them (what callbacks and `current_timestep` see): integers as they
    are, fractional ones (flow matching) in float32, on the latents' device."""
    return (timesteps.float() if timesteps.is_floating_point() else timesteps).to(device)


def _callback_tensor_inputs(callback_on_step_end: Any, tensor_inputs) -> list[str]:
    """The names a step callback reads: a diffusers PipelineCallback or MultiPipelineCallbacks names its own (its
    `tensor_inputs`, which replace the call's, as in diffusers' pipelines)."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        return list(callback_on_step_end.tensor_inputs)
    return list(tensor_inputs)


def _check_prompt_or_embeds(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> int:
    """A prompt (a string or a non-empty list of strings) or its `prompt_embeds` (B, L, D), not both; likewise
    the negative ones; returns the batch (prompts, or prompt_embeds' rows). As diffusers' check_inputs, with
    errors that name the values."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass prompt or prompt_embeds, not both")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if embeds is not None and not (torch.is_tensor(embeds) and embeds.ndim == 3):
            got = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
            raise ValueError(f"{name} must be a (batch, tokens, dim) tensor, got {got}")
    if prompt_embeds is not None and negative_prompt_embeds is not None \
            and prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                         f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
    if prompt_embeds is None and (prompt is None or (not isinstance(prompt, str) and not (
            isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)))):
        raise ValueError(f"prompt must be a string or a non-empty list of strings (or pass prompt_embeds), "
                         f"got {prompt!r}")
    batch = prompt_embeds.shape[0] if prompt_embeds is not None else 1 if isinstance(prompt, str) else len(prompt)
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        if not (isinstance(negative_prompt, list) and len(negative_prompt) == batch
                and all(isinstance(p, str) for p in negative_prompt)):
            raise ValueError(f"negative_prompt must be a string or a list of {batch} strings, got "
                             f"{negative_prompt!r}")
    return batch


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_sizes(height: int, width: int, num_frames: int, spatial_multiple: int, temporal: int, *,
                 diffusers: tuple[str, dict[str, int | None]] | None = None) -> None:
    """Pixel sizes must divide by VAE x patch; frame counts must be 1 + kn (the causal VAE's first frame).

    `diffusers`: (the diffusers pipeline's class name, what it silently returns for each refused value, by name:
    "height", "width", "num_frames"; a number, or a phrase; None where diffusers refuses the value too): the error
    then says so, and a diffusers user sees what the refusal replaces."""
    for name, value in (("height", height), ("width", width), ("num_frames", num_frames)):
        _check_positive_int(name, value)
    pipeline, instead = diffusers if diffusers is not None else ("", {})

    def what_diffusers_does(name: str) -> str:
        value = instead.get(name)
        if value is None:
            return ""
        made = value if isinstance(value, str) else f"{value} frames" if name == "num_frames" else f"{name} {value}"
        return f" (diffusers' {pipeline} silently returns {made})"

    for name, value in (("height", height), ("width", width)):
        if value % spatial_multiple:
            lo = max(spatial_multiple, value // spatial_multiple * spatial_multiple)
            raise ValueError(f"{name} {value} must be divisible by {spatial_multiple}; "
                             f"nearest valid: {lo} or {lo + spatial_multiple}{what_diffusers_does(name)}")
    if (num_frames - 1) % temporal:
        lo = (num_frames - 1) // temporal * temporal + 1
        raise ValueError(f"num_frames {num_frames} must be 1 + {temporal}n for this VAE; "
                         f"nearest valid: {lo} or {lo + temporal}{what_diffusers_does('num_frames')}")
