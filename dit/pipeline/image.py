"""Text-to-image: Stable Diffusion 3 / 3.5 and CogView3-Plus on our transformers and samplers."""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import CogView3PlusPipeline, StableDiffusion3Pipeline

import samplers
from dit.pipeline.base import DiTPipeline, DiTPipelineOutput, _check_positive_int, _check_sizes



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
