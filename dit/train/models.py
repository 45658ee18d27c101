"""What the trainer trains: a transformer with its frozen VAE, text encoder(s) and scheduler config.

`ModelBundle` hides the family differences behind four calls: encode_text, encode_posterior, forward and
pipeline. CogVideoX (video, T5) is built from scratch or loaded from a diffusers folder; SD3 (images, CLIP + T5)
is loaded from a diffusers StableDiffusion3Pipeline folder; Wan 2.1 / 2.2 text-to-video (UMT5, our WanVAE3D from
the folder's AutoencoderKLWan, our WanTransformer3DModel) from a diffusers WanPipeline folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dit.train.config import ModelConfig, ObjectiveConfig

# A CogVideoX-style transformer small enough for CPU tests; text keys follow the text encoder's config.
COGVIDEOX_TINY: dict[str, Any] = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32, num_layers=2,
    sample_width=4, sample_height=4, sample_frames=9, patch_size=1, temporal_compression_ratio=4,
)
# The smallest CogVideoX VAE layout (4 levels: x8 space, x4 time), frozen and random in smoke runs.
VAE_TINY: dict[str, Any] = dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                norm_num_groups=2, sample_height=32, sample_width=32, scaling_factor=1.0)
# Wan's text length: WanPipeline's (and our WanDiTPipeline's) max_sequence_length default, so training sees the
# prompts as validation and `dit generate` encode them.
WAN_TEXT_LENGTH = 512


def _transformer_presets() -> dict[str, tuple[str, dict[str, Any]]]:
    from dit.models.cogvideox import COGVIDEOX_2B, COGVIDEOX_5B

    # SD3 is trained from a diffusers folder only (its CLIP + T5 encoders and 2D VAE are not built from scratch).
    return {"cogvideox-2b": ("cogvideox", COGVIDEOX_2B), "cogvideox-5b": ("cogvideox", COGVIDEOX_5B),
            "cogvideox-tiny": ("cogvideox", COGVIDEOX_TINY)}


@dataclass
class ModelBundle:
    """The trained transformer and the frozen parts around it."""

    family: str
    transformer: nn.Module
    vae: nn.Module
    tokenizers: list[Any]
    text_encoders: list[nn.Module]
    scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)

    # -- shapes ------------------------------------------------------------------------------------------------------

    @property
    def max_text_length(self) -> int:
        if self.family == "cogvideox":
            return int(self.transformer.config.max_text_seq_length)
        return WAN_TEXT_LENGTH if self.family == "wan" else 77

    @property
    def is_video(self) -> bool:
        """Video families sample clips (validation writes mp4); SD3 samples images."""
        return self.family != "sd3"

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, *self.text_encoders]

    def check_sizes(self, buckets: list[tuple[int, int, int]]) -> None:
        """Wan: every (height, width, frames) bucket fits the folder's VAE and patch size (as its pipeline checks
        a request), refused before any step instead of failing inside the VAE or the transformer."""
        if self.family != "wan":
            return
        from dit.pipeline.wan import WanDiTPipeline

        for h, w, f in buckets:
            try:
                WanDiTPipeline.check_folder_request(self.extra["folder"], h, w, f)
            except ValueError as e:
                raise ValueError(f"data: bucket [{h}, {w}, {f}] does not fit this Wan model: {e}") from None

    # -- conditioning ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, Tensor]:
        """Text conditioning for a batch of captions, as the family's pipeline computes it."""
        if self.family == "cogvideox":
            from dit.text import encode_prompts

            emb, _ = encode_prompts(captions, self.tokenizers[0], self.text_encoders[0],
                                    max_length=self.max_text_length, device=device)
            return {"encoder_hidden_states": emb}
        if self.family == "wan":
            # WanPipeline.encode_prompt itself: Wan's prompt cleaning, UMT5, each prompt's embedding trimmed to its
            # length and zero-padded to max_sequence_length.
            emb, _ = self.extra["pipe"].encode_prompt(prompt=captions, do_classifier_free_guidance=False,
                                                      max_sequence_length=self.max_text_length, device=device)
            return {"encoder_hidden_states": emb}
        pipe = self.extra["pipe"]
        emb, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, device=device,
                                               do_classifier_free_guidance=False, max_sequence_length=self.max_text_length)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    @torch.no_grad()
    def encode_posterior(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(B, F, 3, H, W) in [-1, 1] -> the VAE posterior's (mean, std), scaled into the transformer's latent
        space and layout: CogVideoX (B, F', C, H', W'), Wan (B, C, F', H', W'), SD3 (B, C, H', W') from the
        first frame."""
        cfg = self.vae.config
        dtype = next(self.vae.parameters()).dtype
        if self.family == "wan":
            return self._wan_posterior(video.permute(0, 2, 1, 3, 4).to(dtype))
        if self.family == "cogvideox":
            dist = self.vae.encode(video.permute(0, 2, 1, 3, 4).to(dtype)).latent_dist  # in: (B, 3, F, H, W)
            mean, std = dist.mean * cfg.scaling_factor, dist.std * cfg.scaling_factor
            return mean.permute(0, 2, 1, 3, 4).float(), std.permute(0, 2, 1, 3, 4).float()  # (B, F', C, H', W')
        dist = self.vae.encode(video[:, 0].to(dtype)).latent_dist  # (B, C, H', W')
        shift = cfg.shift_factor or 0.0
        return ((dist.mean - shift) * cfg.scaling_factor).float(), (dist.std * cfg.scaling_factor).float()

    def _wan_posterior(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """The Wan VAE (WanVAE3D) on (B, 3, F, H, W): z = (posterior - latents_mean) / latents_std per channel, the
        inverse of WanPipeline's decode (latents x std + mean), so a sample's std scales by 1 / latents_std."""
        cfg = self.vae.config
        dist = self.vae.encode(video).latent_dist  # (B, z_dim, F', H', W')
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=video.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=video.device).view(1, -1, 1, 1, 1)
        return (dist.mean.float() - mean) / std, dist.std.float() / std

    @staticmethod
    def sample_posterior(mean: Tensor, std: Tensor, generator: torch.Generator | None) -> Tensor:
        """z = mean + std * n with n from `generator` (so a cached posterior trains exactly like on-the-fly encoding)."""
        n = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + std * n

    def forward(self, model: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The (possibly accelerate-wrapped) transformer on noisy latents at model timesteps t (B,)."""
        return model(hidden_states=x, timestep=t, return_dict=False, **cond)[0]

    # -- export ------------------------------------------------------------------------------------------------------

    def pipeline(self, transformer: nn.Module | None = None):
        """A pipeline around (a copy of) the transformer: ours for CogVideoX and Wan, diffusers' for SD3."""
        transformer = self.transformer if transformer is None else transformer
        if self.family == "cogvideox":
            from dit.pipeline import CogVideoXDiTPipeline

            return CogVideoXDiTPipeline(tokenizer=self.tokenizers[0], text_encoder=self.text_encoders[0], vae=self.vae,
                                        transformer=transformer, scheduler=self.scheduler)
        p = self.extra["pipe"]
        if self.family == "wan":
            from dit.pipeline.wan import WanDiTPipeline

            return WanDiTPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=self.vae,
                                  scheduler=self.scheduler, transformer=transformer,
                                  expand_timesteps=bool(p.config.expand_timesteps))
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(transformer=transformer, scheduler=self.scheduler, vae=self.vae,
                                        text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                                        text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2,
                                        text_encoder_3=p.text_encoder_3, tokenizer_3=p.tokenizer_3)


def _scheduler(family: str, objective: ObjectiveConfig):
    """The sampling scheduler that matches the training objective (saved into the pipeline folder)."""
    from diffusers import CogVideoXDDIMScheduler, FlowMatchEulerDiscreteScheduler

    if objective.kind == "flow_matching" or (objective.kind == "relay" and objective.relay_path == "flow"):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=objective.num_train_timesteps, shift=objective.flow_shift)
    return CogVideoXDDIMScheduler(num_train_timesteps=objective.num_train_timesteps,
                                  beta_schedule=objective.beta_schedule, beta_start=objective.beta_start,
                                  beta_end=objective.beta_end, prediction_type="v_prediction",
                                  rescale_betas_zero_snr=True, snr_shift_scale=objective.snr_shift_scale,
                                  timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)


def _scratch_cogvideox(cfg: ModelConfig, objective: ObjectiveConfig) -> ModelBundle:
    from dit.data import caption_words
    from dit.models.cogvideox import CogVideoXTransformer3DModel
    from dit.text import build_tiny_t5_encoder, build_word_tokenizer
    from vae3d import PRESETS as VAE_PRESETS
    from vae3d import CausalVAE3D

    te = cfg.text_encoder
    tokenizer = build_word_tokenizer(caption_words(), max_length=te.max_length)
    encoder = build_tiny_t5_encoder(len(tokenizer), te.d_model, num_layers=te.num_layers, num_heads=te.num_heads,
                                    seed=te.seed)
    if cfg.transformer_preset is None and cfg.transformer is None:
        tcfg = None  # an autoencoder run: the VAE alone is trained
    elif cfg.transformer_preset is not None:
        family, preset = _transformer_presets()[cfg.transformer_preset]
        if family != "cogvideox":
            raise ValueError(f"model.transformer_preset {cfg.transformer_preset!r} is not a CogVideoX preset")
        tcfg = dict(preset, text_embed_dim=te.d_model, max_text_seq_length=te.max_length)
    else:
        tcfg = dict(cfg.transformer or {})
    for key, want in (("text_embed_dim", te.d_model), ("max_text_seq_length", te.max_length)):
        if tcfg is not None and tcfg.get(key) != want:
            raise ValueError(f"model.transformer.{key} is {tcfg.get(key)!r} but the text encoder gives {want} "
                             f"(model.text_encoder.{'d_model' if key == 'text_embed_dim' else 'max_length'})")
    try:
        transformer = CogVideoXTransformer3DModel(**tcfg) if tcfg is not None else None
    except TypeError as e:
        raise ValueError(f"model.transformer: {e}") from None
    if cfg.vae_pretrained is not None:
        from vae3d import load_vae

        vae = load_vae(cfg.vae_pretrained)
    elif cfg.vae_preset is not None:
        if cfg.vae_preset not in VAE_PRESETS and cfg.vae_preset != "micro":
            raise ValueError(f"model.vae_preset: unknown value {cfg.vae_preset!r}; accepted: micro, "
                             f"{', '.join(sorted(VAE_PRESETS))}")
        vae = CausalVAE3D(**VAE_TINY) if cfg.vae_preset == "micro" else CausalVAE3D.from_preset(cfg.vae_preset)
    else:
        try:
            vae = CausalVAE3D(**(cfg.vae or VAE_TINY))
        except TypeError as e:
            raise ValueError(f"model.vae: {e}") from None
    if transformer is not None and vae.config.latent_channels != transformer.config.in_channels:
        raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels but the transformer's in_channels "
                         f"is {transformer.config.in_channels}")
    return ModelBundle("cogvideox", transformer, vae.eval(), [tokenizer], [encoder.eval()],
                       _scheduler("cogvideox", objective))


def _pretrained(cfg: ModelConfig, objective: ObjectiveConfig) -> ModelBundle:
    import dit

    folder = Path(cfg.pretrained)
    index = json.loads((folder / "model_index.json").read_text())
    cls = index.get("_class_name")
    if cfg.family == "wan":
        return _pretrained_wan(folder, cls)
    transformer = dit.load_transformer(folder / "transformer")
    if cfg.family == "cogvideox":
        if cls != "CogVideoXPipeline":
            raise ValueError(f"model.pretrained: {str(folder)!r} holds a {cls}; model.family 'cogvideox' needs a "
                             "CogVideoXPipeline folder")
        from dit.text import load_text_encoder
        from vae3d import load_vae

        tokenizer, encoder = load_text_encoder(folder)
        return ModelBundle("cogvideox", transformer, load_vae(folder), [tokenizer], [encoder],
                           _scheduler("cogvideox", objective))
    if cls != "StableDiffusion3Pipeline":
        raise ValueError(f"model.pretrained: {str(folder)!r} holds a {cls}; model.family 'sd3' needs a "
                         "StableDiffusion3Pipeline folder")
    from diffusers import StableDiffusion3Pipeline

    # Components the folder leaves out (SD3 without T5, no image encoder) must be passed as None explicitly.
    absent = {name: None for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
              if not (isinstance(index.get(name), list) and index[name][0] is not None)}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=transformer, local_files_only=True, **absent)
    encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if e is not None]
    tokenizers = [t for t in (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3) if t is not None]
    return ModelBundle("sd3", transformer, pipe.vae.eval(), tokenizers, [e.eval() for e in encoders],
                       _scheduler("sd3", objective), extra={"pipe": pipe})


def _pretrained_wan(folder: Path, cls: str | None) -> ModelBundle:
    """A Wan 2.1 / 2.2 text-to-video folder through our WanDiTPipeline loader (allow-listed components, safetensors
    only): our transformer and VAE (WanVAE3D), UMT5 and tokenizer, and the folder's own scheduler (its
    flow shift is the training shift unless objective.shift says otherwise, see dit.train.config)."""
    if cls != "WanPipeline":
        raise ValueError(f"model.pretrained: {str(folder)!r} holds a {cls}; model.family 'wan' needs a WanPipeline "
                         "folder (text to video)")
    from dit.pipeline.wan import WanDiTPipeline

    pipe = WanDiTPipeline.from_pretrained(folder)
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError(f"model.pretrained: {str(folder)!r} is a two-expert Wan 2.2 folder (transformer_2, "
                         "boundary_ratio); training its experts is not supported yet: use a one-transformer folder")
    if pipe.transformer.config.in_channels != pipe.vae.config.z_dim:
        raise ValueError(f"model.pretrained: {str(folder)!r} has a transformer with in_channels "
                         f"{pipe.transformer.config.in_channels} for a {pipe.vae.config.z_dim}-channel VAE (an "
                         "image-to-video model); only text-to-video Wan folders are trained")
    sched = pipe.scheduler.config
    if not (sched.get("use_flow_sigmas") or "FlowMatch" in type(pipe.scheduler).__name__):
        raise ValueError(f"model.pretrained: {str(folder / 'scheduler')!r} holds a {type(pipe.scheduler).__name__} "
                         "without flow sigmas; Wan trains and samples on the flow-matching path")
    return ModelBundle("wan", pipe.transformer, pipe.vae.eval(), [pipe.tokenizer], [pipe.text_encoder.eval()],
                       pipe.scheduler, extra={"pipe": pipe, "folder": folder})


def build_bundle(cfg: ModelConfig, objective: ObjectiveConfig) -> ModelBundle:
    """The transformer (trainable) and its frozen VAE and text encoders, as the config says."""
    bundle = _pretrained(cfg, objective) if cfg.pretrained is not None else _scratch_cogvideox(cfg, objective)
    for module in bundle.frozen_modules():
        module.requires_grad_(False)
    if cfg.lora is not None:
        from peft import LoraConfig as PeftLoraConfig

        bundle.transformer.requires_grad_(False)
        lora = PeftLoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                              init_lora_weights=True, target_modules=list(cfg.lora.target_modules))
        try:
            bundle.transformer.add_adapter(lora)
        except ValueError as e:
            raise ValueError(f"model.lora.target_modules {cfg.lora.target_modules}: {str(e).splitlines()[0]}") from None
    return bundle
