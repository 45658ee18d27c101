"""Wan 2.1 / 2.2 text-to-video on our transformer and samplers: the same call and frames as diffusers' WanPipeline.

diffusers' prompt encoding (UMT5, Wan's prompt cleaning, embeddings trimmed to each prompt's length and padded
with zeros); our transformer, our VAE (vae3d's WanVAE3D, loaded from the folder's AutoencoderKLWan: streaming
decode, tiling, slicing, time sharding under torchrun), and the folder's scheduler run by our samplers through the
one denoising path. Wan 2.2 A14B has two experts: `transformer` for the high-noise steps (t >= boundary_ratio x T),
`transformer_2` for the rest, with its own guidance scale. TI2V-5B (`expand_timesteps`) takes one timestep per
latent token. `relay=k` adds a relay super-resolution stage (dit.pipeline.relay) on the flow path, run by the
low-noise expert.

`WanFamily` is what Wan's pipelines share (this one and dit.pipeline.wan_i2v's image-to-video): the command
line's hooks, the request check, the expert switch and its guidance, the model function, the VAE's latent
normalisation and the decode.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from diffusers import WanPipeline
from diffusers.utils.torch_utils import get_module_execution_device

import samplers
from dit.cache import CacheConfig
from dit.convert import read_folder_json, resolve
from dit.estimate import WAN_VAE_FACTORS
from dit.pipeline.base import (DiTPipeline, DiTPipelineOutput, _callback_tensor_inputs, _check_positive_int,
                               _check_prompt_or_embeds, _check_sizes)
from dit.pipeline.loading import PIPELINE_FAMILIES, _require_family


@dataclass
class ImageCondition:
    """What image-to-video adds to the model's input, for a batch of B.

    `latents`: without expand_timesteps (Wan 2.1 I2V, 2.2 A14B) the frame mask and the normalised VAE latents
    of the conditioning video, (B, k + C, F', H', W'), concatenated after the noise's C channels; with it (TI2V-5B)
    the normalised latents of the first frame, (B, C, 1, H', W'), which replace latent frame 0 wherever
    `first_frame_mask` (1, 1, F', H', W') is 0 (that frame's tokens also get timestep 0). `embeds`: the CLIP image
    tokens (B, M, E) (FLF2V: 2B, first and last frame adjacent) for a transformer with image cross-attention."""

    latents: torch.Tensor
    first_frame_mask: torch.Tensor | None = None
    embeds: torch.Tensor | None = None

    def for_guidance(self) -> "ImageCondition":
        """The condition for the doubled [uncond, cond] batch: both halves see the same image."""
        return ImageCondition(torch.cat([self.latents, self.latents]), self.first_frame_mask,
                              None if self.embeds is None else torch.cat([self.embeds, self.embeds]))

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer's hidden_states for the latents x (B, C, F', H', W')."""
        if self.first_frame_mask is None:
            return torch.cat([x, self.latents], dim=1)
        return self.hold_first_frame(x)

    def hold_first_frame(self, x: torch.Tensor) -> torch.Tensor:
        """TI2V: latent frame 0 replaced by the image's (the same arithmetic as diffusers, so bit for bit)."""
        return (1 - self.first_frame_mask) * self.latents + self.first_frame_mask * x


class WanFamily:
    """What Wan's pipelines share; mixed in before DiTPipeline and diffusers' pipeline class."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    supports_relay = True  # `relay=k`: a relay stage on the base result (`_relay`)
    requires_image = False  # the image-to-video family: `dit generate` needs --image
    # diffusers' Wan pipelines' call defaults (fps: the 16 of diffusers' Wan examples); a folder's
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

    @classmethod
    def check_folder_request(cls, folder: str | os.PathLike, height: int | None, width: int | None,
                             num_frames: int | None) -> tuple[int, int, int]:
        """Fill the defaults (generation_defaults, diffusers' Wan pipelines') and check the sizes against the
        transformer's patch_size and the VAE's scale factors, from the folder's config files alone."""
        folder = Path(folder)
        cls._require_folder(folder)
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
        defaults = cls.generation_defaults
        height = defaults["height"] if height is None else height
        width = defaults["width"] if width is None else width
        num_frames = defaults["num_frames"] if num_frames is None else num_frames
        _check_sizes(height, width, num_frames, spatial * t["patch_size"][1], temporal)
        return height, width, num_frames

    @classmethod
    def _require_folder(cls, folder: Path) -> None:
        """The folder is one this class runs (check_folder_request called on another family's folder)."""
        _require_family(folder, cls)

    @classmethod
    def image_family(cls, folder: str | os.PathLike) -> type | None:
        """The pipeline class that runs this folder from an image (`dit generate --image`); None for a text-only
        folder. Wan 2.2 TI2V-5B's WanPipeline folder runs either way, as diffusers' WanImageToVideoPipeline
        loads it too."""
        index = read_folder_json(folder, "model_index.json", what="a diffusers pipeline folder",
                                 optional={"expand_timesteps": bool})
        return resolve(PIPELINE_FAMILIES["WanImageToVideoPipeline"]) if index.get("expand_timesteps") else None

    def check_request(self, prompt, negative_prompt, height: int, width: int, num_frames: int,
                      num_inference_steps: int, guidance_scale: float, guidance_scale_2: float | None = None,
                      tensor_inputs=("latents",), output_type: str = "np", *,
                      prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None) -> None:
        """Every input checked before any model runs (the first seven arguments: the video families' common
        check). Where diffusers would silently round a size or a frame count, this refuses it and names the value
        diffusers would have used instead."""
        _check_prompt_or_embeds(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        _check_positive_int("num_inference_steps", num_inference_steps)
        patch = self.denoisers()[0].config.patch_size
        _check_sizes(height, width, num_frames, self.vae_scale_factor_spatial * patch[1],
                     self.vae_scale_factor_temporal, diffusers=self._diffusers_sizes(height, width, num_frames))
        samplers.check_guidance_scale(guidance_scale)
        if guidance_scale_2 is not None:
            if self.config.boundary_ratio is None:
                raise ValueError("guidance_scale_2 is for two-expert (Wan 2.2 A14B) folders, whose pipeline has a "
                                 "boundary_ratio; this one has none")
            samplers.check_guidance_scale(guidance_scale_2)
        self._check_outputs(output_type, tensor_inputs)

    def _diffusers_sizes(self, height: int, width: int, num_frames: int) -> tuple[str, dict[str, int | None]]:
        """What diffusers' Wan pipelines do with the sizes we refuse (for our errors to say): num_frames rounded to
        1 + kn, and a height or width that divides by 16 rounded down to a multiple of VAE x patch (one that does
        not, diffusers refuses too)."""
        k, patch = self.vae_scale_factor_temporal, self.denoisers()[0].config.patch_size
        multiple = self.vae_scale_factor_spatial * patch[1]
        return self.diffusers_class_name, {"num_frames": max(num_frames // k * k + 1, 1),
                                           **{name: None if value % 16 else value // multiple * multiple
                                              for name, value in (("height", height), ("width", width))}}

    # -- what diffusers' Wan pipelines keep during a call (callbacks and hooks read it) -----------------------------

    def _start_call(self, guidance_scale: float, guidance_scale_2: float | None, attention_kwargs: dict | None) -> None:
        """The properties diffusers' Wan pipelines set at the start of a call (guidance_scale_2 defaults to
        guidance_scale with two experts)."""
        if self.config.boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale
        super()._start_call(guidance_scale, guidance_scale_2=guidance_scale_2, attention_kwargs=attention_kwargs)

    # -- the steps of a call -----------------------------------------------------------------------------------------

    def _prompt_state(self, prompt, negative_prompt, do_cfg: bool, num_videos_per_prompt: int,
                      max_sequence_length: int, prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None) -> dict:
        """diffusers' prompt embeddings (or the ones passed) in the first expert's dtype: the state callbacks read
        and may replace, as diffusers' Wan pipelines hold it (positive and negative apart, both used at every
        step)."""
        dtype = self.denoisers()[0].dtype
        pe, npe = self.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance=do_cfg,
                                     num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
                                     negative_prompt_embeds=negative_prompt_embeds,
                                     max_sequence_length=max_sequence_length, device=self._execution_device)
        return {"prompt_embeds": pe.to(dtype), "negative_prompt_embeds": None if npe is None else npe.to(dtype)}

    def _stages(self, state: dict, *, guidance_scale: float, guidance_scale_2: float | None,
                attention_kwargs: dict | None, image_at: Callable[[int], ImageCondition] | None = None,
                **common: Any) -> Callable[..., torch.Tensor]:
        """run(expert, x, spec, factor, **runtime): a stage on the one denoising path (DiTPipeline._sample) with
        the experts, their guidance and the image; the base stage's with `expert` None (the switch at the
        boundary), the relay stage's (DiTPipeline._relay) with the expert that runs its every step. `image_at(k)`:
        the image condition at k times the base size (image-to-video; TI2V's first latent frame is held at the
        image's after the stage). Whether a step is guided is read at every step (`do_classifier_free_guidance`,
        which a callback may turn off), as in diffusers. `common`: _sample's callback, tensor inputs, generator
        and cache."""
        def run(expert: torch.nn.Module | None, x: torch.Tensor, spec: samplers.SamplerSpec, factor: int,
                **runtime: Any) -> torch.Tensor:
            image = None if image_at is None else image_at(factor)
            out = self._sample(self._model_fn(state, attention_kwargs, image, expert), x, spec,
                               guidance_scale=self._guidance(guidance_scale, guidance_scale_2, expert),
                               guide=lambda t: self.do_classifier_free_guidance, state=state, **common, **runtime)
            return out if image is None or image.first_frame_mask is None else image.hold_first_frame(out)

        return run

    def _relay_model(self) -> torch.nn.Module:
        """The relay stage's expert: the low-noise one. Relay starts below the two experts' boundary (T_r = 500 of
        1000 against 875 for Wan 2.2 A14B), where `transformer_2` is the one trained; with one expert,
        `transformer`."""
        return self.transformer if getattr(self, "transformer_2", None) is None else self.transformer_2

    def _boundary(self) -> float | None:
        """The timestep from which the high-noise expert (`transformer`) runs; None with one expert."""
        ratio = self.config.boundary_ratio
        return None if ratio is None else ratio * self.scheduler.config.num_train_timesteps

    def _guidance(self, guidance_scale: float, guidance_scale_2: float | None,
                  expert: torch.nn.Module | None = None) -> float | Callable:
        """The constant scale, or with two experts a scale per timestep (the low-noise expert's own); with one
        `expert` for every step, that expert's scale."""
        boundary = self._boundary()
        if boundary is None or guidance_scale <= 1.0:
            return guidance_scale
        low = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        if expert is not None:
            return guidance_scale if expert is self.transformer else low
        return lambda t: guidance_scale if float(t) >= boundary else low

    def _model_fn(self, state: dict, attention_kwargs: dict | None, image: ImageCondition | None = None,
                  expert: torch.nn.Module | None = None) -> Callable:
        """The expert for t (or `expert` for every t) as model_fn(x, t) on latents (B, C, F', H', W'), or on the
        guided [x, x] with the conditioning [uncond, cond]. expand_timesteps (TI2V) gives every latent token the
        step's timestep, as diffusers does, but 0 to the tokens of a first frame held at the image's latents."""
        boundary = self._boundary()
        guided_image = image.for_guidance() if image is not None else None

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            model = (expert if expert is not None else self.transformer if boundary is None or float(t) >= boundary
                     else self.transformer_2)
            doubled = x.shape[0] != state["prompt_embeds"].shape[0]
            context = (torch.cat([state["negative_prompt_embeds"], state["prompt_embeds"]]) if doubled
                       else state["prompt_embeds"])
            condition = guided_image if doubled else image
            p = model.config.patch_size
            t = t.to(device=x.device, dtype=torch.float32)
            if self.config.expand_timesteps:  # (B, F' x H'/p x W'/p): one timestep per token
                keep = (image.first_frame_mask[0, 0] if image is not None and image.first_frame_mask is not None
                        else torch.ones(x.shape[2:], device=x.device))  # (F', H', W')
                timestep = (keep[::p[0], ::p[1], ::p[2]] * t).flatten().unsqueeze(0).expand(x.shape[0], -1)
            else:
                timestep = t.reshape(1).expand(x.shape[0])
            hidden = x if condition is None else condition.model_input(x)
            return model(hidden_states=hidden.to(model.dtype), timestep=timestep, encoder_hidden_states=context,
                         encoder_hidden_states_image=None if condition is None else condition.embeds,
                         attention_kwargs=attention_kwargs, return_dict=False)[0].float()

        return model_fn

    # -- the VAE's latent space ----------------------------------------------------------------------------------

    def _latent_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latents_mean and latents_std, each (1, C, 1, 1, 1)."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
        return mean.to(device, dtype), std.to(device, dtype)

    def _normalise(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the transformer's latent space: (z - mean) / std (as diffusers: times 1 / std, fp32)."""
        cfg = self.vae.config
        mean, _ = self._latent_stats(z.device, torch.float32)
        inv_std = (1.0 / torch.tensor(cfg.latents_std)).view(1, cfg.z_dim, 1, 1, 1).to(z.device, torch.float32)
        return (z.float() - mean) * inv_std

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, F, H, W) -> the VAE posterior's mode, normalised to the transformer's latent space. Under
        time sharding (`dit generate` under torchrun) a clip with fewer frame batches than ranks (TI2V's one first
        frame) is encoded whole on every rank."""
        vae_device = get_module_execution_device(self.vae)
        with _whole_clip(self.vae, video.shape[2]):
            z = self.vae.encode(video.to(vae_device, self.vae.dtype)).latent_dist.mode()
        return self._normalise(z.to(self._execution_device))

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F', H', W') -> the VAE's frames (B, 3, F, H, W) in [-1, 1]: undo the per-channel
        normalisation, decode."""
        mean, std = self._latent_stats(latents.device, self.vae.dtype)
        return self.vae.decode(latents.to(self.vae.dtype) * std + mean, return_dict=False)[0]

    def _finish(self, latents: torch.Tensor, output_type: str, return_dict: bool) -> Any:
        """Latents (B, C, F', H', W') -> frames: decode, post-process."""
        if output_type == "latent":
            video = latents
        else:
            video = self.video_processor.postprocess_video(self._decode(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        return DiTPipelineOutput(frames=video) if return_dict else (video,)


@contextlib.contextmanager
def _whole_clip(vae: torch.nn.Module, frames: int) -> Iterator[None]:
    """The VAE's time sharding (vae3d's `enable_parallelism`) off while a clip of `frames` frames is encoded, when
    the clip has fewer of the VAE's frame batches than ranks (it cannot be sharded); on again afterwards. Every
    rank sees the same clip, so all of them take the same way."""
    tp = getattr(vae, "time_parallel", None)
    if tp is None:
        yield
        return
    import torch.distributed as dist

    from vae3d.streaming import frame_batches

    batches = frame_batches(frames, vae.num_sample_frames_batch_size, vae.frame_batching)
    if len(batches) >= dist.get_world_size(tp.group):
        yield
        return
    vae.time_parallel = None
    try:
        yield
    finally:
        vae.time_parallel = tp


class WanDiTPipeline(WanFamily, DiTPipeline, WanPipeline):
    """Text-to-video with Wan 2.1 (1.3B, 14B) and Wan 2.2 (A14B two-expert, TI2V-5B)."""

    diffusers_class_name = "WanPipeline"

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
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
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
        """Generate videos: diffusers' WanPipeline call (its arguments up to max_sequence_length, with its meaning:
        prompt embeddings instead of prompts, callbacks and properties). Ours: `solver` overrides the folder's
        sampler (e.g. "euler"); `relay=k` adds a relay stage (dit.pipeline.relay) to k x height by k x width:
        `relay_steps` steps from training step T_r = `relay_start` of the flow path, block noise of block size k,
        the base result upsampled in latent space (nearest or bilinear) or in pixels ("pixel": decode, upsample,
        encode)."""
        callback_on_step_end_tensor_inputs = _callback_tensor_inputs(callback_on_step_end,
                                                                     callback_on_step_end_tensor_inputs)
        self.check_request(prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                           guidance_scale_2, callback_on_step_end_tensor_inputs, output_type,
                           prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        _check_positive_int("num_videos_per_prompt", num_videos_per_prompt)
        spec = self._sampler(num_inference_steps)
        plan = self._plan_stages(cache, relay, relay_steps, relay_start, relay_upsample, relay_noise_alpha, relay_eta)
        self._start_call(guidance_scale, guidance_scale_2, attention_kwargs)
        state = self._prompt_state(prompt, negative_prompt, self.do_classifier_free_guidance, num_videos_per_prompt,
                                   max_sequence_length, prompt_embeds, negative_prompt_embeds)
        latents = self.prepare_latents(state["prompt_embeds"].shape[0], self.denoisers()[0].config.in_channels,
                                       height, width, num_frames, torch.float32, self._execution_device, generator,
                                       latents)  # (B, C, F', H', W')
        run = self._stages(state, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2,
                           attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
                           tensor_inputs=callback_on_step_end_tensor_inputs, generator=generator, cache=cache)
        latents = run(None, latents, spec, 1, solver=solver)
        latents = self._relay(plan, latents, run, to_pixels=self._decode, from_pixels=self._encode)
        return self._finish(latents, output_type, return_dict)
