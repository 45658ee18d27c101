"""Class-conditional image generation with DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

diffusers calls its class-conditional pipeline `DiTPipeline`, the name of our pipelines' base class; ours for
those folders is ClassConditionalDiTPipeline: the same call (`class_labels`, guidance against the null class,
the learned variance dropped) and the same images as diffusers' DiTPipeline, on our transformer and samplers.
Folders it saves name diffusers' DiTPipeline and keep the class names (`id2label`) in model_index.json, as the
released DiT folders do.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

import samplers
from dit.cache import CacheConfig, check_cache
from dit.convert import read_folder_json
from dit.pipeline.base import DiTPipeline, DiTPipelineOutput, _callback_tensor_inputs, _check_positive_int
from dit.pipeline.image_family import ImageFamily


def label_ids(id2label: dict | None) -> dict[str, int]:
    """diffusers' DiTPipeline.labels: every comma-separated name of each class ("tench, Tinca tinca"), stripped,
    to the class id; sorted by name."""
    labels = {}
    for key, value in (id2label or {}).items():
        for name in str(value).split(","):
            labels[name.strip()] = int(key)
    return dict(sorted(labels.items()))


def check_id2label(id2label: Any, where: str) -> dict[str, str]:
    """An id2label mapping of integer ids (JSON keys are strings) to comma-separated class names."""
    if id2label is None:
        return {}
    if not isinstance(id2label, dict) or not all(
            isinstance(v, str) and str(k).lstrip("-").isdigit() for k, v in id2label.items()):
        raise ValueError(f"{where}: id2label must map class ids to names, e.g. {{\"0\": \"tench, Tinca tinca\"}}")
    return {str(k): v for k, v in id2label.items()}


def class_id(labels: dict[str, int], name: str, num_classes: int) -> int:
    """The id of a class name (exactly one of the names diffusers' get_label_ids takes), else a one-line
    ValueError with the closest names."""
    if name in labels:
        return labels[name]
    ids = f"give its id (--class N, 0 to {num_classes - 1})"
    if not labels:
        raise ValueError(f"class {name!r}: this DiT folder names no classes (model_index.json has no id2label); {ids}")
    lowered = {k.lower(): k for k in labels}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=5, cutoff=0.6)
    near = f"close matches: {', '.join(repr(lowered[c]) for c in close)}" if close else "no close match"
    raise ValueError(f"unknown class {name!r} ({near}); name a class of the folder's id2label, or {ids}")


class ClassConditionalDiTPipeline(ImageFamily, DiTPipeline):
    """Class-conditional DiT (ImageNet classes): diffusers' DiTPipeline folders, the same call and images."""

    diffusers_class_name = "DiTPipeline"
    model_cpu_offload_seq = "transformer->vae"
    fixed_size = True  # diffusers' DiTPipeline samples latents of the transformer's sample_size only
    generation_defaults = {"num_inference_steps": 50, "guidance_scale": 4.0}  # diffusers' call defaults
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer, vae, scheduler, id2label: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        id2label = check_id2label(id2label, "id2label")
        self.register_to_config(id2label=id2label or None)  # saved in model_index.json, as released folders have it
        self.labels = label_ids(id2label)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def num_classes(self) -> int:
        """Classes of the transformer's label table; id num_classes is the null class guidance runs against."""
        return self.transformer.config.num_embeds_ada_norm

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class names (as diffusers' DiTPipeline.labels lists them) -> class ids; an unknown name is a ValueError
        naming the closest ones."""
        names = [label] if isinstance(label, str) else list(label)
        return [class_id(self.labels, name, self.num_classes) for name in names]

    # -- dit generate ------------------------------------------------------------------------------------------------

    @classmethod
    def check_folder_prompt(cls, folder: str | os.PathLike, prompt: str | None, negative_prompt: str | None,
                            class_label: int | None) -> tuple[str, int]:
        """A request's class from the folder's files alone: a class name of model_index.json's id2label, or an id
        (`--class N`) in the transformer's label table. Returns (the class's name, its id)."""
        folder = Path(folder)
        if negative_prompt is not None:
            raise ValueError(f"a {cls.diffusers_class_name} folder takes no negative prompt: guidance steers away "
                             "from the null class; drop --negative-prompt")
        index = read_folder_json(folder, "model_index.json", what="a diffusers pipeline folder",
                                 optional={"id2label": dict | None})
        id2label = check_id2label(index.get("id2label"), str(folder / "model_index.json"))
        t = read_folder_json(folder / "transformer", what="a DiT transformer config",
                             optional={"num_embeds_ada_norm": int})
        n = t.get("num_embeds_ada_norm", 1000)
        if class_label is None:
            class_label = class_id(label_ids(id2label), prompt, n)
        elif prompt:
            raise ValueError(f"give the class by name ({prompt!r}) or by id (--class {class_label}), not both")
        if not 0 <= class_label < n:
            raise ValueError(f"class {class_label} is not in this DiT's label table: ids 0 to {n - 1}")
        name = id2label.get(str(class_label), f"class {class_label}").split(",")[0].strip()
        return prompt or name, class_label

    @staticmethod
    def request_kwargs(prompt: str, negative_prompt: str | None, height: int, width: int, num_frames: int,
                       class_label: int | None = None) -> dict[str, Any]:
        return {"class_labels": [class_label]}

    def check_request(self, prompt, negative_prompt, height: int, width: int, num_frames: int,
                      num_inference_steps: int, guidance_scale: float) -> None:
        size = self.transformer.config.sample_size * self.vae_scale_factor
        if num_frames != 1:
            raise ValueError(f"num_frames {num_frames}: a {self.diffusers_class_name} makes single images")
        if (height, width) != (size, size):
            raise ValueError(f"{height}x{width}: this DiT generates at {size}x{size} only")
        if negative_prompt is not None:
            raise ValueError("a DiT pipeline takes no negative prompt: guidance steers away from the null class")
        _check_positive_int("num_inference_steps", num_inference_steps)
        samplers.check_guidance_scale(guidance_scale)

    # -- the call ----------------------------------------------------------------------------------------------------

    def _check_call(self, class_labels, num_inference_steps: int, guidance_scale: float, output_type: str,
                    tensor_inputs) -> list[int]:
        """The call's inputs checked before any model runs; returns the class ids as a list."""
        items = class_labels
        if torch.is_tensor(items) and not items.is_floating_point():
            items = items.reshape(-1).tolist()
        elif isinstance(items, int):
            items = [items]
        if not (isinstance(items, (list, tuple)) and items and all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < self.num_classes for c in items)):
            raise ValueError(f"class_labels must be a non-empty list of class ids 0 to {self.num_classes - 1} "
                             f"(pipe.get_label_ids turns names into ids), got {class_labels!r}")
        _check_positive_int("num_inference_steps", num_inference_steps)
        samplers.check_guidance_scale(guidance_scale)
        self._check_outputs(output_type, tensor_inputs)
        return list(items)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int],
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        solver: str | None = None,
        cache: CacheConfig | None = None,
    ) -> DiTPipelineOutput | tuple:
        """Generate one image per class id (diffusers' DiTPipeline call); `solver` overrides the folder's sampler."""
        callback_on_step_end_tensor_inputs = _callback_tensor_inputs(callback_on_step_end,
                                                                     callback_on_step_end_tensor_inputs)
        labels = self._check_call(class_labels, num_inference_steps, guidance_scale, output_type,
                                  callback_on_step_end_tensor_inputs)
        self._start_call(guidance_scale)
        device, cfg = self._execution_device, self.transformer.config
        channels, size = cfg.in_channels, cfg.sample_size
        if latents is None:
            latents = randn_tensor((len(labels), channels, size, size), generator=generator, device=device,
                                   dtype=self.transformer.dtype)  # (B, C, s, s)
        y = torch.tensor(labels, device=device)
        if guidance_scale > 1:  # [uncond, cond], as the guidance wrapper doubles the batch
            y = torch.cat([torch.full_like(y, self.num_classes), y])

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self.transformer(x, timestep=t.to(device).expand(x.shape[0]), class_labels=y, return_dict=False)[0]
            return out[:, :channels]  # eps; DiT's learned variance (the other half) is unused by these samplers

        check_cache(cache)
        latents = self._sample(model_fn, latents, self._sampler(num_inference_steps), guidance_scale=guidance_scale,
                               callback_on_step_end=callback_on_step_end,
                               tensor_inputs=callback_on_step_end_tensor_inputs, state={}, solver=solver,
                               cache=cache)
        return self._finish(latents, output_type, return_dict)

    def _finish(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Decode as diffusers' DiTPipeline does: no shift factor, [-1, 1] -> [0, 1]."""
        if output_type == "latent":
            images = latents
        else:
            samples = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            images = (samples / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return DiTPipelineOutput(images=images) if return_dict else (images,)

