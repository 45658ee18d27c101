"""Wan image-to-video on our transformer and samplers: the same call and frames as diffusers'
WanImageToVideoPipeline.

Three kinds of folder, one class, as in diffusers:
- Wan 2.1 I2V (14B 480P / 720P) and FLF2V: a CLIP vision model (`image_encoder`, `image_processor`) whose
  penultimate hidden state is the transformer's image cross-attention context; the VAE latents of the first
  frame followed by zero frames (FLF2V: and the last frame) and a mask of the given frames are concatenated to
  the noise's channels (in_channels = C + k + C: 16 + 4 + 16).
- Wan 2.2 I2V A14B: the same latents and mask, no image encoder, two experts (WanDiTPipeline's switch).
- Wan 2.2 TI2V-5B (`expand_timesteps`, a WanPipeline folder diffusers' image-to-video class loads too): latent
  frame 0 is held at the first frame's latents, with timestep 0 on its tokens.

Everything else (prompts, the experts, guidance, the denoising path, the decode) is dit.pipeline.wan.WanFamily's.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import PIL.Image
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from diffusers.utils.torch_utils import randn_tensor

from dit.cache import CacheConfig
from dit.pipeline.base import DiTPipeline, DiTPipelineOutput, _callback_tensor_inputs, _check_positive_int
from dit.pipeline.loading import _require_family, pipeline_class
from dit.pipeline.wan import ImageCondition, WanDiTPipeline, WanFamily


class WanImageToVideoDiTPipeline(WanFamily, DiTPipeline, WanImageToVideoPipeline):
    """Image-to-video with Wan 2.1 I2V / FLF2V, Wan 2.2 I2V A14B and Wan 2.2 TI2V-5B."""

    diffusers_class_name = "WanImageToVideoPipeline"
    requires_image = True
    # WanPipeline's prompt encoding: the same code as WanImageToVideoPipeline's, whose prompt cleaning fails
    # (NameError) where ftfy is not installed, instead of skipping ftfy's fix as WanPipeline's does.
    _get_t5_prompt_embeds = WanPipeline._get_t5_prompt_embeds

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DiTPipeline":
        """A WanImageToVideoPipeline folder, or TI2V-5B's WanPipeline folder (expand_timesteps) for image-to-video
        (as diffusers' WanImageToVideoPipeline.from_pretrained loads it); torch_dtype and device as
        DiTPipeline.from_pretrained."""
        folder = Path(pretrained_model_name_or_path)
        if pipeline_class(folder) is not WanDiTPipeline:
            return super().from_pretrained(folder, **kwargs)
        cls._require_folder(folder)
        t2v = WanDiTPipeline.from_pretrained(folder, **kwargs)
        return cls(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae, scheduler=t2v.scheduler,
                   transformer=t2v.transformer, transformer_2=t2v.transformer_2,
                   boundary_ratio=t2v.config.boundary_ratio, expand_timesteps=t2v.config.expand_timesteps)

    @classmethod
    def _require_folder(cls, folder: Path) -> None:
        if pipeline_class(folder) is WanDiTPipeline:  # TI2V-5B's folder; another WanPipeline is text-only
            if WanDiTPipeline.image_family(folder) is not cls:
                raise ValueError(f"{str(folder)!r} holds a text-to-video WanPipeline (no expand_timesteps); "
                                 f"{cls.__name__} takes WanImageToVideoPipeline folders and Wan 2.2 TI2V-5B's")
            return
        _require_family(folder, cls)

    @classmethod
    def image_family(cls, folder: str | os.PathLike) -> type:
        return cls

    @staticmethod
    def memory_shape(folder: str | os.PathLike):
        """WanFamily's, with the image encoder's weights counted."""
        from dit.estimate import safetensors_numel, wan_shape

        shape = wan_shape(Path(folder))
        encoder = Path(folder) / "image_encoder"
        extra = sum(safetensors_numel(f) for f in sorted(encoder.glob("*.safetensors"))) if encoder.is_dir() else 0
        return dataclasses.replace(shape, weight_numel=shape.weight_numel + extra)

    def check_request(self, prompt, negative_prompt, height: int, width: int, num_frames: int,
                      num_inference_steps: int, guidance_scale: float, guidance_scale_2: float | None = None,
                      tensor_inputs=("latents",), output_type: str = "np", image=None, last_image=None, *,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      image_embeds: torch.Tensor | None = None) -> None:
        """WanFamily's checks, and the image's: one PIL image or (3, H, W) / (1, 3, H, W) tensor; last_image only
        where the model uses it (not TI2V; with CLIP tokens only on an FLF2V transformer, which needs it);
        image_embeds only for a transformer with CLIP image tokens, and with the image (see __call__)."""
        super().check_request(prompt, negative_prompt, height, width, num_frames, num_inference_steps,
                              guidance_scale, guidance_scale_2, tensor_inputs, output_type,
                              prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        if image is None:
            raise ValueError("image is required: image-to-video starts from a first frame (a PIL image or a tensor)"
                             + ("; image_embeds replace only its CLIP tokens, the VAE latents of the first frame "
                                "still come from the image (diffusers 0.42's WanImageToVideoPipeline fails "
                                "without it too)" if image_embeds is not None else ""))
        if image_embeds is not None:
            self._check_image_embeds(image_embeds, last_image)
        for name, value in (("image", image), ("last_image", last_image)):
            if value is None:
                continue
            if not isinstance(value, (PIL.Image.Image, torch.Tensor)):
                raise ValueError(f"{name} must be a PIL image or a torch.Tensor, got {type(value).__name__}")
            if isinstance(value, torch.Tensor) and not (value.ndim == 3 or (value.ndim == 4 and value.shape[0] == 1)):
                raise ValueError(f"{name} must be one image, (3, H, W) or (1, 3, H, W); got {tuple(value.shape)}")
        model, z, k = self.denoisers()[0], self.vae.config.z_dim, self.vae_scale_factor_temporal
        expected = z if self.config.expand_timesteps else 2 * z + k
        if model.config.in_channels != expected:
            raise ValueError(f"the transformer takes {model.config.in_channels} input channels; image-to-video with "
                             f"this {z}-channel VAE needs {expected}"
                             f"{'' if self.config.expand_timesteps else f' (noise, {k} mask, image latents)'}")
        image_dim = self._image_dim()
        if image_dim is not None and (self.image_encoder is None or self.image_processor is None):
            raise ValueError(f"the transformer has image_dim={image_dim} (CLIP image tokens), but the pipeline has "
                             "no image_encoder and image_processor")
        flf2v = image_dim is not None and self.transformer.config.pos_embed_seq_len is not None
        if last_image is not None:
            if self.config.expand_timesteps:
                raise ValueError("last_image is not used with expand_timesteps (TI2V-5B holds the first frame only)")
            if num_frames < 2:
                raise ValueError(f"last_image needs num_frames of at least {1 + k} (1 + {k}n), got {num_frames}")
            if image_dim is not None and not flf2v:
                raise ValueError("last_image needs a first-last-frame transformer (Wan 2.1 FLF2V, pos_embed_seq_len "
                                 "set); this one takes the tokens of one image")
        elif flf2v:
            raise ValueError("this FLF2V transformer (pos_embed_seq_len set) takes the first and the last frame: "
                             "pass last_image")

    def _check_image_embeds(self, image_embeds, last_image) -> None:
        """image_embeds: the CLIP tokens encode_image gives, (1, M, E) (FLF2V: (2, M, E), first and last frame), for
        a transformer with image cross-attention; diffusers' pipeline would drop them silently on any other."""
        image_dim = self._image_dim()
        if image_dim is None:
            raise ValueError("image_embeds are CLIP image tokens, and this transformer has no image cross-attention "
                             "(image_dim is None: Wan 2.2 A14B, TI2V-5B); drop image_embeds")
        rows = 2 if last_image is not None else 1
        if not (torch.is_tensor(image_embeds) and image_embeds.ndim == 3 and image_embeds.shape[0] == rows
                and image_embeds.shape[2] == image_dim):
            got = tuple(image_embeds.shape) if torch.is_tensor(image_embeds) else type(image_embeds).__name__
            raise ValueError(f"image_embeds must be ({rows}, tokens, {image_dim}) as pipe.encode_image("
                             f"{'[image, last_image]' if rows == 2 else 'image'}) returns them, got {got}")

    def _image_dim(self) -> int | None:
        """The CLIP token width of a transformer with image cross-attention (Wan 2.1 I2V), else None."""
        return None if self.transformer is None else self.transformer.config.image_dim

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        last_image: PIL.Image.Image | torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = 512,
        solver: str | None = None,
        cache: CacheConfig | None = None,
        relay: int | None = None,
        relay_steps: int = 10,
        relay_start: int = 500,
        relay_upsample: str = "latent-nearest",
        relay_noise_alpha: float = 0.15,
        relay_eta: float = 0.0,
    ) -> DiTPipelineOutput | tuple:
        """Generate videos from a first frame (and, FLF2V / A14B, a last frame): diffusers'
        WanImageToVideoPipeline call (its arguments up to max_sequence_length, with its meaning: prompt embeddings
        instead of prompts, callbacks and properties). `image_embeds` replace the CLIP tokens of `image` (and
        `last_image`) that `pipe.encode_image` would give, as diffusers' docstring says; the image is still
        needed for the VAE latents of the first frame (diffusers 0.42 refuses image with image_embeds, and fails
        without the image, so no diffusers call uses them). Ours: `solver` overrides the folder's sampler;
        `relay=k` and the relay_* arguments as WanDiTPipeline's: the relay stage sees the image(s) encoded again
        at k x height by k x width."""
        callback_on_step_end_tensor_inputs = _callback_tensor_inputs(callback_on_step_end,
                                                                     callback_on_step_end_tensor_inputs)
        self.check_request(prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                           guidance_scale_2, callback_on_step_end_tensor_inputs, output_type, image, last_image,
                           prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                           image_embeds=image_embeds)
        _check_positive_int("num_videos_per_prompt", num_videos_per_prompt)
        spec = self._sampler(num_inference_steps)
        plan = self._plan_stages(cache, relay, relay_steps, relay_start, relay_upsample, relay_noise_alpha, relay_eta)
        self._start_call(guidance_scale, guidance_scale_2, attention_kwargs)
        state = self._prompt_state(prompt, negative_prompt, self.do_classifier_free_guidance, num_videos_per_prompt,
                                   max_sequence_length, prompt_embeds, negative_prompt_embeds)
        batch, device = state["prompt_embeds"].shape[0], self._execution_device
        noise = self._noise(batch, height, width, num_frames, generator, latents, device)

        def image_at(k: int) -> ImageCondition:  # the relay stage sees the image(s) encoded at its size
            return self._image_condition(image, last_image, batch, k * height, k * width, num_frames, device,
                                         image_embeds)

        run = self._stages(state, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2,
                           attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
                           tensor_inputs=callback_on_step_end_tensor_inputs, generator=generator, cache=cache,
                           image_at=image_at)
        latents = run(None, noise, spec, 1, solver=solver)
        latents = self._relay(plan, latents, run, to_pixels=self._decode, from_pixels=self._encode)
        return self._finish(latents, output_type, return_dict)

    def _noise(self, batch: int, height: int, width: int, num_frames: int, generator, latents: torch.Tensor | None,
               device: torch.device) -> torch.Tensor:
        """The starting noise (B, C, F', H', W') in fp32, C the VAE's latent channels; or `latents`, checked."""
        s = self.vae_scale_factor_spatial
        shape = (batch, self.vae.config.z_dim, (num_frames - 1) // self.vae_scale_factor_temporal + 1,
                 height // s, width // s)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}; give one per video")
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
        return latents.to(device=device, dtype=torch.float32)

    def _image_condition(self, image, last_image, batch: int, height: int, width: int, num_frames: int,
                         device: torch.device, image_embeds: torch.Tensor | None = None) -> ImageCondition:
        """The image(s) as the model sees them (ImageCondition), for a batch of `batch` videos; `image_embeds`:
        the CLIP tokens to use instead of encoding the image(s)."""
        embeds = None
        if self._image_dim() is not None:  # CLIP tokens, (1 or 2 with FLF2V's last frame, M, E) -> per video
            embeds = image_embeds if image_embeds is not None else self.encode_image(
                image if last_image is None else [image, last_image], device)
            embeds = embeds.to(device).repeat(batch, 1, 1).to(self.transformer.dtype)
        first = self._pixels(image, height, width, device)  # (1, 3, 1, H, W) in [-1, 1]
        if self.config.expand_timesteps:  # TI2V: the first frame alone; latent frame 0 held at its latents
            z = self._encode(first).repeat(batch, 1, 1, 1, 1)  # (B, C, 1, H', W')
            mask = torch.ones(1, 1, *self._latent_size(height, width, num_frames), device=device)
            mask[:, :, 0] = 0
            return ImageCondition(z, first_frame_mask=mask, embeds=embeds)
        # The video the VAE encodes: the given frame(s) and black (zero) frames between.
        frames = [first, first.new_zeros(1, 3, num_frames - 1 - (last_image is not None), height, width)]
        if last_image is not None:
            frames.append(self._pixels(last_image, height, width, device))
        z = self._encode(torch.cat(frames, dim=2)).repeat(batch, 1, 1, 1, 1)  # (B, C, F', H', W')
        mask = self._frame_mask(num_frames, last_image is not None, z.shape[-2:]).to(z.device)
        return ImageCondition(torch.cat([mask.expand(batch, -1, -1, -1, -1), z], dim=1), embeds=embeds)

    def _latent_size(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        s = self.vae_scale_factor_spatial
        return (num_frames - 1) // self.vae_scale_factor_temporal + 1, height // s, width // s

    def _pixels(self, image, height: int, width: int, device: torch.device) -> torch.Tensor:
        """An image resized to height x width in [-1, 1], as one frame: (1, 3, 1, H, W) fp32."""
        return self.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)[:, :, None]

    def _frame_mask(self, num_frames: int, last: bool, size: tuple[int, int]) -> torch.Tensor:
        """Which frames are given, in the latents' layout: (1, k, F', H', W') fp32, k the VAE's temporal factor.

        Latent frame f > 0 encodes the k frames 4f-3 .. 4f (k = 4); latent frame 0 encodes frame 0 alone, so that
        frame counts k times. Channel c of latent frame f is 1 where its c-th frame is given (the first; with
        last_image the last, which lands in the last latent frame's last channel)."""
        k = self.vae_scale_factor_temporal
        given = torch.zeros(num_frames + k - 1)  # frame 0 repeated k times, then frames 1 .. num_frames - 1
        given[:k] = 1
        if last:
            given[-1] = 1
        return given.view(-1, k).T.reshape(1, k, -1, 1, 1).expand(-1, -1, -1, *size)
