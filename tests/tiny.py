"""Tiny random-weight diffusers pipelines, built offline and saved into a folder (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "red", "green", "blue", "circle", "square", "moving", "left", "right", "on", "background", "the", "cat"]


def tiny_tokenizer(max_length: int = 16):
    """A word-level fast tokenizer built in memory (pad 0, eos 1, unk 2, like T5's ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_t5(d_model: int = 16, vocab: int = len(WORDS) + 3):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8)).eval()


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Seeded normal weights everywhere: zero-initialised layers would make parity trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_cogvideox_pipeline(folder: Path, *, rotary: bool = False, scheduler: str = "ddim", text_len: int = 16):
    """Save a tiny diffusers CogVideoXPipeline into `folder` and return the diffusers pipeline."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16 if rotary else 8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=text_len, use_rotary_positional_embeddings=rotary,
    )
    randomize(transformer, 1, 0.2)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    sched_cls = CogVideoXDDIMScheduler if scheduler == "ddim" else CogVideoXDPMScheduler
    sched = sched_cls(beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
                      snr_shift_scale=3.0, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    pipe = CogVideoXPipeline(tokenizer=tiny_tokenizer(text_len), text_encoder=tiny_t5(), vae=vae.eval(),
                             transformer=transformer.eval(), scheduler=sched)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def _clip_vocab() -> dict:
    """A byte-level CLIP vocabulary without merges (every byte is a token): a tokenizer built offline."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):  # GPT-2's bytes_to_unicode: unprintable bytes map above 255
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in chars:
            vocab[ch + suffix] = len(vocab)
    return vocab


def sd3_pipeline(transformer, *, scheduler=None, vae_blocks: tuple[int, ...] = (4, 4)):
    """A diffusers StableDiffusion3Pipeline around `transformer`: tiny seeded VAE, two tiny CLIPs, no T5."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = _clip_vocab()

    def clip(seed: int):
        torch.manual_seed(seed)
        cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                             num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab), projection_dim=32,
                             max_position_embeddings=77)
        return CLIPTextModelWithProjection(cfg).eval()

    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=vae_blocks,
                        layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), transformer=transformer,
        text_encoder=clip(1), tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        text_encoder_2=clip(2), tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(folder: Path, *, dynamic_shift: bool = False, sd35: bool = False):
    """Save a tiny diffusers StableDiffusion3Pipeline (two tiny CLIPs, no T5) into `folder`; return it. sd35: SD3.5's
    transformer (q/k RMS norms, a dual-attention first block)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    transformer = randomize(SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32, **(dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {})), 3,
        0.1).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0) if not dynamic_shift else FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True)
    pipe = sd3_pipeline(transformer, scheduler=sched)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def tiny_cogview3plus_pipeline(folder: Path, *, scheduler: str = "ddim"):
    """Save a tiny diffusers CogView3PlusPipeline into `folder` and return it."""
    from diffusers import (AutoencoderKL, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogView3PlusPipeline,
                           CogView3PlusTransformer2DModel)

    torch.manual_seed(0)
    transformer = randomize(CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=16, time_embed_dim=8, condition_dim=2, pos_embed_max_size=16, sample_size=8), 5, 0.1).eval()
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    sched_cls = CogVideoXDDIMScheduler if scheduler == "ddim" else CogVideoXDPMScheduler
    sched = sched_cls(prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=4.0,
                      timestep_spacing="trailing", clip_sample=False)
    pipe = CogView3PlusPipeline(tokenizer=tiny_tokenizer(16), text_encoder=tiny_t5(), vae=vae.eval(),
                                transformer=transformer, scheduler=sched)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def tiny_umt5(d_model: int = 32, vocab: int = len(WORDS) + 3):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                       relative_attention_num_buckets=8)).eval()


def tiny_wan_transformer(seed: int, *, channels: int = 16, text_dim: int = 32, in_channels: int | None = None,
                         image_dim: int | None = None, pos_embed_seq_len: int | None = None):
    """in_channels: I2V's noise + mask + image latents (default: channels); image_dim: CLIP image cross-attention
    (Wan 2.1 I2V), its added_kv_proj_dim the model width 24; pos_embed_seq_len: FLF2V's two images' tokens."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                  in_channels=in_channels or channels, out_channels=channels, text_dim=text_dim,
                                  freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
                                  added_kv_proj_dim=None if image_dim is None else 24,
                                  pos_embed_seq_len=pos_embed_seq_len)
    return randomize(model, seed, 0.1).eval()


def tiny_picture(seed: int, size: tuple[int, int] = (40, 48)):
    """A seeded RGB noise picture (PIL), height x width `size`: another size than the tiny videos (pipelines
    resize it)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


CLIP_TOKENS = 17  # the tiny CLIP vision model's tokens: (32 / 8)^2 patches + the class token


def tiny_clip_vision(seed: int = 4, *, projection: bool = True):
    """A tiny CLIP vision model (hidden 16, 32x32 images in 8x8 patches), seeded: CLIPVisionModelWithProjection
    as Wan 2.1 I2V folders name it, or CLIPVisionModel as diffusers' example loads it."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=3,
                           image_size=32, patch_size=8, projection_dim=16)
    model = (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(cfg)
    return randomize(model, seed, 0.1).eval()


def tiny_clip_image_processor():
    """CLIP's preprocessing at 32x32 (resize the short side, centre crop, CLIP's mean and std); the PIL backend, as
    transformers 5's CLIPImageProcessor needs torchvision."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def tiny_wan_i2v_pipeline(folder: Path, *, two_experts: bool = False, flf2v: bool = False, projection: bool = True,
                          scheduler: str = "unipc"):
    """Save a tiny diffusers WanImageToVideoPipeline into `folder` and return it: Wan 2.1 I2V (a tiny CLIP image
    encoder, image cross-attention; flf2v: first-last-frame positions) or Wan 2.2 I2V A14B-shaped (two experts,
    boundary_ratio 0.875, no image encoder). The transformers take 16 + 4 + 16 channels: noise, mask, image."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
    from diffusers import WanImageToVideoPipeline

    torch.manual_seed(0)
    z = 16
    vae = AutoencoderKLWan(base_dim=3, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    sched = (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
             if scheduler == "unipc" else FlowMatchEulerDiscreteScheduler(shift=7.0))
    image = None if two_experts else dict(image_dim=16, pos_embed_seq_len=2 * CLIP_TOKENS if flf2v else None)
    pipe = WanImageToVideoPipeline(
        tokenizer=tiny_tokenizer(16), text_encoder=tiny_umt5(), vae=vae.eval(), scheduler=sched,
        image_encoder=None if two_experts else tiny_clip_vision(projection=projection),
        image_processor=None if two_experts else tiny_clip_image_processor(),
        transformer=tiny_wan_transformer(2, channels=z, in_channels=2 * z + 4, **(image or {})),
        transformer_2=tiny_wan_transformer(3, channels=z, in_channels=2 * z + 4) if two_experts else None,
        boundary_ratio=0.875 if two_experts else None)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def tiny_wan_pipeline(folder: Path, *, two_experts: bool = False, ti2v: bool = False, scheduler: str = "unipc"):
    """Save a tiny diffusers WanPipeline into `folder` and return it: Wan 2.1 (one expert), Wan 2.2 A14B-shaped
    (two experts, boundary_ratio 0.875) or TI2V-5B-shaped (48-channel residual VAE, expand_timesteps)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(0)
    if ti2v:
        z = 48
        g = torch.Generator().manual_seed(1)
        vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                               in_channels=12, out_channels=12, scale_factor_spatial=16,
                               latents_mean=(torch.randn(z, generator=g) * 0.3).tolist(),
                               latents_std=(torch.rand(z, generator=g) + 0.5).tolist())
    else:
        z = 16
        vae = AutoencoderKLWan(base_dim=3, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    sched = (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
             if scheduler == "unipc" else FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe = WanPipeline(tokenizer=tiny_tokenizer(16), text_encoder=tiny_umt5(), vae=vae.eval(), scheduler=sched,
                       transformer=tiny_wan_transformer(2, channels=z),
                       transformer_2=tiny_wan_transformer(3, channels=z) if two_experts else None,
                       boundary_ratio=0.875 if two_experts else None, expand_timesteps=ti2v)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


IMAGENET_LABELS = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus",
                   2: "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
                   207: "golden retriever", 281: "tabby, tabby cat", 360: "otter"}  # a few of ImageNet's id2label


def tiny_dit_pipeline(folder: Path, *, scheduler: str = "dpm"):
    """Save a tiny diffusers (class-conditional) DiTPipeline into `folder` and return it: a learned-sigma
    DiTTransformer2DModel with ImageNet's 1000 classes (diffusers' pipeline hard-codes 1000 as the null class),
    16x16 images from 8x8 latents, and model_index.json's id2label (IMAGENET_LABELS), as released DiT folders
    have it (diffusers' save_pretrained leaves it out)."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    transformer = randomize(DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1), 6, 0.1).eval()
    vae = AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1)
    sched = DPMSolverMultistepScheduler() if scheduler == "dpm" else DDIMScheduler(clip_sample=False)
    pipe = DiTPipeline(transformer=transformer, vae=vae.eval(), scheduler=sched, id2label=IMAGENET_LABELS)
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in IMAGENET_LABELS.items()}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return pipe
