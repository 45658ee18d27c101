"""Diffusers-compatible pipelines on our transformers, VAE and samplers.

`DiTPipeline.from_pretrained(folder)` reads a diffusers pipeline folder (model_index.json) and returns the
pipeline for its family with our transformer (`dit.load_transformer`), our VAE for video (`vae3d.load_vae`),
the folder's text encoders and tokenizers (transformers, local files only) and our samplers driven by the
folder's scheduler config. Same seed and settings as the diffusers pipeline give the same result.
Folders we save name diffusers' pipeline class, so `diffusers.DiffusionPipeline.from_pretrained` loads them
(with our modules as components).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import CogView3PlusPipeline, DiffusionPipeline, StableDiffusion3Pipeline
from diffusers.utils import BaseOutput
from diffusers.video_processor import VideoProcessor

import samplers
from dit.sampling import GuidanceScale, denoise
from dit.convert import (LEGACY_CLASSES, TRANSFORMER_CLASSES, library_load, load_transformer, read_folder_json, resolve,
                         safetensors_files)
from dit.text import ENCODER_CLASSES, ENCODER_WEIGHTS, TOKENIZER_CLASSES, load_encoder_folder, load_tokenizer_folder
from samplers.from_diffusers import SCHEDULER_CLASSES

logger = logging.getLogger(__name__)

RELAY_UPSAMPLE = ("latent-nearest", "latent-bilinear", "pixel")

PIPELINE_FAMILIES: dict[str, str] = {
    "CogVideoXPipeline": "dit.pipeline:CogVideoXDiTPipeline",
    "StableDiffusion3Pipeline": "dit.pipeline:SD3DiTPipeline",
    "CogView3PlusPipeline": "dit.pipeline:CogView3PlusDiTPipeline",
    "WanPipeline": "dit.pipeline_wan:WanDiTPipeline",
    "WanImageToVideoPipeline": "dit.pipeline_wan_i2v:WanImageToVideoDiTPipeline",
}


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


def _read_index(path: str | os.PathLike) -> dict:
    return read_folder_json(path, "model_index.json", what="a diffusers pipeline folder",
                            optional={"_class_name": str})


# What each model_index.json entry may name, as (library, class). Nothing outside this list is imported or
# loaded: a library name is a module path, so importing it would run any `<library>.py` found on sys.path (the
# model folder itself when `python -m dit` runs from its parent). Our saved folders name our modules for the
# transformer and video VAE (diffusers' own loader imports those); diffusers' folders name diffusers classes.
_TRANSFORMER_ENTRIES = frozenset({("diffusers", name) for name in (*TRANSFORMER_CLASSES, *LEGACY_CLASSES)}
                                 | {tuple(q.split(":")) for q in TRANSFORMER_CLASSES.values()})
_ENCODER_ENTRIES = frozenset(("transformers", name) for name in ENCODER_CLASSES)
_TOKENIZER_ENTRIES = frozenset(("transformers", name) for name in TOKENIZER_CLASSES)
COMPONENT_CLASSES: dict[str, frozenset[tuple[str, str]]] = {
    "transformer": _TRANSFORMER_ENTRIES,
    "transformer_2": _TRANSFORMER_ENTRIES,  # Wan 2.2 A14B's low-noise expert
    "relay_transformer": _TRANSFORMER_ENTRIES,
    "vae": frozenset({("diffusers", "AutoencoderKLCogVideoX"), ("vae3d.model", "CausalVAE3D"),
                      ("vae3d", "CausalVAE3D"), ("diffusers", "AutoencoderKL"),
                      ("diffusers", "AutoencoderKLWan")}),
    **{f"text_encoder{s}": _ENCODER_ENTRIES for s in ("", "_2", "_3")},
    **{f"tokenizer{s}": _TOKENIZER_ENTRIES for s in ("", "_2", "_3")},
    "scheduler": frozenset(("diffusers", name) for name in SCHEDULER_CLASSES),
    # Wan 2.1 I2V's CLIP vision model and its preprocessing (transformers 5's CLIPImageProcessor is the torchvision
    # backend, and falls back to CLIPImageProcessorPil where torchvision is not installed)
    "image_encoder": frozenset(("transformers", name) for name in ("CLIPVisionModel", "CLIPVisionModelWithProjection")),
    "image_processor": frozenset(("transformers", name) for name in ("CLIPImageProcessor", "CLIPImageProcessorPil")),
}
_VIDEO_VAES = ("AutoencoderKLCogVideoX", "CausalVAE3D")


def _check_index(folder: Path, index: dict) -> dict[str, tuple[str | None, str | None]]:
    """Every component entry of model_index.json checked against COMPONENT_CLASSES before anything is imported
    or loaded; returns them as {role: (library, class)} ([null, null] entries: absent optional components)."""
    file = folder / "model_index.json"
    entries = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list):  # metadata and plain settings: nothing to load
            continue
        if len(spec) != 2 or not all(v is None or isinstance(v, str) for v in spec) or (spec[0] is None) != (
                spec[1] is None):
            raise ValueError(f"{str(file)!r}: entry {name!r} is {spec!r}; expected [library, class] or [null, null]")
        library, class_name = spec
        accepted = COMPONENT_CLASSES.get(name)
        if library is not None and (accepted is None or (library, class_name) not in accepted):
            what = (f"accepted for {name!r}: {', '.join(sorted(f'{lib}.{cls}' for lib, cls in accepted))}"
                    if accepted is not None else f"accepted entries: {', '.join(COMPONENT_CLASSES)}")
            raise ValueError(f"{str(folder)!r}: model_index.json entry {name!r} names class {class_name!r} of "
                             f"library {library!r}, which is not loaded (loading it could run code); {what}")
        entries[name] = (library, class_name)
    return entries


def _settings(index: dict, target: type) -> dict[str, Any]:
    """Plain (non-component) entries of model_index.json that the pipeline's constructor takes, such as Wan 2.2's
    boundary_ratio and expand_timesteps; other plain entries are diffusers' own bookkeeping."""
    params = inspect.signature(target.__init__).parameters
    return {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list) and k in params}


def _check_roles(folder: Path, target: type, entries: dict) -> None:
    """The pipeline's required components are all named in model_index.json (checked before any load)."""
    params = inspect.signature(target.__init__).parameters
    required = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [n for n in required if n not in entries]
    if missing:
        raise ValueError(f"{str(folder / 'model_index.json')!r} has no entry for {missing} that {target.__name__} "
                         f"needs; it names {sorted(entries)}")


def _load_component(folder: Path, name: str, library: str | None, class_name: str | None,
                    torch_dtype: torch.dtype | None) -> Any:
    """One component of a pipeline folder, by its role (entries checked by _check_index first); our own modules
    for the transformer and video VAE, safetensors only everywhere."""
    if library is None:
        return None
    sub = folder / name
    if name in ("transformer", "transformer_2", "relay_transformer"):
        return load_transformer(sub, torch_dtype=torch_dtype)
    if name == "vae" and class_name in _VIDEO_VAES:
        from vae3d import load_vae

        return load_vae(sub, torch_dtype=torch_dtype)
    if name == "scheduler":
        import diffusers

        config = read_folder_json(sub, "scheduler_config.json", what=f"a {class_name} scheduler config")
        scheduler_cls = getattr(diffusers, class_name)
        return library_load(sub, f"a {class_name} scheduler", lambda: scheduler_cls.from_config(config))
    if name.startswith("tokenizer"):
        import transformers

        return load_tokenizer_folder(sub, getattr(transformers, class_name))
    if name.startswith("text_encoder"):
        return load_encoder_folder(sub, ENCODER_CLASSES[class_name], torch_dtype)
    if name in ("image_encoder", "image_processor"):  # transformers' CLIP vision model (safetensors) / its config
        import transformers

        cls = getattr(transformers, class_name)
        if name == "image_processor":
            return library_load(sub, f"a {class_name}", lambda: cls.from_pretrained(sub, local_files_only=True))
        safetensors_files(sub, *ENCODER_WEIGHTS)
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        return library_load(sub, f"a {class_name} image encoder", lambda: cls.from_pretrained(
            sub, local_files_only=True, use_safetensors=True, **kwargs))
    import diffusers  # the image VAE (AutoencoderKL): diffusers' own, from safetensors only

    safetensors_files(sub)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return library_load(sub, f"a {class_name}", lambda: getattr(diffusers, class_name).from_pretrained(
        sub, local_files_only=True, use_safetensors=True, **kwargs))


def _family(folder: Path, index: dict) -> type:
    """The pipeline class PIPELINE_FAMILIES names for model_index.json's `_class_name`."""
    family = index.get("_class_name")
    if family not in PIPELINE_FAMILIES:
        raise ValueError(f"{str(folder)!r}: unsupported pipeline {family!r}; accepted: {', '.join(PIPELINE_FAMILIES)}")
    return resolve(PIPELINE_FAMILIES[family])


def pipeline_class(folder: str | os.PathLike) -> type["DiTPipeline"]:
    """The pipeline class for a folder, from model_index.json alone: every entry is checked against the allow-list
    first, nothing is imported from the folder and no weights are read."""
    folder = Path(folder)
    index = _read_index(folder)
    _check_index(folder, index)
    return _family(folder, index)


def video_pipeline_class(folder: str | os.PathLike) -> type["DiTPipeline"]:
    """pipeline_class for `dit generate`: a video family (one with the `check_folder_request` hook), else a
    one-line error naming what the folder holds and the families accepted."""
    target = pipeline_class(folder)
    if not hasattr(target, "check_folder_request"):
        video = [name for name, q in PIPELINE_FAMILIES.items() if hasattr(resolve(q), "check_folder_request")]
        raise ValueError(f"{str(folder)!r} holds a {target.diffusers_class_name}; `dit generate` takes video "
                         f"pipeline folders ({', '.join(video)})")
    return target


def _require_family(folder: Path, target: type) -> None:
    """The folder holds `target`'s family (a family's check_folder_request called on another family's folder)."""
    found = video_pipeline_class(folder)
    if found is not target:
        raise ValueError(f"{str(folder)!r} holds a {found.diffusers_class_name}; {target.__name__} takes "
                         f"{target.diffusers_class_name} folders")


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


class _ImagePipelineMixin:
    """What our image pipelines share: request checks before any model runs, and decoding to images."""

    def _check_image_request(self, prompt, height: int, width: int, num_inference_steps: int,
                             num_images_per_prompt: int, guidance_scale: float, output_type: str) -> None:
        if prompt is None or (isinstance(prompt, list) and not prompt):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        _check_positive_int("num_inference_steps", num_inference_steps)
        _check_positive_int("num_images_per_prompt", num_images_per_prompt)
        _check_sizes(height, width, 1, self.vae_scale_factor * self.transformer.config.patch_size, 1)
        samplers.check_guidance_scale(guidance_scale)
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"output_type {output_type!r} is not one of 'np', 'pil', 'pt', 'latent'")

    def _finish_images(self, latents: torch.Tensor, output_type: str, return_dict: bool, *, shift: bool):
        """Latents (B, C, h, w) -> images: undo the VAE's scaling (and shift, where the family uses it: SD3 does,
        CogView3-Plus does not), decode, post-process."""
        if output_type == "latent":
            image = latents
        else:
            latents = latents / self.vae.config.scaling_factor + (self.vae.config.shift_factor if shift else 0.0)
            image = self.image_processor.postprocess(self.vae.decode(latents, return_dict=False)[0],
                                                     output_type=output_type)
        self.maybe_free_model_hooks()
        return DiTPipelineOutput(images=image) if return_dict else (image,)


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


class CogVideoXDiTPipeline(DiTPipeline):
    """Text-to-video with CogVideoX (1.0 2B/5B, 1.5): the same call and the same frames as CogVideoXPipeline.

    relay=k adds a relay super-resolution stage (CogView3; samplers.relay): the base result at H x W is upsampled
    to kH x kW (in latent space, nearest or bilinear, or in pixel space with a VAE re-encode), then `relay_steps`
    steps run from training step T_r = relay_start with block noise of block size k. The stage uses the folder's
    `relay_transformer` if it has one (trained with the relay loss), else the base transformer.
    """

    diffusers_class_name = "CogVideoXPipeline"
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    supports_relay = True
    generation_defaults = {"num_inference_steps": 50, "guidance_scale": 6.0, "fps": 8}  # sizes: the transformer's
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    _optional_components = ["relay_transformer"]

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler, relay_transformer=None):
        super().__init__()
        # relay_transformer: an optional super-resolution stage trained with the relay loss (ours; diffusers'
        # CogVideoXPipeline ignores it when it loads our folder).
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=scheduler, relay_transformer=relay_transformer)
        cfg = self.vae.config
        self.vae_scale_factor_spatial = 2 ** (len(cfg.block_out_channels) - 1)
        self.vae_scale_factor_temporal = cfg.temporal_compression_ratio
        self.vae_scaling_factor_image = cfg.scaling_factor
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # -- inputs ------------------------------------------------------------------------------------------------------

    def default_size(self) -> tuple[int, int, int]:
        """(height, width, frames) the transformer was configured for."""
        cfg = self.transformer.config
        return cfg.sample_height * self.vae_scale_factor_spatial, cfg.sample_width * self.vae_scale_factor_spatial, \
            cfg.sample_frames

    def encode_prompt(self, prompt: str | list[str], *, max_sequence_length: int = 226,
                      device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """T5 embeddings (B, L, D), padded to max_sequence_length as CogVideoX was trained; words past it are
        dropped with a warning naming them (as diffusers' pipelines warn)."""
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.tokenizer(prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        self._warn_truncated(prompt, ids, max_sequence_length)
        embeds = self.text_encoder(ids.to(device or self._execution_device))[0]
        return embeds.to(dtype=dtype or self.text_encoder.dtype, device=device or self._execution_device)

    def _warn_truncated(self, prompt: list[str], ids: torch.Tensor, max_sequence_length: int) -> None:
        """logger.warning naming the text the tokenizer cut off, like diffusers' _get_t5_prompt_embeds."""
        full = self.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] <= ids.shape[-1]:  # the longest prompt fits: nothing was cut
            return
        # The last kept token is the appended </s>; what was removed is the text after max_length - 1 tokens.
        removed = self.tokenizer.batch_decode(full[:, max_sequence_length - 1:-1], skip_special_tokens=True)
        logger.warning("The following part of your input was truncated because `max_sequence_length` is set to "
                       "%d tokens: %s", max_sequence_length, removed)

    def check_inputs(self, prompt, negative_prompt, height: int, width: int, num_frames: int,
                     num_inference_steps: int, guidance_scale: float, max_sequence_length: int = 226) -> None:
        """Every user input checked before any model runs; each error names the value and what is accepted."""
        if prompt is None or (not isinstance(prompt, str) and not (
                isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            n = 1 if isinstance(prompt, str) else len(prompt)
            if not (isinstance(negative_prompt, list) and len(negative_prompt) == n):
                raise ValueError(f"negative_prompt must be a string or a list of {n} strings, got {negative_prompt!r}")
        _check_positive_int("num_inference_steps", num_inference_steps)
        _check_positive_int("max_sequence_length", max_sequence_length)
        _check_sizes(height, width, num_frames, self.vae_scale_factor_spatial * self.transformer.config.patch_size,
                     self.vae_scale_factor_temporal)
        samplers.check_guidance_scale(guidance_scale)

    def check_request(self, prompt, negative_prompt, height: int, width: int, num_frames: int,
                      num_inference_steps: int, guidance_scale: float) -> None:
        """The video families' common request check (`dit generate` calls it after loading): check_inputs."""
        self.check_inputs(prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale)

    @staticmethod
    def memory_shape(folder: str | os.PathLike):
        """What dit.estimate needs from the folder's configs (dit.estimate.cogvideox_shape)."""
        from dit.estimate import cogvideox_shape

        return cogvideox_shape(Path(folder))

    @staticmethod
    def check_folder_request(folder: str | os.PathLike, height: int | None, width: int | None,
                             num_frames: int | None) -> tuple[int, int, int]:
        """Fill the defaults and check sizes from the folder's config files alone, before loading any weights."""
        folder = Path(folder)
        _require_family(folder, CogVideoXDiTPipeline)
        t = read_folder_json(folder / "transformer", what="a CogVideoX transformer config",
                             required={"sample_height": int, "sample_width": int, "sample_frames": int,
                                       "patch_size": int})
        v = read_folder_json(folder / "vae", what="a CogVideoX VAE config",
                             required={"block_out_channels": tuple[int, ...]},
                             optional={"temporal_compression_ratio": int | float})
        temporal = v.get("temporal_compression_ratio", 4)
        for file, key, value in ((folder / "transformer" / "config.json", k, t[k]) for k in (
                "sample_height", "sample_width", "sample_frames", "patch_size")):
            if value < 1:
                raise ValueError(f"{str(file)!r}: {key}={value!r} must be a positive integer")
        if not v["block_out_channels"] or temporal < 1 or temporal != int(temporal):
            raise ValueError(f"{str(folder / 'vae' / 'config.json')!r}: block_out_channels={v['block_out_channels']!r}"
                             f" and temporal_compression_ratio={temporal!r} must be a non-empty list and a positive "
                             "integer")
        spatial = 2 ** (len(v["block_out_channels"]) - 1)
        height = t["sample_height"] * spatial if height is None else height
        width = t["sample_width"] * spatial if width is None else width
        num_frames = t["sample_frames"] if num_frames is None else num_frames
        _check_sizes(height, width, num_frames, spatial * t["patch_size"], int(temporal))
        return height, width, num_frames

    def _relay_upsample(self, latents: torch.Tensor, factor: int, mode: str) -> torch.Tensor:
        """The relay stage's z_L: the base latents (B, F, C, H, W) upsampled k times in space."""
        if mode != "pixel":
            return samplers.upsample(latents, factor, mode=mode.removeprefix("latent-")).to(latents.dtype)
        # CogView3's choice: decode, upsample the frames bilinearly, encode again (the VAE's posterior mode).
        video = self.vae.decode(latents.permute(0, 2, 1, 3, 4) / self.vae_scaling_factor_image).sample  # (B, C, F, H, W)
        video = samplers.upsample(video, factor, mode="bilinear").clamp(-1, 1)
        z = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode() * self.vae_scaling_factor_image
        return z.permute(0, 2, 1, 3, 4).to(latents.dtype)  # (B, F, C, kH, kW)

    # -- the call ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int | None = None,
        solver: str | None = None,
        relay: int | None = None,
        relay_steps: int = 10,
        relay_start: int = 500,
        relay_upsample: str = "latent-nearest",
        relay_noise_alpha: float = 0.15,
        relay_eta: float = 0.0,
    ) -> DiTPipelineOutput | tuple:
        """Generate videos. `solver` overrides the scheduler's solver (e.g. "dpmpp_2m"); `relay=k` adds the relay
        super-resolution stage described in the class docstring."""
        height, width, num_frames, max_sequence_length = self._call_defaults(height, width, num_frames,
                                                                            max_sequence_length)
        self.check_inputs(prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                          max_sequence_length)
        self._check_call(num_videos_per_prompt, output_type, callback_on_step_end_tensor_inputs, relay, relay_steps,
                         relay_upsample)
        spec = self._sampler(num_inference_steps)
        # Relay schedule errors (T_r outside the schedule, ...) come before any model runs.
        stage_spec = self._relay_spec(spec, relay, relay_start, relay_steps, relay_noise_alpha) if relay else None
        do_cfg = guidance_scale > 1.0
        state = self._encode_state(prompt, negative_prompt, do_cfg, max_sequence_length)
        latents, extra = self._initial_latents(state["prompt_embeds"], num_frames, height, width, generator, latents)

        def run(transformer, x: torch.Tensor, stage: samplers.SamplerSpec, steps: int, **runtime) -> torch.Tensor:
            scale = (samplers.cogvideox_dynamic_scale(guidance_scale, steps) if use_dynamic_cfg and do_cfg
                     else guidance_scale)
            return self._sample(self._model_fn(transformer, state, do_cfg, attention_kwargs), x, stage,
                                guidance_scale=scale, callback_on_step_end=callback_on_step_end,
                                tensor_inputs=callback_on_step_end_tensor_inputs, state=state, generator=generator,
                                **runtime)

        latents = run(self.transformer, latents, spec, num_inference_steps, solver=solver, eta=eta)
        if relay is not None:
            z_low = self._relay_upsample(latents[:, extra:], relay, relay_upsample)  # (B, F', C, kH', kW')
            stage = getattr(self, "relay_transformer", None) or self.transformer
            latents, extra = run(stage, z_low, stage_spec, relay_steps, eta=relay_eta), 0
        return self._finish_video(latents[:, extra:], output_type, return_dict)

    def _call_defaults(self, height: int | None, width: int | None, num_frames: int | None,
                       max_sequence_length: int | None) -> tuple[int, int, int, int]:
        """The model's defaults where the call gave None (only None: 0 is a size like any other, refused later)."""
        default_height, default_width, default_frames = self.default_size()
        max_text = self.transformer.config.max_text_seq_length  # 226 for released CogVideoX
        return (default_height if height is None else height, default_width if width is None else width,
                default_frames if num_frames is None else num_frames,
                max_text if max_sequence_length is None else max_sequence_length)

    def _check_call(self, num_videos_per_prompt: int, output_type: str, tensor_inputs, relay: int | None,
                    relay_steps: int, relay_upsample: str) -> None:
        if num_videos_per_prompt != 1:
            raise ValueError(f"num_videos_per_prompt must be 1 (as in CogVideoXPipeline), got {num_videos_per_prompt}")
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"output_type {output_type!r} is not one of 'np', 'pil', 'pt', 'latent'")
        bad = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback tensor inputs {sorted(bad)} are not among {self._callback_tensor_inputs}")
        if relay is not None:
            _check_positive_int("relay", relay)
            _check_positive_int("relay_steps", relay_steps)
            if relay_upsample not in RELAY_UPSAMPLE:
                raise ValueError(f"relay_upsample {relay_upsample!r} is not one of {', '.join(RELAY_UPSAMPLE)}")

    def _relay_spec(self, spec: samplers.SamplerSpec, relay: int, start: int, steps: int,
                    noise_alpha: float) -> samplers.SamplerSpec:
        """The relay stage on the folder's training path, from training step T_r = start, block noise of size k."""
        path = samplers.train_path_from_config(dict(self.scheduler.config, _class_name=type(self.scheduler).__name__))
        return samplers.relay_spec(path, start, steps, spec.prediction, block_size=relay, noise_alpha=noise_alpha)

    def _encode_state(self, prompt, negative_prompt, do_cfg: bool, max_sequence_length: int) -> dict:
        """Prompt embeddings (and the negative ones for guidance): the state callbacks read and may replace."""
        device = self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        state = {"prompt_embeds": self.encode_prompt(prompts, max_sequence_length=max_sequence_length, device=device),
                 "negative_prompt_embeds": None}
        if do_cfg:
            neg = negative_prompt or ""
            neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            state["negative_prompt_embeds"] = self.encode_prompt(neg, max_sequence_length=max_sequence_length,
                                                                 device=device)
        return state

    def _initial_latents(self, embeds: torch.Tensor, num_frames: int, height: int, width: int, generator,
                         latents: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Noise (B, F', C, H', W') and the padding frames it has: CogVideoX 1.5 pads the latent frames to a
        multiple of patch_size_t (dropped again before decoding)."""
        cfg, k = self.transformer.config, self.vae_scale_factor_temporal
        latent_frames = (num_frames - 1) // k + 1
        extra = -latent_frames % cfg.patch_size_t if cfg.patch_size_t is not None else 0
        shape = (embeds.shape[0], latent_frames + extra, cfg.in_channels, height // self.vae_scale_factor_spatial,
                 width // self.vae_scale_factor_spatial)
        if latents is None:
            return samplers.solvers.randn(shape, generator=generator, device=embeds.device, dtype=embeds.dtype), extra
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
        return latents.to(device=embeds.device, dtype=embeds.dtype), extra

    @staticmethod
    def _model_fn(transformer, state: dict, do_cfg: bool, attention_kwargs: dict | None) -> Callable:
        """The transformer as model_fn(x, t): conditioning [uncond, cond] under guidance; positions are the
        model's own (it computes the same RoPE tables diffusers' pipeline passes)."""
        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            context = (torch.cat([state["negative_prompt_embeds"], state["prompt_embeds"]]) if do_cfg
                       else state["prompt_embeds"])
            return transformer(hidden_states=x, encoder_hidden_states=context, timestep=t.to(x.device).expand(
                x.shape[0]), attention_kwargs=attention_kwargs, return_dict=False)[0].float()

        return model_fn

    def _finish_video(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        if output_type == "latent":
            video = latents
        else:
            latents = latents.permute(0, 2, 1, 3, 4) / self.vae_scaling_factor_image  # (B, F, C, H, W) -> (B, C, F, H, W)
            video = self.video_processor.postprocess_video(video=self.vae.decode(latents).sample,
                                                           output_type=output_type)
        self.maybe_free_model_hooks()
        return DiTPipelineOutput(frames=video) if return_dict else (video,)


class SD3DiTPipeline(_ImagePipelineMixin, DiTPipeline, StableDiffusion3Pipeline):
    """Text-to-image with Stable Diffusion 3 / 3.5: diffusers' prompt encoding (three text encoders), our
    transformer and flow-matching sampler; the same images as StableDiffusion3Pipeline."""

    diffusers_class_name = "StableDiffusion3Pipeline"

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = 256,
        mu: float | None = None,
        solver: str | None = None,
    ) -> DiTPipelineOutput | tuple:
        """Generate images; `solver` overrides flow-matching Euler (e.g. "heun")."""
        default = self.default_sample_size * self.vae_scale_factor  # only None means default; 0 is refused
        height = default if height is None else height
        width = default if width is None else width
        self._check_image_request(prompt, height, width, num_inference_steps, num_images_per_prompt,
                                  guidance_scale, output_type)
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
                          max_sequence_length=max_sequence_length)
        self._guidance_scale, self._clip_skip, self._interrupt = guidance_scale, None, False
        self._joint_attention_kwargs = joint_attention_kwargs
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        pe, npe, ppe, nppe = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, do_classifier_free_guidance=do_cfg,
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length)
        if do_cfg:
            pe, ppe = torch.cat([npe, pe]), torch.cat([nppe, ppe])
        batch = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        latents = self.prepare_latents(batch, self.transformer.config.in_channels, height, width, pe.dtype, device,
                                       generator, latents)  # (B, C, H/8, W/8)
        spec = self._sampler(num_inference_steps, mu=self._dynamic_mu(latents) if mu is None else mu)
        state = {"prompt_embeds": pe}

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            timestep = t.to(device=device, dtype=torch.float32).expand(x.shape[0])
            return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=state["prompt_embeds"],
                                    pooled_projections=ppe, joint_attention_kwargs=joint_attention_kwargs,
                                    return_dict=False)[0]

        latents = self._sample(model_fn, latents, spec, guidance_scale=guidance_scale,
                               callback_on_step_end=callback_on_step_end,
                               tensor_inputs=callback_on_step_end_tensor_inputs, state=state, solver=solver)
        return self._finish_images(latents, output_type, return_dict, shift=True)

    def _dynamic_mu(self, latents: torch.Tensor) -> float | None:
        """The flow shift's mu for this image size when the scheduler shifts dynamically (as diffusers' SD3
        pipeline computes it from the token count); None otherwise."""
        cfg, p = self.scheduler.config, self.transformer.config.patch_size
        if not cfg.get("use_dynamic_shifting", False):
            return None
        return samplers.dynamic_shift_mu((latents.shape[2] // p) * (latents.shape[3] // p),
                                         cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))


class CogView3PlusDiTPipeline(_ImagePipelineMixin, DiTPipeline, CogView3PlusPipeline):
    """Text-to-image with CogView3-Plus: diffusers' T5 prompt encoding, our transformer and samplers; the same
    images as CogView3PlusPipeline."""

    diffusers_class_name = "CogView3PlusPipeline"

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = 224,
        solver: str | None = None,
    ) -> DiTPipelineOutput | tuple:
        """Generate images (CogVideoX-style schedulers: DDIM or DPM; `solver` overrides)."""
        default = self.transformer.config.sample_size * self.vae_scale_factor  # only None means default; 0 is refused
        height = default if height is None else height
        width = default if width is None else width
        self._check_image_request(prompt, height, width, num_inference_steps, num_images_per_prompt,
                                  guidance_scale, output_type)
        self.check_inputs(prompt, height, width, negative_prompt, list(callback_on_step_end_tensor_inputs))
        self._guidance_scale, self._interrupt = guidance_scale, False
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        pe, npe = self.encode_prompt(prompt, negative_prompt, do_cfg, num_images_per_prompt=num_images_per_prompt,
                                     max_sequence_length=max_sequence_length, device=device)
        if do_cfg:
            pe = torch.cat([npe, pe])
        batch = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        spec = self._sampler(num_inference_steps)
        latents = self.prepare_latents(batch, self.transformer.config.in_channels, height, width, pe.dtype, device,
                                       generator, latents)  # (B, C, H/8, W/8)
        sizes = _size_conditioning(pe, original_size or (height, width), (height, width), crops_coords_top_left)
        state = {"prompt_embeds": pe}

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.transformer(hidden_states=x, encoder_hidden_states=state["prompt_embeds"],
                                    timestep=t.to(device).expand(x.shape[0]), return_dict=False,
                                    **sizes)[0].float()

        latents = self._sample(model_fn, latents, spec, guidance_scale=guidance_scale,
                               callback_on_step_end=callback_on_step_end,
                               tensor_inputs=callback_on_step_end_tensor_inputs, state=state, solver=solver, eta=eta,
                               generator=generator)
        return self._finish_images(latents, output_type, return_dict, shift=False)


def _size_conditioning(embeds: torch.Tensor, original: tuple[int, int], target: tuple[int, int],
                       crop: tuple[int, int]) -> dict[str, torch.Tensor]:
    """CogView3-Plus's SDXL-style micro-conditioning: each size as a (rows, 2) tensor, one row per model input."""
    rows = embeds.shape[0]
    return {name: torch.tensor([value], dtype=embeds.dtype, device=embeds.device).repeat(rows, 1)
            for name, value in (("original_size", original), ("target_size", target), ("crop_coords", crop))}
