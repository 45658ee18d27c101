"""CogVideoX text-to-video (1.0 2B/5B, 1.5) with an optional relay super-resolution stage."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch
from diffusers.loaders import CogVideoXLoraLoaderMixin
from diffusers.video_processor import VideoProcessor

import samplers
from dit.cache import CacheConfig
from dit.pipeline.base import (DiTPipeline, DiTPipelineOutput, _callback_tensor_inputs,
                               _check_positive_int, _check_prompt_or_embeds, _check_sizes)
from dit.pipeline.loading import _require_family
from dit.convert import (read_folder_json)


logger = logging.getLogger(__name__)


class CogVideoXDiTPipeline(DiTPipeline, CogVideoXLoraLoaderMixin):
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
        # vae=None (a pipeline that only encodes prompts): diffusers' CogVideoXPipeline's defaults
        cfg = self.vae.config if self.vae is not None else None
        self.vae_scale_factor_spatial = 2 ** (len(cfg.block_out_channels) - 1) if cfg is not None else 8
        self.vae_scale_factor_temporal = cfg.temporal_compression_ratio if cfg is not None else 4
        self.vae_scaling_factor_image = cfg.scaling_factor if cfg is not None else 0.7
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # -- inputs ------------------------------------------------------------------------------------------------------

    def default_size(self) -> tuple[int, int, int]:
        """(height, width, frames) the transformer was configured for."""
        cfg = self.transformer.config
        return cfg.sample_height * self.vae_scale_factor_spatial, cfg.sample_width * self.vae_scale_factor_spatial, \
            cfg.sample_frames

    def encode_prompt(self, prompt: str | list[str] | None, negative_prompt: str | list[str] | None = None,
                      do_classifier_free_guidance: bool = True, num_videos_per_prompt: int = 1,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      max_sequence_length: int = 226, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """diffusers' CogVideoXPipeline.encode_prompt: (prompt_embeds, negative_prompt_embeds), each (B, L, D), the
        negative ones (default "") only under classifier-free guidance, else None; embeddings passed in are kept."""
        device = device or self._execution_device
        prompt = [prompt] if isinstance(prompt, str) else prompt
        batch = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if prompt_embeds is None:
            prompt_embeds = self._t5_embeds(prompt, num_videos_per_prompt, max_sequence_length, device, dtype)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negative_prompt) != batch:
                raise ValueError(f"negative_prompt has {len(negative_prompt)} entries for {batch} prompts")
            negative_prompt_embeds = self._t5_embeds(negative_prompt, num_videos_per_prompt, max_sequence_length,
                                                     device, dtype)
        return prompt_embeds, negative_prompt_embeds

    def _t5_embeds(self, prompt: list[str], num_videos_per_prompt: int, max_sequence_length: int,
                   device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
        """T5 embeddings (B x num_videos_per_prompt, L, D), padded to max_sequence_length as CogVideoX was trained;
        words past it are dropped with a warning naming them (as diffusers' pipelines warn)."""
        ids = self.tokenizer(list(prompt), padding="max_length", max_length=max_sequence_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        self._warn_truncated(list(prompt), ids, max_sequence_length)
        embeds = self.text_encoder(ids.to(device))[0]
        embeds = embeds.to(dtype=dtype or self.text_encoder.dtype, device=device)
        return embeds.repeat_interleave(num_videos_per_prompt, dim=0)  # diffusers' repeat + view: the same order

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
                     num_inference_steps: int, guidance_scale: float, max_sequence_length: int = 226, *,
                     prompt_embeds: torch.Tensor | None = None,
                     negative_prompt_embeds: torch.Tensor | None = None) -> None:
        """Every user input checked before any model runs; each error names the value and what is accepted. A
        frame count that is not 1 + 4n is refused, and the error says what diffusers' CogVideoXPipeline returns
        for it (`_diffusers_frames`)."""
        _check_prompt_or_embeds(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if prompt is not None and negative_prompt_embeds is not None:  # diffusers' rule too
            raise ValueError("negative_prompt_embeds go with prompt_embeds: pass prompt_embeds instead of prompt, "
                             "or negative_prompt instead of negative_prompt_embeds")
        _check_positive_int("num_inference_steps", num_inference_steps)
        _check_positive_int("max_sequence_length", max_sequence_length)
        _check_sizes(height, width, num_frames, self.vae_scale_factor_spatial * self.transformer.config.patch_size,
                     self.vae_scale_factor_temporal,
                     diffusers=(self.diffusers_class_name, {"num_frames": self._diffusers_frames(num_frames)}))
        samplers.check_guidance_scale(guidance_scale)

    def _diffusers_frames(self, num_frames: int) -> str:
        """What diffusers' CogVideoXPipeline returns for num_frames: (n - 1) // k + 1 latent frames, decoded by its
        VAE two at a time (the first batch takes an odd remainder): an odd batch keeps its first frame (1 + k(m - 1)
        frames), an even one upsamples every frame, the causal first one included (k m frames)."""
        k = self.vae_scale_factor_temporal
        latent = (num_frames - 1) // k + 1
        if latent % 2:
            return f"{k * (latent - 1) + 1} frames"
        return f"{k * latent} frames, decoding its first latent frame as {k}"

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

    def _to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, F, C, H, W) -> the VAE's frames (B, C, F, H, W) in [-1, 1] (the relay's pixel upsampling)."""
        return self.vae.decode(latents.permute(0, 2, 1, 3, 4) / self.vae_scaling_factor_image).sample

    def _from_pixels(self, video: torch.Tensor) -> torch.Tensor:
        """Frames (B, C, F, H, W) -> latents (B, F, C, H', W'): the VAE posterior's mode, scaled."""
        z = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode() * self.vae_scaling_factor_image
        return z.permute(0, 2, 1, 3, 4)

    # -- what diffusers' CogVideoXPipeline keeps during a call (callbacks and hooks read it) -----------------------

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def attention_kwargs(self) -> dict | None:
        return self._attention_kwargs

    @property
    def current_timestep(self) -> torch.Tensor | None:
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

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
        timesteps: list[int] | None = None,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int | None = None,
        solver: str | None = None,
        cache: CacheConfig | None = None,
        relay: int | None = None,
        relay_steps: int = 10,
        relay_start: int = 500,
        relay_upsample: str = "latent-nearest",
        relay_noise_alpha: float = 0.15,
        relay_eta: float = 0.0,
    ) -> DiTPipelineOutput | tuple:
        """Generate videos: diffusers' CogVideoXPipeline call (its arguments up to max_sequence_length, with its
        meaning: `prompt_embeds` / `negative_prompt_embeds` instead of prompts, custom `timesteps` where the
        scheduler takes them, callbacks and properties). Ours: `solver` overrides the scheduler's solver (e.g.
        "dpmpp_2m"); `relay=k` adds the relay super-resolution stage described in the class docstring."""
        callback_on_step_end_tensor_inputs = _callback_tensor_inputs(callback_on_step_end,
                                                                     callback_on_step_end_tensor_inputs)
        height, width, num_frames, max_sequence_length = self._call_defaults(height, width, num_frames,
                                                                            max_sequence_length)
        self.check_inputs(prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                          max_sequence_length, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds)
        self._check_call(num_videos_per_prompt, output_type, callback_on_step_end_tensor_inputs)
        spec = self._sampler(num_inference_steps, timesteps=timesteps)
        plan = self._plan_stages(cache, relay, relay_steps, relay_start, relay_upsample, relay_noise_alpha, relay_eta)
        self._start_call(guidance_scale, attention_kwargs=attention_kwargs)
        do_cfg = guidance_scale > 1.0
        state = self._encode_state(prompt, negative_prompt, do_cfg, max_sequence_length, prompt_embeds,
                                   negative_prompt_embeds)
        latents, extra = self._initial_latents(state["prompt_embeds"], do_cfg, num_frames, height, width, generator,
                                               latents)

        def run(transformer, x: torch.Tensor, stage: samplers.SamplerSpec, _factor: int, **runtime) -> torch.Tensor:
            return self._sample(self._model_fn(transformer, state, attention_kwargs), x, stage,
                                guidance_scale=self._stage_scale(guidance_scale, use_dynamic_cfg, len(stage.schedule)),
                                guide=lambda t: do_cfg, callback_on_step_end=callback_on_step_end,
                                tensor_inputs=callback_on_step_end_tensor_inputs, state=state, generator=generator,
                                cache=cache, **runtime)

        latents = run(self.transformer, latents, spec, 1, solver=solver, eta=eta)[:, extra:]  # padding dropped
        latents = self._relay(plan, latents, run, to_pixels=self._to_pixels, from_pixels=self._from_pixels)
        return self._finish_video(latents, output_type, return_dict)

    def _stage_scale(self, guidance_scale: float, use_dynamic_cfg: bool, steps: int) -> Callable[[torch.Tensor], float]:
        """A stage's guidance scale, read at every step: a callback may change pipe._guidance_scale; with
        use_dynamic_cfg, CogVideoX's cosine scale for the stage's `steps` from the call's guidance_scale, set on
        the pipeline at every step (as diffusers does, whatever a callback set)."""
        dynamic = samplers.cogvideox_dynamic_scale(guidance_scale, steps) if use_dynamic_cfg else None

        def scale(t: torch.Tensor) -> float:
            if dynamic is not None:
                self._guidance_scale = dynamic(t)
            return self._guidance_scale

        return scale

    def _call_defaults(self, height: int | None, width: int | None, num_frames: int | None,
                       max_sequence_length: int | None) -> tuple[int, int, int, int]:
        """The model's defaults where the call gave None (only None: 0 is a size like any other, refused later)."""
        default_height, default_width, default_frames = self.default_size()
        max_text = self.transformer.config.max_text_seq_length  # 226 for released CogVideoX
        return (default_height if height is None else height, default_width if width is None else width,
                default_frames if num_frames is None else num_frames,
                max_text if max_sequence_length is None else max_sequence_length)

    def _check_call(self, num_videos_per_prompt: int, output_type: str, tensor_inputs) -> None:
        if num_videos_per_prompt != 1:
            raise ValueError(f"num_videos_per_prompt must be 1 (as in CogVideoXPipeline), got {num_videos_per_prompt}")
        self._check_outputs(output_type, tensor_inputs)

    def _encode_state(self, prompt, negative_prompt, do_cfg: bool, max_sequence_length: int,
                      prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None) -> dict:
        """The state callbacks read and may replace, as diffusers' CogVideoXPipeline holds it: under guidance
        `prompt_embeds` is the [negative; positive] batch the transformer sees, `negative_prompt_embeds` the
        negative half (replacing it changes nothing from then on, as in diffusers)."""
        pe, npe = self.encode_prompt(prompt, negative_prompt, do_cfg, prompt_embeds=prompt_embeds,
                                     negative_prompt_embeds=negative_prompt_embeds,
                                     max_sequence_length=max_sequence_length, device=self._execution_device)
        return {"prompt_embeds": torch.cat([npe, pe]) if do_cfg else pe, "negative_prompt_embeds": npe}

    def _initial_latents(self, embeds: torch.Tensor, do_cfg: bool, num_frames: int, height: int, width: int,
                         generator, latents: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Noise (B, F', C, H', W') in the prompt embeddings' dtype (`embeds`: the transformer's, doubled under
        guidance) and the padding frames it has: CogVideoX 1.5 pads the latent frames to a multiple of
        patch_size_t (dropped again before decoding)."""
        cfg, k = self.transformer.config, self.vae_scale_factor_temporal
        latent_frames = (num_frames - 1) // k + 1
        extra = -latent_frames % cfg.patch_size_t if cfg.patch_size_t is not None else 0
        shape = (embeds.shape[0] // (2 if do_cfg else 1), latent_frames + extra, cfg.in_channels,
                 height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
        if latents is None:
            return samplers.solvers.randn(shape, generator=generator, device=embeds.device, dtype=embeds.dtype), extra
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
        return latents.to(device=embeds.device, dtype=embeds.dtype), extra

    @staticmethod
    def _model_fn(transformer, state: dict, attention_kwargs: dict | None) -> Callable:
        """The transformer as model_fn(x, t) on the state's prompt_embeds ([uncond, cond] under guidance); positions
        are the model's own (it computes the same RoPE tables diffusers' pipeline passes)."""
        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return transformer(hidden_states=x, encoder_hidden_states=state["prompt_embeds"], timestep=t.to(
                x.device).expand(x.shape[0]), attention_kwargs=attention_kwargs, return_dict=False)[0].float()

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

