"""Wan 2.1 / 2.2 text-to-video on our transformer and samplers: the same call and frames as diffusers' WanPipeline.

diffusers' prompt encoding (UMT5, Wan's prompt cleaning, embeddings trimmed to each prompt's length and padded
with zeros) and VAE (AutoencoderKLWan until vae3d has Wan's); our transformer, and the folder's scheduler run by
our samplers through the one denoising path. Wan 2.2 A14B has two experts: `transformer` for the high-noise
steps (t >= boundary_ratio x T), `transformer_2` for the rest, with its own guidance scale. TI2V-5B
(`expand_timesteps`) takes one timestep per latent token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import WanPipeline

import samplers
from dit.convert import read_folder_json
from dit.estimate import WAN_VAE_FACTORS
from dit.pipeline import DiTPipeline, DiTPipelineOutput, _check_positive_int, _check_sizes, _require_family


class WanDiTPipeline(DiTPipeline, WanPipeline):
    """Text-to-video with Wan 2.1 (1.3B, 14B) and Wan 2.2 (A14B two-expert, TI2V-5B)."""

    diffusers_class_name = "WanPipeline"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    supports_relay = False  # no relay stage yet: `dit generate --relay` is refused before loading
    # diffusers' WanPipeline call defaults (fps: the 16 of diffusers' Wan examples); a folder's
    # generation_config.json overrides them.
    generation_defaults = {"height": 480, "width": 832, "num_frames": 81, "num_inference_steps": 50,
                           "guidance_scale": 5.0, "fps": 16}

    def denoisers(self) -> list:
        """The experts: `transformer`, and Wan 2.2 A14B's low-noise `transformer_2`."""
        return [m for m in (self.transformer, getattr(self, "transformer_2", None)) if m is not None]

    @staticmethod
    def memory_shape(folder: str | os.PathLike):
        """What dit.estimate needs from the folder's configs (dit.estimate.wan_shape)."""
        from dit.estimate import wan_shape

        return wan_shape(Path(folder))

    @staticmethod
    def check_folder_request(folder: str | os.PathLike, height: int | None, width: int | None,
                             num_frames: int | None) -> tuple[int, int, int]:
        """Fill the defaults (generation_defaults, diffusers' WanPipeline's) and check the sizes against the
        transformer's patch_size and the VAE's scale factors, from the folder's config files alone."""
        folder = Path(folder)
        _require_family(folder, WanDiTPipeline)
        t = read_folder_json(folder / "transformer", what="a Wan transformer config",
                             required={"patch_size": tuple[int, int, int]})
        v = read_folder_json(folder / "vae", what="a Wan VAE config",
                             optional={"scale_factor_spatial": int, "scale_factor_temporal": int})
        spatial = v.get("scale_factor_spatial", WAN_VAE_FACTORS[0])  # TI2V-5B's VAE: 16
        temporal = v.get("scale_factor_temporal", WAN_VAE_FACTORS[1])
        for file, key, value in ((folder / "transformer" / "config.json", "patch_size", min(t["patch_size"])),
                                 (folder / "vae" / "config.json", "scale_factor_spatial", spatial),
                                 (folder / "vae" / "config.json", "scale_factor_temporal", temporal)):
            if value < 1:
                raise ValueError(f"{str(file)!r}: {key} must be positive, got {value!r}")
        defaults = WanDiTPipeline.generation_defaults
        height = defaults["height"] if height is None else height
        width = defaults["width"] if width is None else width
        num_frames = defaults["num_frames"] if num_frames is None else num_frames
        _check_sizes(height, width, num_frames, spatial * t["patch_size"][1], temporal)
        return height, width, num_frames

    def check_request(self, prompt, negative_prompt, height: int, width: int, num_frames: int,
                      num_inference_steps: int, guidance_scale: float, guidance_scale_2: float | None = None,
                      tensor_inputs=("latents",), output_type: str = "np") -> None:
        """Every input checked before any model runs (the first seven arguments: the video families' common
        check). Where diffusers would silently round a size or a frame count, this refuses it and names the value
        diffusers would have used instead."""
        if prompt is None or (not isinstance(prompt, str) and not (
                isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        _check_positive_int("num_inference_steps", num_inference_steps)
        patch = self.denoisers()[0].config.patch_size
        _check_sizes(height, width, num_frames, self.vae_scale_factor_spatial * patch[1],
                     self.vae_scale_factor_temporal)
        samplers.check_guidance_scale(guidance_scale)
        if guidance_scale_2 is not None:
            if self.config.boundary_ratio is None:
                raise ValueError("guidance_scale_2 is for two-expert (Wan 2.2 A14B) folders, whose pipeline has a "
                                 "boundary_ratio; this one has none")
            samplers.check_guidance_scale(guidance_scale_2)
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"output_type {output_type!r} is not one of 'np', 'pil', 'pt', 'latent'")
        bad = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback tensor inputs {sorted(bad)} are not among {self._callback_tensor_inputs}")

    @torch.no_grad()
    def __call__(
        self,
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
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = 512,
        solver: str | None = None,
    ) -> DiTPipelineOutput | tuple:
        """Generate videos; `solver` overrides the folder's sampler (e.g. "euler")."""
        self.check_request(prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                           guidance_scale_2, callback_on_step_end_tensor_inputs, output_type)
        _check_positive_int("num_videos_per_prompt", num_videos_per_prompt)
        spec = self._sampler(num_inference_steps)
        do_cfg = guidance_scale > 1.0
        model = self.denoisers()[0]
        pe, npe = self.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance=do_cfg,
                                     num_videos_per_prompt=num_videos_per_prompt,
                                     max_sequence_length=max_sequence_length, device=self._execution_device)
        state = {"prompt_embeds": pe.to(model.dtype), "negative_prompt_embeds": None if npe is None else
                 npe.to(model.dtype)}
        latents = self.prepare_latents(pe.shape[0], model.config.in_channels, height, width, num_frames,
                                       torch.float32, self._execution_device, generator, latents)  # (B, C, F', H', W')
        latents = self._sample(self._model_fn(state, do_cfg, attention_kwargs), latents, spec,
                               guidance_scale=self._guidance(guidance_scale, guidance_scale_2),
                               callback_on_step_end=callback_on_step_end,
                               tensor_inputs=callback_on_step_end_tensor_inputs, state=state, solver=solver,
                               generator=generator)
        return self._finish(latents, output_type, return_dict)

    def _boundary(self) -> float | None:
        """The timestep from which the high-noise expert (`transformer`) runs; None with one expert."""
        ratio = self.config.boundary_ratio
        return None if ratio is None else ratio * self.scheduler.config.num_train_timesteps

    def _guidance(self, guidance_scale: float, guidance_scale_2: float | None) -> float | Callable:
        """The constant scale, or with two experts a scale per timestep (the low-noise expert's own)."""
        boundary = self._boundary()
        if boundary is None or guidance_scale <= 1.0:
            return guidance_scale
        low = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        return lambda t: guidance_scale if float(t) >= boundary else low

    def _model_fn(self, state: dict, do_cfg: bool, attention_kwargs: dict | None) -> Callable:
        """The expert for t as model_fn(x, t) on latents (B, C, F', H', W'); conditioning [uncond, cond] under
        guidance. TI2V (expand_timesteps) gives every latent token the step's timestep, as diffusers does."""
        boundary = self._boundary()

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            model = self.transformer if boundary is None or float(t) >= boundary else self.transformer_2
            context = (torch.cat([state["negative_prompt_embeds"], state["prompt_embeds"]]) if do_cfg
                       else state["prompt_embeds"])
            p = model.config.patch_size
            t = t.to(device=x.device, dtype=torch.float32)
            if self.config.expand_timesteps:  # (B, F' x H'/p x W'/p): one timestep per token
                tokens = x.shape[2] // p[0] * (x.shape[3] // p[1]) * (x.shape[4] // p[2])
                timestep = t.reshape(1, 1).expand(x.shape[0], tokens)
            else:
                timestep = t.reshape(1).expand(x.shape[0])
            return model(hidden_states=x.to(model.dtype), timestep=timestep, encoder_hidden_states=context,
                         attention_kwargs=attention_kwargs, return_dict=False)[0].float()

        return model_fn

    def _finish(self, latents: torch.Tensor, output_type: str, return_dict: bool) -> Any:
        """Latents (B, C, F', H', W') -> frames: undo the VAE's per-channel normalisation, decode, post-process."""
        if output_type == "latent":
            video = latents
        else:
            cfg = self.vae.config
            mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
            std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
            z = latents.to(self.vae.dtype) * std.to(latents.device, self.vae.dtype) + mean.to(latents.device,
                                                                                               self.vae.dtype)
            video = self.video_processor.postprocess_video(self.vae.decode(z, return_dict=False)[0],
                                                           output_type=output_type)
        self.maybe_free_model_hooks()
        return DiTPipelineOutput(frames=video) if return_dict else (video,)
