"""Text-to-image: Stable Diffusion 3 / 3.5 and CogView3-Plus on our transformers and samplers, each with an
optional relay super-resolution stage (`relay=k`, dit.pipeline.relay)."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from diffusers import CogView3PlusPipeline, StableDiffusion3Pipeline

import samplers
from dit.cache import CacheConfig
from dit.pipeline.base import (DiTPipeline, DiTPipelineOutput, _callback_tensor_inputs, _check_positive_int,
                               _check_sizes)
from dit.pipeline.image_family import ImageFamily
from dit.pipeline.relay import RelayStage



class _ImagePipelineMixin:
    """What our image pipelines share: request checks before any model runs, the latents, the denoising stages
    and decoding to images. `_vae_shift`: whether the family's latents are shifted by the VAE's shift_factor
    (SD3's are, CogView3-Plus's are not)."""

    _vae_shift: bool

    def _image_size(self, height: int | None, width: int | None, sample_size: int) -> tuple[int, int]:
        """The transformer's sample size where the call gave None (only None: 0 is refused later)."""
        default = sample_size * self.vae_scale_factor
        return default if height is None else height, default if width is None else width

    def _check_image_request(self, prompt, height: int, width: int, num_inference_steps: int,
                             num_images_per_prompt: int, guidance_scale: float, output_type: str,
                             prompt_embeds: torch.Tensor | None = None) -> None:
        if prompt_embeds is None and (prompt is None or (isinstance(prompt, list) and not prompt)):
            raise ValueError(f"prompt must be a string or a non-empty list of strings (or pass prompt_embeds), "
                             f"got {prompt!r}")
        _check_positive_int("num_inference_steps", num_inference_steps)
        _check_positive_int("num_images_per_prompt", num_images_per_prompt)
        _check_sizes(height, width, 1, self.vae_scale_factor * self.transformer.config.patch_size, 1)
        samplers.check_guidance_scale(guidance_scale)
        self._check_outputs(output_type)

    def _to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> the VAE's images (B, 3, H, W) in [-1, 1]: undo the VAE's scaling (and shift,
        where the family uses it), decode."""
        latents = latents / self.vae.config.scaling_factor + (self.vae.config.shift_factor if self._vae_shift else 0.0)
        return self.vae.decode(latents, return_dict=False)[0]

    def _from_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, h, w): the VAE posterior's mode, shifted and scaled."""
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()
        return (z - (self.vae.config.shift_factor if self._vae_shift else 0.0)) * self.vae.config.scaling_factor

    def _image_latents(self, prompt, embeds: torch.Tensor, num_images_per_prompt: int, height: int, width: int,
                       generator, latents: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """diffusers' prepare_latents for the call's batch (its prompts, or the prompt embeddings' rows) times
        num_images_per_prompt, in the embeddings' dtype: ((B, C, H/8, W/8), B)."""
        batch = (1 if isinstance(prompt, str) else len(prompt) if prompt is not None else embeds.shape[0])
        batch *= num_images_per_prompt
        return self.prepare_latents(batch, self.transformer.config.in_channels, height, width, embeds.dtype,
                                    self._execution_device, generator, latents), batch

    def _image_stages(self, model_fn_for: Callable, **common: Any) -> Callable[..., torch.Tensor]:
        """run(transformer, x, spec, factor, **runtime), each stage's DiTPipeline._sample (the base stage's, and
        the relay's through DiTPipeline._relay): model_fn_for(transformer, factor), the family's model function at
        factor times the base size, with the call's `common` arguments (callback, state, cache, ...). diffusers
        re-reads guidance_scale and do_classifier_free_guidance at every step (a callback may change them, as
        diffusers' SD3CFGCutoffCallback does), and so do these stages."""
        def run(transformer, x: torch.Tensor, spec: samplers.SamplerSpec, factor: int, **runtime) -> torch.Tensor:
            return self._sample(model_fn_for(transformer, factor), x, spec,
                                guidance_scale=lambda t: self._guidance_scale,
                                guide=lambda t: self.do_classifier_free_guidance, **common, **runtime)

        return run

    def _check_relay_size(self, plan: RelayStage | None, height: int, width: int) -> None:
        """The relay stage's latents fit its transformer's positional table (SD3, CogView3-Plus have a fixed one),
        checked before any model runs rather than by the transformer after the base stage."""
        if plan is None:
            return
        cfg = self._relay_model().config
        if cfg.get("pos_embed_max_size") is None:
            return
        limit = cfg.pos_embed_max_size * cfg.patch_size * self.vae_scale_factor  # pixels per side
        if max(height, width) * plan.factor > limit:
            most = limit // max(height, width)
            raise ValueError(f"relay {plan.factor} makes {height * plan.factor}x{width * plan.factor}, past the "
                             f"transformer's position table ({limit} pixels per side); "
                             + (f"the largest relay at {height}x{width} is {most}" if most > 1 else "drop relay"))

    def _finish_images(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Latents (B, C, h, w) -> images: decode, post-process."""
        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(self._to_pixels(latents), output_type=output_type)
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
    _vae_shift = True
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
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
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
        """Generate images: diffusers' StableDiffusion3Pipeline call (its arguments up to `mu`, with its meaning:
        prompt and pooled embeddings instead of prompts, `clip_skip`, custom `sigmas`, SD3.5's skip-layer guidance,
        callbacks and properties; IP-Adapter is refused). Ours: `solver` overrides flow-matching Euler (e.g.
        "heun"); `relay=k`: the relay stage of the class docstring, `relay_steps` steps from training step T_r =
        `relay_start`, block noise of block size k, the base latents upsampled in latent space (nearest, bilinear)
        or in pixels ("pixel"). Skip-layer guidance runs in the base stage (the relay stage's transformer may have
        other layers)."""
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            raise ValueError("IP-Adapter is not supported by this pipeline (our SD3 transformer has no IP-Adapter "
                             "attention); condition on text, or use diffusers' StableDiffusion3Pipeline for it")
        callback_on_step_end_tensor_inputs = _callback_tensor_inputs(callback_on_step_end,
                                                                     callback_on_step_end_tensor_inputs)
        height, width = self._image_size(height, width, self.default_sample_size)
        self._check_image_request(prompt, height, width, num_inference_steps, num_images_per_prompt,
                                  guidance_scale, output_type, prompt_embeds)
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        self._check_skip_layer_guidance(skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start,
                                        skip_layer_guidance_stop, cache)
        plan = self._plan_stages(cache, relay, relay_steps, relay_start, relay_upsample, relay_noise_alpha, relay_eta)
        self._check_relay_size(plan, height, width)
        self._start_call(guidance_scale, clip_skip=clip_skip, skip_guidance_layers=skip_guidance_layers,
                         skip_layer_guidance_scale=skip_layer_guidance_scale,
                         joint_attention_kwargs=joint_attention_kwargs)
        device, do_cfg = self._execution_device, self.do_classifier_free_guidance
        pe, npe, ppe, nppe = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, do_classifier_free_guidance=do_cfg,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=device, clip_skip=clip_skip, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=(joint_attention_kwargs or {}).get("scale"))  # text-encoder LoRA strength, as diffusers
        # The state callbacks read and may replace, as diffusers holds it: [negative; positive] under guidance.
        state = {"prompt_embeds": torch.cat([npe, pe]) if do_cfg else pe,
                 "pooled_prompt_embeds": torch.cat([nppe, ppe]) if do_cfg else ppe}
        latents, _ = self._image_latents(prompt, pe, num_images_per_prompt, height, width, generator, latents)
        spec = self._sampler(num_inference_steps, mu=self._dynamic_mu(latents) if mu is None else mu, sigmas=sigmas)
        model_fn_for = partial(self._model_fn, state=state, attention_kwargs=joint_attention_kwargs, device=device)
        skip_layer = self._skip_layer(model_fn_for, spec, (pe, ppe), skip_guidance_layers, skip_layer_guidance_scale,
                                      skip_layer_guidance_start, skip_layer_guidance_stop)
        run = self._image_stages(model_fn_for, callback_on_step_end=callback_on_step_end,
                                 tensor_inputs=callback_on_step_end_tensor_inputs, state=state, cache=cache)
        latents = run(self.transformer, latents, spec, 1, solver=solver, skip_layer=skip_layer)
        latents = self._relay(plan, latents, run, to_pixels=self._to_pixels, from_pixels=self._from_pixels,
                              generator=generator)
        return self._finish_images(latents, output_type, return_dict)

    @staticmethod
    def _model_fn(transformer: torch.nn.Module, _factor: int, *, state: dict, attention_kwargs: dict | None,
                  device: torch.device, embeds: tuple | None = None, skip_layers: list[int] | None = None) -> Callable:
        """SD3's transformer as model_fn(x, t) (at any size: its positions are its own) on the state's text and
        pooled embeddings, or on `embeds`, without the blocks `skip_layers` (skip-layer guidance's call)."""
        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            text, pooled = embeds or (state["prompt_embeds"], state["pooled_prompt_embeds"])
            # CFG parallel splits a call's batch into its [uncond; cond] parts; skip-layer guidance's call has
            # only the conditional batch, which each cfg group then runs whole (exact: every op is per sample)
            n = getattr(transformer, "cfg_degree", 1) if skip_layers else 1
            if x.shape[0] % n:
                x, text, pooled = (v.repeat(n, *[1] * (v.ndim - 1)) for v in (x, text, pooled))
            else:
                n = 1
            timestep = t.to(device=device, dtype=torch.float32).expand(x.shape[0])
            out = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text,
                              pooled_projections=pooled, joint_attention_kwargs=attention_kwargs,
                              return_dict=False, **({"skip_layers": skip_layers} if skip_layers else {}))[0]
            return out[: out.shape[0] // n]

        return model_fn

    def _skip_layer(self, model_fn_for: Callable, spec: samplers.SamplerSpec, positive: tuple, layers, scale: float,
                    start: float, stop: float) -> samplers.SkipLayerGuidance | None:
        """SD3.5's skip-layer guidance term in the base stage (None without layers or guidance): the transformer
        without `layers` on the `positive` (text, pooled) embeddings, whatever a callback changes (as diffusers),
        on the steps of diffusers' window."""
        if layers is None or not self.do_classifier_free_guidance:
            return None
        return samplers.SkipLayerGuidance(model_fn_for(self.transformer, 1, embeds=positive, skip_layers=list(layers)),
                                          scale, _step_window(spec, start, stop))

    def _check_skip_layer_guidance(self, layers, scale: float, start: float, stop: float,
                                   cache: CacheConfig | None) -> None:
        """SD3.5's skip-layer guidance arguments: layer indices of this transformer (diffusers silently skips none
        for an index past the last block, which makes the guidance a no-op), a finite scale and step fractions."""
        if layers is None:
            return
        n = len(self.transformer.transformer_blocks)
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in layers):
            raise ValueError(f"skip_guidance_layers must be a non-empty list of block indices 0 to {n - 1} (SD3.5 "
                             f"Medium's: [7, 8, 9]), got {layers!r}")
        samplers.check_guidance_scale(scale)
        for name, value in (("skip_layer_guidance_start", start), ("skip_layer_guidance_stop", stop)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a fraction of the steps in [0, 1], got {value!r}")
        if cache is not None:
            raise ValueError("cache= and skip_guidance_layers cannot be combined: a step cache reuses one call's "
                             "residuals per step, and skip-layer guidance makes a second, different call")

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
    _vae_shift = False
    _optional_components = ["relay_transformer"]

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler, relay_transformer=None):
        super().__init__(tokenizer, text_encoder, vae, transformer, scheduler)
        # ours: diffusers' CogView3PlusPipeline ignores it when it loads our folder
        self.register_modules(relay_transformer=relay_transformer)

    def encode_prompt(self, prompt: str | list[str] | None, negative_prompt: str | list[str] | None = None,
                      do_classifier_free_guidance: bool = True, num_images_per_prompt: int = 1,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      max_sequence_length: int = 224, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """diffusers' CogView3PlusPipeline.encode_prompt (without a negative prompt the negative embeddings are
        zeros, CogView3-Plus's unconditional input), except that negative_prompt_embeds passed in are used:
        diffusers 0.42 replaces them by zeros whenever negative_prompt is None, which is always, since the two
        cannot be passed together (its docstring says they are used, and they silently are not)."""
        pe, npe = super().encode_prompt(prompt, negative_prompt, do_classifier_free_guidance, num_images_per_prompt,
                                        prompt_embeds, None, max_sequence_length, device, dtype)
        if do_classifier_free_guidance and negative_prompt_embeds is not None:
            npe = negative_prompt_embeds
        return pe, npe

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
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
        """Generate images: diffusers' CogView3PlusPipeline call (its arguments up to max_sequence_length, with
        its meaning: prompt embeddings instead of prompts, custom `timesteps` where the scheduler takes them,
        callbacks and properties). Ours: `solver` overrides the scheduler's (CogVideoX-style DDIM or DPM);
        `relay=k`: the relay stage of the class docstring, with SD3DiTPipeline's relay_* arguments."""
        callback_on_step_end_tensor_inputs = _callback_tensor_inputs(callback_on_step_end,
                                                                     callback_on_step_end_tensor_inputs)
        height, width = self._image_size(height, width, self.transformer.config.sample_size)
        self._check_image_request(prompt, height, width, num_inference_steps, num_images_per_prompt,
                                  guidance_scale, output_type, prompt_embeds)
        self.check_inputs(prompt, height, width, negative_prompt, callback_on_step_end_tensor_inputs, prompt_embeds,
                          negative_prompt_embeds)
        spec = self._sampler(num_inference_steps, timesteps=timesteps)
        plan = self._plan_stages(cache, relay, relay_steps, relay_start, relay_upsample, relay_noise_alpha, relay_eta)
        self._check_relay_size(plan, height, width)
        self._start_call(guidance_scale)
        device, do_cfg = self._execution_device, self.do_classifier_free_guidance
        pe, npe = self.encode_prompt(prompt, negative_prompt, do_cfg, num_images_per_prompt=num_images_per_prompt,
                                     prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                     max_sequence_length=max_sequence_length, device=device)
        # The state callbacks read and may replace, as diffusers holds it: prompt_embeds is [negative; positive]
        # under guidance, negative_prompt_embeds the negative half (replacing it changes nothing, as in diffusers).
        state = {"prompt_embeds": torch.cat([npe, pe]) if do_cfg else pe, "negative_prompt_embeds": npe}
        latents, rows = self._image_latents(prompt, pe, num_images_per_prompt, height, width, generator, latents)

        def model_fn_for(transformer: torch.nn.Module, factor: int) -> Callable:
            target = (height * factor, width * factor)  # the relay stage's images are k times larger
            sizes = {n: _size_conditioning(pe, n, original_size or target, target, crops_coords_top_left)
                     for n in (rows, 2 * rows)}

            def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return transformer(hidden_states=x, encoder_hidden_states=state["prompt_embeds"],
                                   timestep=t.to(device).expand(x.shape[0]), return_dict=False,
                                   **sizes[x.shape[0]])[0].float()

            return model_fn

        run = self._image_stages(model_fn_for, callback_on_step_end=callback_on_step_end,
                                 tensor_inputs=callback_on_step_end_tensor_inputs, state=state, generator=generator,
                                 cache=cache)
        latents = run(self.transformer, latents, spec, 1, solver=solver, eta=eta)
        latents = self._relay(plan, latents, run, to_pixels=self._to_pixels, from_pixels=self._from_pixels)
        return self._finish_images(latents, output_type, return_dict)


def _step_window(spec: samplers.SamplerSpec, start: float, stop: float) -> Callable[[torch.Tensor], bool]:
    """Whether a timestep is one of the steps i with start N < i < stop N of the spec's N (diffusers' window for
    SD3's skip-layer guidance)."""
    ts = spec.schedule.timesteps
    n = len(ts)
    active = {float(ts[i]) for i in range(n) if n * start < i < n * stop}
    return lambda t: float(t) in active


def _size_conditioning(embeds: torch.Tensor, rows: int, original: tuple[int, int], target: tuple[int, int],
                       crop: tuple[int, int]) -> dict[str, torch.Tensor]:
    """CogView3-Plus's SDXL-style micro-conditioning: each size as a (rows, 2) tensor, one row per model input."""
    return {name: torch.tensor([value], dtype=embeds.dtype, device=embeds.device).repeat(rows, 1)
            for name, value in (("original_size", original), ("target_size", target), ("crop_coords", crop))}
