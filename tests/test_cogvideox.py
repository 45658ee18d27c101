"""CogVideoX: parity with diffusers on copied weights (2B, 5B, learned positions, 1.5), RoPE, validation, training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel as DiffusersCogVideoX
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline, get_resize_crop_region_for_grid

from dit.models.cogvideox import (COGVIDEOX_1_5_5B, COGVIDEOX_1_5_5B_I2V, COGVIDEOX_2B, COGVIDEOX_5B,
                                  COGVIDEOX_5B_I2V, CogVideoXBlock, CogVideoXTransformer3DModel)
from dit.rope import cogvideox_rope, rope_as_complex
from tests.helpers_dit import param_count, randomize_, rel_max_diff, save_and_load

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=24, num_layers=2, sample_width=8, sample_height=6, sample_frames=9, max_text_seq_length=7)
MEDIUM = dict(num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
              text_embed_dim=128, num_layers=4, sample_width=12, sample_height=8, sample_frames=9,
              max_text_seq_length=16)
VARIANTS = {
    "2b-sincos": dict(),
    "5b-rope": dict(use_rotary_positional_embeddings=True),
    "5b-learned": dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
    "1.5-tpatch-ofs": dict(use_rotary_positional_embeddings=True, patch_size_t=2, ofs_embed_dim=None, patch_bias=False),
}


def _config(size: dict, variant: str) -> dict:
    cfg = dict(size, **VARIANTS[variant])
    if variant.startswith("1.5"):
        cfg["ofs_embed_dim"] = cfg["time_embed_dim"]
    return cfg


def _inputs(cfg: dict, batch: int = 2, seed: int = 1) -> dict:
    """Latents at the config's sample size (learned positions need it) and full-length text."""
    g = torch.Generator().manual_seed(seed)
    frames = (cfg["sample_frames"] - 1) // 4 + 1 + (1 if cfg.get("patch_size_t") else 0)  # 1.5: an even count
    kw = dict(
        hidden_states=torch.randn(batch, frames, cfg["in_channels"], cfg["sample_height"], cfg["sample_width"],
                                  generator=g),
        encoder_hidden_states=torch.randn(batch, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g),
        timestep=torch.tensor([17, 803][:batch]),
    )
    if cfg.get("ofs_embed_dim"):
        kw["ofs"] = torch.full((batch,), 2.0)
    return kw


def _pipeline_rope(model, latents: torch.Tensor):
    """image_rotary_emb exactly as diffusers' CogVideoXPipeline computes it for these latents."""
    fake_pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
    _, f, _, h, w = latents.shape
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(fake_pipe, h * 8, w * 8, f, latents.device)


def _pair(tmp_path, cfg: dict, seed: int = 0):
    # Weights ~ N(0, 0.3^2) at tiny width; at medium width 0.05 keeps activations in fp16 range.
    std = 0.3 if cfg["num_attention_heads"] * cfg["attention_head_dim"] <= 64 else 0.05
    ref = randomize_(DiffusersCogVideoX(**cfg), seed=seed, std=std)
    return ref, save_and_load(ref, tmp_path)


def _check_parity(tmp_path, cfg: dict, batch: int = 2):
    ref, ours = _pair(tmp_path, cfg)
    kw = _inputs(cfg, batch)
    rope = _pipeline_rope(ref, kw["hidden_states"]) if cfg.get("use_rotary_positional_embeddings") else None
    with torch.no_grad():
        expected = ref(**kw, image_rotary_emb=rope).sample
        computed = ours(**kw).sample  # the model builds its own positions / RoPE
        given = ours(**kw, image_rotary_emb=rope).sample
    assert computed.shape == expected.shape == kw["hidden_states"].shape[:2] + (cfg["out_channels"],) + \
        kw["hidden_states"].shape[3:]
    assert rel_max_diff(computed, expected) <= 1e-5
    torch.testing.assert_close(given, computed, rtol=0, atol=0)  # RoPE given == RoPE computed, bit for bit
    return ref, ours, kw, rope, expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_tiny_fp32(tmp_path, variant):
    _check_parity(tmp_path, _config(TINY, variant))


MEDIUM_DEFAULT = ["2b-sincos", "1.5-tpatch-ofs"]  # the other two medium variants run with -m slow
LOW_DEFAULT = [("TINY", v, torch.bfloat16) for v in VARIANTS] + [("TINY", "5b-rope", torch.float16),
                                                                  ("MEDIUM", "5b-rope", torch.bfloat16)]
LOW_SLOW = [("MEDIUM", v, d) for v in VARIANTS for d in (torch.bfloat16, torch.float16)
            if ("MEDIUM", v, d) not in LOW_DEFAULT] + [("TINY", v, torch.float16) for v in VARIANTS if v != "5b-rope"]


@pytest.mark.parametrize("variant", MEDIUM_DEFAULT + [pytest.param(v, marks=pytest.mark.slow)
                                                      for v in VARIANTS if v not in MEDIUM_DEFAULT])
def test_parity_medium_fp32(tmp_path, variant):
    _check_parity(tmp_path, _config(MEDIUM, variant), batch=1)


@pytest.mark.parametrize("size,variant,dtype", LOW_DEFAULT + [pytest.param(*c, marks=pytest.mark.slow) for c in LOW_SLOW])
def test_parity_low_precision(tmp_path, size, variant, dtype):
    """Ours in bf16/fp16 against diffusers' fp32 output (the truth), within 2e-2 of the output's scale."""
    cfg = _config({"TINY": TINY, "MEDIUM": MEDIUM}[size], variant)
    ref, ours, kw, rope, expected = _check_parity(tmp_path, cfg, batch=1 if size == "MEDIUM" else 2)
    ours = ours.to(dtype)
    low = {k: v.to(dtype) if v.is_floating_point() and k != "ofs" else v for k, v in kw.items()}
    with torch.no_grad():
        out = ours(**low).sample
        ref_low = ref.to(dtype)(**low, image_rotary_emb=rope).sample
    assert out.dtype == dtype
    assert rel_max_diff(out, expected) <= 2e-2
    assert rel_max_diff(out, ref_low) <= 2e-2


def test_chunked_inference_path(tmp_path, monkeypatch):
    """Without autograd the residual branches run in token chunks; force several chunks per stream."""
    import dit.models.lowmem as lowmem

    monkeypatch.setattr(lowmem, "CHUNK_BYTES", 1)  # -> 16-token chunks: 7 text + 36 video tokens
    monkeypatch.setattr(lowmem, "CHUNK_ABOVE_BYTES", 0)
    _check_parity(tmp_path, _config(TINY, "5b-rope"))


def test_rope_tables_match_diffusers():
    cos, sin = cogvideox_rope(64, 13, 30, 45, 30, 45, temporal_patch=False)
    ref = get_3d_rotary_pos_embed(64, get_resize_crop_region_for_grid((30, 45), 45, 30), (30, 45), 13)
    torch.testing.assert_close((cos, sin), ref, rtol=0, atol=0)
    cos, sin = cogvideox_rope(64, 11, 20, 30, 20, 40, temporal_patch=False)  # other aspect: a centred crop
    ref = get_3d_rotary_pos_embed(64, get_resize_crop_region_for_grid((20, 30), 40, 20), (20, 30), 11)
    torch.testing.assert_close((cos, sin), ref, rtol=0, atol=0)
    cos, sin = cogvideox_rope(64, 11, 48, 85, 150, 150, temporal_patch=True)
    ref = get_3d_rotary_pos_embed(64, None, (48, 85), 11, grid_type="slice", max_size=(150, 150))
    torch.testing.assert_close((cos, sin), ref, rtol=0, atol=0)


def test_other_resolution_and_short_text(tmp_path):
    """Off the sample size: positions are recomputed; text shorter than the maximum works with RoPE."""
    cfg = _config(TINY, "5b-rope")
    ref, ours = _pair(tmp_path, cfg)
    kw = _inputs(cfg)
    kw["hidden_states"] = torch.randn(2, 2, 4, 10, 4)
    kw["encoder_hidden_states"] = kw["encoder_hidden_states"][:, :3]
    with torch.no_grad():
        expected = ref(**kw, image_rotary_emb=_pipeline_rope(ref, kw["hidden_states"])).sample
        assert rel_max_diff(ours(**kw).sample, expected) <= 1e-5


@pytest.mark.parametrize(
    "variant,shape,text_len,match",
    [
        ("2b-sincos", (1, 3, 4, 6, 9), 7, r"divisible by patch_size=2.*6x9"),  # diffusers silently crops this
        ("2b-sincos", (1, 3, 4, 5, 8), 7, r"divisible by patch_size=2.*5x8"),
        ("1.5-tpatch-ofs", (1, 3, 4, 6, 8), 7, r"divisible by patch_size_t=2.*3 frames.*pad to 4"),
        ("5b-learned", (1, 3, 4, 6, 8), 8, r"longer than max_text_seq_length=7.*\(1, text_len <= 7, 24\)"),
        ("5b-rope", (1, 3, 5, 6, 8), 7, r"\(batch, frames, 4, height, width\).*\(1, 3, 5, 6, 8\)"),
        ("5b-learned", (1, 3, 4, 8, 8), 7, r"learned positions for 6x8 latents only, got 8x8"),
    ],
)
def test_input_validation(variant, shape, text_len, match):
    cfg = _config(TINY, variant)
    model = CogVideoXTransformer3DModel(**cfg)
    kw = dict(hidden_states=torch.randn(shape), encoder_hidden_states=torch.randn(1, text_len, 24),
              timestep=torch.tensor([1]), ofs=1.0 if cfg.get("ofs_embed_dim") else None)
    with pytest.raises(ValueError, match=match):
        model(**kw)


def test_validation_of_rope_ofs_and_text_width():
    model = CogVideoXTransformer3DModel(**_config(TINY, "1.5-tpatch-ofs"))
    kw = dict(hidden_states=torch.randn(1, 2, 4, 6, 8), encoder_hidden_states=torch.randn(1, 7, 24), timestep=1)
    with pytest.raises(ValueError, match="pass ofs="):
        model(**kw)
    with pytest.raises(ValueError, match=r"each of shape \(12, 16\)"):
        model(**kw, ofs=1.0, image_rotary_emb=(torch.zeros(5, 16), torch.zeros(5, 16)))
    with pytest.raises(ValueError, match=r"\(1, text_len, 24\)"):  # RoPE only: no text maximum
        model(**dict(kw, encoder_hidden_states=torch.randn(1, 7, 23)), ofs=1.0)


@pytest.mark.parametrize("name,preset", [("2B", COGVIDEOX_2B), ("5B", COGVIDEOX_5B), ("1.5-5B", COGVIDEOX_1_5_5B),
                                         ("5B-I2V", COGVIDEOX_5B_I2V), ("1.5-5B-I2V", COGVIDEOX_1_5_5B_I2V)])
def test_full_size_parameter_counts_on_meta(name, preset):
    with torch.device("meta"):
        ours, ref = CogVideoXTransformer3DModel(**preset), DiffusersCogVideoX(**preset)
    assert param_count(ours) == param_count(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    expected = {"2B": 1_693_783_872, "5B": 5_570_283_072}  # diffusers 0.42.1 on these configs
    if name in expected:
        assert param_count(ours) == expected[name]


def test_learned_positions_initialised_as_diffusers():
    cfg = _config(TINY, "5b-learned")
    torch.testing.assert_close(CogVideoXTransformer3DModel(**cfg).patch_embed.pos_embedding,
                               DiffusersCogVideoX(**cfg).patch_embed.pos_embedding.float(), rtol=0, atol=1e-6)


def test_gradients_match_diffusers_and_checkpointing(tmp_path):
    cfg = _config(TINY, "5b-learned")
    ref, ours = _pair(tmp_path, cfg)
    ours.train()
    kw = _inputs(cfg)

    def grads(model, **extra):
        model.zero_grad()
        model(**kw, **extra).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads(ours)
    ours.enable_gradient_checkpointing()
    checkpointed = grads(ours)
    expected = grads(ref.train(), image_rotary_emb=_pipeline_rope(ref, kw["hidden_states"]))
    assert plain.keys() == checkpointed.keys() == expected.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)
        scale = expected[name].abs().max().clamp_min(1e-6)
        assert ((plain[name] - expected[name]).abs().max() / scale).item() < 1e-4, name


def test_attention_backend_is_swappable(tmp_path):
    cfg = _config(TINY, "5b-rope")
    _, ours = _pair(tmp_path, cfg)
    kw = _inputs(cfg)
    calls = []

    def spy(q, k, v, *, mask=None, scale=None):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with torch.no_grad():
        expected = ours(**kw).sample
        ours.set_attention_backend(spy)
        torch.testing.assert_close(ours(**kw).sample, expected)
        ours.set_attention_backend("math")
        torch.testing.assert_close(ours(**kw).sample, expected, rtol=1e-5, atol=1e-5)
    assert calls == [(2, 2, 7 + 3 * 3 * 4, 16)] * 2  # (B, H, text + video tokens, Dh) per block
    with pytest.raises(ValueError, match="unknown attention backend"):
        ours.set_attention_backend("flash9")


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = randomize_(CogVideoXTransformer3DModel(**_config(TINY, "1.5-tpatch-ofs")))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    again = CogVideoXTransformer3DModel.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(model.config)
    kw = _inputs(dict(model.config))
    with torch.no_grad():
        torch.testing.assert_close(again(**kw).sample, model(**kw).sample, rtol=0, atol=0)
    ref = DiffusersCogVideoX.from_pretrained(tmp_path)  # diffusers reads our folder too
    with torch.no_grad():
        rope = _pipeline_rope(ref, kw["hidden_states"])
        assert rel_max_diff(model(**kw).sample, ref(**kw, image_rotary_emb=rope).sample) <= 1e-5


def test_block_compiles_fullgraph():
    torch.manual_seed(0)
    block = randomize_(CogVideoXBlock(32, 2, 16, 8, 0.0, "gelu-approximate", True, True, 1e-5))
    x, temb = torch.randn(1, 5 + 12, 32), torch.randn(1, 8)
    rope = rope_as_complex(*cogvideox_rope(16, 1, 3, 4, 3, 4, temporal_patch=False))
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        expected = block(x.clone(), temb, 5, rope)
        torch.testing.assert_close(compiled(x.clone(), temb, 5, rope), expected, rtol=1e-5, atol=1e-5)


def _tiny_pipeline(transformer):
    """A tiny CogVideoXPipeline built offline: word-level tokenizer, 2-layer T5, 4-level 3D VAE, DDIM."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = "a cat dog runs on the beach at sunset red blue".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
    ).eval()
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


@pytest.mark.parametrize("variant", ["5b-rope", pytest.param("2b-sincos", marks=pytest.mark.slow),
                                     pytest.param("1.5-tpatch-ofs", marks=pytest.mark.slow)])
def test_drop_in_for_diffusers_pipeline(tmp_path, variant):
    """pipe.transformer replaced by our loaded module: same frames (CFG batch, RoPE from the pipeline)."""
    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
               text_embed_dim=32, num_layers=2, sample_width=2, sample_height=2, sample_frames=9,
               max_text_seq_length=16, **VARIANTS[variant])
    if variant.startswith("1.5"):
        cfg.update(ofs_embed_dim=None)  # the text-to-video 1.5 model has none; the pipeline passes no ofs
    ref, ours = _pair(tmp_path, cfg)
    pipe = _tiny_pipeline(ref)
    kw = dict(prompt="a cat runs on the beach", negative_prompt="blue dog", height=16, width=16, num_frames=9,
              num_inference_steps=3, guidance_scale=6.0, max_sequence_length=16, output_type="np")
    expected = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    pipe.transformer = ours
    frames = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == expected.shape == (1, 9, 16, 16, 3)
    assert abs(frames - expected).max() <= 1e-4 and expected.std() > 0.05


def test_lora_adapter_targets_same_modules(tmp_path):
    """A diffusers/PEFT LoRA on to_q/to_k/to_v/to_out.0/ff: same module names, same output (fused QKV bypassed)."""
    peft = pytest.importorskip("peft")
    cfg = _config(TINY, "5b-rope")
    ref, ours = _pair(tmp_path, cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"])
    ref.add_adapter(lora)
    ours.add_adapter(lora)
    ref_lora = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    ours_lora = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    assert ref_lora.keys() == ours_lora.keys() and len(ref_lora) == 2 * 5 * cfg["num_layers"]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ref_lora.items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            ours_lora[name].copy_(p)
        kw = _inputs(cfg)
        rope = _pipeline_rope(ref, kw["hidden_states"])
        expected = ref(**kw, image_rotary_emb=rope, attention_kwargs={"scale": 0.5}).sample
        plain = ref(**kw, image_rotary_emb=rope, attention_kwargs={"scale": 0.0}).sample
        assert rel_max_diff(plain, expected) > 1e-3  # the adapter does change the output
        assert rel_max_diff(ours(**kw, attention_kwargs={"scale": 0.5}).sample, expected) <= 1e-5
