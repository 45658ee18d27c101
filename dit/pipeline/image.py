"""Text-to-image: Stable Diffusion 3 / 3.5 and CogView3-Plus on our transformers and samplers, each with an
optional relay super-resolution stage (`relay=k`, dit.pipeline.relay)."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from diffusers import CogView3PlusPipeline, StableDiffusion3Pipeline

import samplers
from dit.cache import CacheConfig, check_cache
from dit.pipeline.base import DiTPipeline, DiTPipelineOutput, _check_positive_int, _check_sizes
from dit.pipeline.image_family import ImageFamily
from dit.pipeline.relay import RelayStage, relay_stage



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

    def _to_pixels(self, latents: torch.Tensor, *, shift: bool) -> torch.Tensor:
        """Latents (B, C, h, w) -> the VAE's images (B, 3, H, W) in [-1, 1]: undo the VAE's scaling (and shift,
        where the family uses it: SD3 does, CogView3-Plus does not), decode."""
        latents = latents / self.vae.config.scaling_factor + (self.vae.config.shift_factor if shift else 0.0)
        return self.vae.decode(latents, return_dict=False)[0]

    def _from_pixels(self, images: torch.Tensor, *, shift: bool) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, h, w): the VAE posterior's mode, shifted and scaled."""
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()
        return (z - (self.vae.config.shift_factor if shift else 0.0)) * self.vae.config.scaling_factor

    def _check_relay_size(self, plan: RelayStage | None, height: int, width: int) -> None:
        """The relay stage's latents fit its transformer's positional table (SD3, CogView3-Plus have a fixed one),
        checked before any model runs rather than by the transformer after the base stage."""
        if plan is None:
            return
        stage = self.transformer if getattr(self, "relay_transformer", None) is None else self.relay_transformer
        cfg = stage.config
        if cfg.get("pos_embed_max_size") is None:
            return
        limit = cfg.pos_embed_max_size * cfg.patch_size * self.vae_scale_factor  # pixels per side
        if max(height, width) * plan.factor > limit:
            most = limit // max(height, width)
            raise ValueError(f"relay {plan.factor} makes {height * plan.factor}x{width * plan.factor}, past the "
                             f"transformer's position table ({limit} pixels per side); "
                             + (f"the largest relay at {height}x{width} is {most}" if most > 1 else "drop relay"))

    def _relay_images(self, plan: RelayStage, latents: torch.Tensor, model_fn_for: Callable, *, shift: bool,
                      **sample_kwargs: Any) -> torch.Tensor:
        """The relay stage from the base latents (B, C, h, w) to (B, C, kh, kw): the folder's relay_transformer,
        else the base transformer (a CogView3-style high-resolution fix). model_fn_for(transformer, k) is the
        family's model function at k times the base size; sample_kwargs: DiTPipeline._sample's."""
        z_low = plan.z_low(latents, to_pixels=partial(self._to_pixels, shift=shift),
                           from_pixels=partial(self._from_pixels, shift=shift))
        stage = self.transformer if getattr(self, "relay_transformer", None) is None else self.relay_transformer
        return self._sample(model_fn_for(stage, plan.factor), z_low, plan.spec, eta=plan.eta, **sample_kwargs)

    def _finish_images(self, latents: torch.Tensor, output_type: str, return_dict: bool, *, shift: bool):
        """Latents (B, C, h, w) -> images: decode, post-process."""
        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(self._to_pixels(latents, shift=shift), output_type=output_type)
        self.maybe_free_model_hooks()
        return DiTPipelineOutput(images=image) if return_dict else (image,)



class SD3DiTPipeline(ImageFamily, _ImagePipelineMixin, DiTPipeline, StableDiffusion3Pipeline):
    """Text-to-image with Stable Diffusion 3 / 3.5: diffusers' prompt encoding (three text encoders), our
    transformer and flow-matching sampler; the same images as StableDiffusion3Pipeline.

    relay=k adds a relay stage to k x height by k x width on the flow path (dit.pipeline.relay), run by the
    folder's optional `relay_transformer`, else by the base transformer."""

    diffusers_class_name = "StableDiffusion3Pipeline"
    generation_defaults = {"num_inference_steps": 28, "guidance_scale": 7.0}  # diffusers' call defaults
    text_tokens = 77 + 256  # CLIP's and T5's (max_sequence_length) tokens, beside the image's
    supports_relay = True
    _optional_components = [*StableDiffusion3Pipeline._optional_components, "relay_transformer"]

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3, tokenizer_3, image_encoder=None, feature_extractor=None, relay_transformer=None):
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         text_encoder_3, tokenizer_3, image_encoder, feature_extractor)
        # ours: diffusers' StableDiffusion3Pipeline ignores it when it loads our folder
        self.register_modules(relay_transformer=relay_transformer)

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
        cache: CacheConfig | None = None,
        relay: int | None = None,
        relay_steps: int = 10,
        relay_start: int = 500,
        relay_upsample: str = "latent-nearest",
        relay_noise_alpha: float = 0.15,
        relay_eta: float = 0.0,
    ) -> DiTPipelineOutput | tuple:
        """Generate images; `solver` overrides flow-matching Euler (e.g. "heun"). `relay=k`: the relay stage of
        the class docstring, `relay_steps` steps from training step T_r = `relay_start`, block noise of block
        size k, the base latents upsampled in latent space (nearest, bilinear) or in pixels ("pixel")."""
        default = self.default_sample_size * self.vae_scale_factor  # only None means default; 0 is refused
        height = default if height is None else height
        width = default if width is None else width
        self._check_image_request(prompt, height, width, num_inference_steps, num_images_per_prompt,
                                  guidance_scale, output_type)
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
                          max_sequence_length=max_sequence_length)
        check_cache(cache)
        plan = relay_stage(self.scheduler, relay, steps=relay_steps, start=relay_start, upsample=relay_upsample,
                           noise_alpha=relay_noise_alpha, eta=relay_eta)
        self._check_relay_size(plan, height, width)
        self._guidance_scale, self._clip_skip, self._interrupt = guidance_scale, None, False
        self._joint_attention_kwargs = joint_attention_kwargs
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        pe, npe, ppe, nppe = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, do_classifier_free_guidance=do_cfg,
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=(joint_attention_kwargs or {}).get("scale"))  # text-encoder LoRA strength, as diffusers
        if do_cfg:
            pe, ppe = torch.cat([npe, pe]), torch.cat([nppe, ppe])
        batch = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        latents = self.prepare_latents(batch, self.transformer.config.in_channels, height, width, pe.dtype, device,
                                       generator, latents)  # (B, C, H/8, W/8)
        spec = self._sampler(num_inference_steps, mu=self._dynamic_mu(latents) if mu is None else mu)
        state = {"prompt_embeds": pe}

        def model_fn_for(transformer: torch.nn.Module, _factor: int) -> Callable:
            def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                timestep = t.to(device=device, dtype=torch.float32).expand(x.shape[0])
                return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=state["prompt_embeds"],
                                   pooled_projections=ppe, joint_attention_kwargs=joint_attention_kwargs,
                                   return_dict=False)[0]

            return model_fn

        common = dict(guidance_scale=guidance_scale, callback_on_step_end=callback_on_step_end,
                      tensor_inputs=callback_on_step_end_tensor_inputs, state=state, cache=cache)
        latents = self._sample(model_fn_for(self.transformer, 1), latents, spec, solver=solver, **common)
        if plan is not None:
            latents = self._relay_images(plan, latents, model_fn_for, shift=True, generator=generator, **common)
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


class CogView3PlusDiTPipeline(ImageFamily, _ImagePipelineMixin, DiTPipeline, CogView3PlusPipeline):
    """Text-to-image with CogView3-Plus: diffusers' T5 prompt encoding, our transformer and samplers; the same
    images as CogView3PlusPipeline.

    relay=k adds a relay stage to k x height by k x width on the folder's DDPM path (dit.pipeline.relay), run by
    the folder's optional `relay_transformer`, else by the base transformer; it sees target_size (and, unless
    given, original_size) k x height by k x width."""

    diffusers_class_name = "CogView3PlusPipeline"
    generation_defaults = {"num_inference_steps": 50, "guidance_scale": 5.0}  # diffusers' call defaults
    text_tokens = 224  # T5 tokens (max_sequence_length)
    supports_relay = True
    _optional_components = ["relay_transformer"]

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler, relay_transformer=None):
        super().__init__(tokenizer, text_encoder, vae, transformer, scheduler)
        # ours: diffusers' CogView3PlusPipeline ignores it when it loads our folder
        self.register_modules(relay_transformer=relay_transformer)

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
        cache: CacheConfig | None = None,
        relay: int | None = None,
        relay_steps: int = 10,
        relay_start: int = 500,
        relay_upsample: str = "latent-nearest",
        relay_noise_alpha: float = 0.15,
        relay_eta: float = 0.0,
    ) -> DiTPipelineOutput | tuple:
        """Generate images (CogVideoX-style schedulers: DDIM or DPM; `solver` overrides). `relay=k`: the relay
        stage of the class docstring, with SD3DiTPipeline's relay_* arguments."""
        default = self.transformer.config.sample_size * self.vae_scale_factor  # only None means default; 0 is refused
        height = default if height is None else height
        width = default if width is None else width
        self._check_image_request(prompt, height, width, num_inference_steps, num_images_per_prompt,
                                  guidance_scale, output_type)
        self.check_inputs(prompt, height, width, negative_prompt, list(callback_on_step_end_tensor_inputs))
        check_cache(cache)
        plan = relay_stage(self.scheduler, relay, steps=relay_steps, start=relay_start, upsample=relay_upsample,
                           noise_alpha=relay_noise_alpha, eta=relay_eta)
        self._check_relay_size(plan, height, width)
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
        state = {"prompt_embeds": pe}

        def model_fn_for(transformer: torch.nn.Module, factor: int) -> Callable:
            target = (height * factor, width * factor)  # the relay stage's images are k times larger
            sizes = _size_conditioning(pe, original_size or target, target, crops_coords_top_left)

            def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return transformer(hidden_states=x, encoder_hidden_states=state["prompt_embeds"],
                                   timestep=t.to(device).expand(x.shape[0]), return_dict=False, **sizes)[0].float()

            return model_fn

        common = dict(guidance_scale=guidance_scale, callback_on_step_end=callback_on_step_end,
                      tensor_inputs=callback_on_step_end_tensor_inputs, state=state, generator=generator,
                      cache=cache)
        latents = self._sample(model_fn_for(self.transformer, 1), latents, spec, solver=solver, eta=eta, **common)
        if plan is not None:
            latents = self._relay_images(plan, latents, model_fn_for, shift=False, **common)
        return self._finish_images(latents, output_type, return_dict, shift=False)


def _size_conditioning(embeds: torch.Tensor, original: tuple[int, int], target: tuple[int, int],
                       crop: tuple[int, int]) -> dict[str, torch.Tensor]:
    """CogView3-Plus's SDXL-style micro-conditioning: each size as a (rows, 2) tensor, one row per model input."""
    rows = embeds.shape[0]
    return {name: torch.tensor([value], dtype=embeds.dtype, device=embeds.device).repeat(rows, 1)
            for name, value in (("original_size", original), ("target_size", target), ("crop_coords", crop))}
