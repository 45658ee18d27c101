"""Wan 2.1 / 2.2: parity with diffusers' WanTransformer3DModel on copied weights (T2V, I2V, FLF2V, TI2V with
per-token timesteps), RoPE, gradients, full-size parameter counts, validation, LoRA, a diffusers pipeline with two
of our experts, and context parallelism."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel as DiffusersWan
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from safetensors.torch import load_file, save_file

import dit
from dit.models.wan import (WAN_2_1_1_3B, WAN_2_1_14B, WAN_2_1_FLF2V_14B, WAN_2_1_I2V_14B, WAN_2_2_I2V_A14B,
                            WAN_2_2_TI2V_5B, WanTransformer3DModel)
from dit.rope import wan_rope
from tests.distributed import run_distributed
from tests.helpers_dit import param_count, randomize_, rel_max_diff, save_and_load

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=24, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=32)
MEDIUM = dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16,
              text_dim=64, freq_dim=256, ffn_dim=1024, num_layers=4, rope_max_seq_len=1024)
IMAGE_TOKENS = 5
VARIANTS = {
    "t2v": dict(),
    "i2v": dict(in_channels=12, image_dim=20, added_kv_proj_dim=None),  # added_kv_proj_dim: the model width
    "flf2v": dict(in_channels=12, image_dim=20, added_kv_proj_dim=None, pos_embed_seq_len=2 * IMAGE_TOKENS),
    "ti2v": dict(in_channels=12, out_channels=12, cross_attn_norm=False),  # 48 channels at full size
}
TEXT_LEN = 512  # diffusers' I2V attention takes the last 512 context tokens as text (the pipelines pad to 512)


def _config(size: dict, variant: str) -> dict:
    cfg = dict(size, **VARIANTS[variant])
    if "added_kv_proj_dim" in cfg:
        cfg["added_kv_proj_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return cfg


def _inputs(cfg: dict, variant: str, batch: int = 2, grid: tuple[int, int, int] = (3, 4, 6), seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    kw = dict(hidden_states=torch.randn(batch, cfg["in_channels"], f, h, w, generator=g),
              encoder_hidden_states=torch.randn(batch, TEXT_LEN, cfg["text_dim"], generator=g),
              timestep=torch.tensor([17, 803][:batch]))
    if cfg.get("image_dim"):
        copies = 2 if cfg.get("pos_embed_seq_len") else 1  # FLF2V: first and last frame per sample
        kw["encoder_hidden_states_image"] = torch.randn(copies * batch, IMAGE_TOKENS, cfg["image_dim"], generator=g)
    if variant == "ti2v":  # one timestep per token; the first frame's tokens (the given image) at 0, as the pipeline
        per_frame = (h // 2) * (w // 2)
        t = torch.randint(1, 1000, (batch, 1), generator=g).expand(-1, f * per_frame).clone()
        t[:, :per_frame] = 0
        kw["timestep"] = t
    return kw


def _pair(tmp_path, cfg: dict, seed: int = 0):
    std = 0.3 if cfg["num_attention_heads"] * cfg["attention_head_dim"] <= 64 else 0.05
    ref = randomize_(DiffusersWan(**cfg), seed=seed, std=std)
    return ref, save_and_load(ref, tmp_path)


def _check_parity(tmp_path, cfg: dict, variant: str, batch: int = 2):
    ref, ours = _pair(tmp_path, cfg)
    assert type(ours) is WanTransformer3DModel
    kw = _inputs(cfg, variant, batch)
    with torch.no_grad():
        expected, computed = ref(**kw).sample, ours(**kw).sample
    x = kw["hidden_states"]
    assert computed.shape == expected.shape == (x.shape[0], cfg["out_channels"], *x.shape[2:])
    assert rel_max_diff(computed, expected) <= 1e-5
    return ref, ours, kw, expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_tiny_fp32(tmp_path, variant):
    _check_parity(tmp_path, _config(TINY, variant), variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_medium_fp32(tmp_path, variant):
    _check_parity(tmp_path, _config(MEDIUM, variant), variant, batch=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_inference_path(tmp_path, monkeypatch, variant):
    """Without autograd the blocks update the residual stream in place and run the attention out-projection and
    the MLP over token chunks; force several chunks per sample (per-token modulation too: TI2V)."""
    import dit.models.lowmem as lowmem

    monkeypatch.setattr(lowmem, "CHUNK_BYTES", 1)  # -> 16-token chunks
    monkeypatch.setattr(lowmem, "CHUNK_ABOVE_BYTES", 0)
    ref, ours, kw, expected = _check_parity(tmp_path, _config(TINY, variant), variant)
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}
    with torch.no_grad():
        chunked = ours.to(torch.bfloat16)(**low).sample
    monkeypatch.setattr(lowmem, "CHUNK_ABOVE_BYTES", 1 << 40)
    with torch.no_grad():
        whole = ours(**low).sample
    assert rel_max_diff(chunked.float(), whole.float()) <= 1e-2 and rel_max_diff(chunked.float(), expected) <= 2e-2


@pytest.mark.parametrize("size,variant", [("TINY", v) for v in VARIANTS] + [("MEDIUM", "t2v"), ("MEDIUM", "i2v")])
def test_parity_bf16(tmp_path, size, variant):
    """Ours in bf16 against diffusers' fp32 output (the truth) and diffusers in bf16, within 2e-2 of the scale."""
    cfg = _config({"TINY": TINY, "MEDIUM": MEDIUM}[size], variant)
    ref, ours, kw, expected = _check_parity(tmp_path, cfg, variant, batch=1 if size == "MEDIUM" else 2)
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}
    with torch.no_grad():
        out = ours.to(torch.bfloat16)(**low).sample
        ref_low = ref.to(torch.bfloat16)(**low).sample
    assert out.dtype == torch.bfloat16
    assert rel_max_diff(out, expected) <= 2e-2
    assert rel_max_diff(out, ref_low) <= 2e-2


@pytest.mark.parametrize("variant", ["i2v", "ti2v"])
def test_gradients_match_diffusers_and_checkpointing(tmp_path, variant):
    cfg = _config(TINY, variant)
    ref, ours = _pair(tmp_path, cfg)
    kw = _inputs(cfg, variant)

    def grads(model):
        model.train().zero_grad()
        model(**kw).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads(ours)
    ours.enable_gradient_checkpointing()
    checkpointed = grads(ours)
    expected = grads(ref)
    assert plain.keys() == checkpointed.keys() == expected.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)
        scale = expected[name].abs().max().clamp_min(1e-6)
        assert ((plain[name] - expected[name]).abs().max() / scale).item() <= 1e-5, name


def test_rope_matches_diffusers_bit_for_bit():
    rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024)
    cos, sin = rope(torch.empty(1, 16, 21, 60, 104, device="meta"))  # only the shape is read; (1, N, 1, 128) each
    expected = torch.complex(cos[0, :, 0, 0::2], sin[0, :, 0, 1::2])
    torch.testing.assert_close(wan_rope(128, 21, 30, 52), expected, rtol=0, atol=0)
    cos, sin = WanRotaryPosEmbed(16, (1, 2, 2), 32)(torch.empty(1, 4, 3, 4, 6))
    torch.testing.assert_close(wan_rope(16, 3, 2, 3), torch.complex(cos[0, :, 0, 0::2], sin[0, :, 0, 1::2]),
                               rtol=0, atol=0)


FULL_SIZE = {"2.1-T2V-1.3B": WAN_2_1_1_3B, "2.1-T2V-14B": WAN_2_1_14B, "2.1-I2V-14B": WAN_2_1_I2V_14B,
             "2.1-FLF2V-14B": WAN_2_1_FLF2V_14B, "2.2-I2V-A14B": WAN_2_2_I2V_A14B, "2.2-TI2V-5B": WAN_2_2_TI2V_5B}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_parameter_counts_on_meta(name):
    with torch.device("meta"):
        ours, ref = WanTransformer3DModel(**FULL_SIZE[name]), DiffusersWan(**FULL_SIZE[name])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert param_count(ours) == param_count(ref)
    expected = {"2.1-T2V-1.3B": 1_418_996_800, "2.1-T2V-14B": 14_288_491_584, "2.1-I2V-14B": 16_394_878_784,
                "2.2-TI2V-5B": 4_999_787_712}  # diffusers 0.42.1 on these configs
    if name in expected:
        assert param_count(ours) == expected[name]


@pytest.mark.parametrize(
    "variant,change,match",
    [
        ("t2v", dict(hidden_states=(1, 4, 3, 5, 6)), r"height must be divisible by the patch size 2.*got 5.*4 or 6"),
        ("t2v", dict(hidden_states=(1, 4, 3, 4, 7)), r"width must be divisible.*got 7.*6 or 8"),
        ("t2v", dict(hidden_states=(1, 4, 3, 4, 66)), r"width 66 gives 33 tokens, more than rope_max_seq_len=32.*64"),
        ("t2v", dict(hidden_states=(1, 5, 3, 4, 6)), r"\(batch, 4, frames, height, width\).*\(1, 5, 3, 4, 6\)"),
        ("t2v", dict(hidden_states=(1, 3, 4, 6)), r"\(batch, 4, frames, height, width\)"),
        ("t2v", dict(encoder_hidden_states=(1, 7, 25)), r"\(1, text_len, 24\) \(text_dim=24\), got \(1, 7, 25\)"),
        ("t2v", dict(encoder_hidden_states=(2, 7, 24)), r"\(1, text_len, 24\)"),
        ("t2v", dict(encoder_hidden_states_image=(1, 5, 20)), r"without image_dim.*encoder_hidden_states_image=None"),
        ("t2v", dict(timestep=(1, 17)), r"per token \(1, 18\).*got shape \(1, 17\)"),
        ("t2v", dict(timestep=(3,)), r"scalar, \(1,\), or per token.*got shape \(3,\)"),
        ("i2v", dict(encoder_hidden_states_image=None), r"image_dim=20: pass encoder_hidden_states_image \(1, image"),
        ("i2v", dict(encoder_hidden_states_image=(1, 5, 21)), r"\(1, image_tokens, 20\).*got \(1, 5, 21\)"),
        ("flf2v", dict(encoder_hidden_states_image=(1, 5, 20)), r"\(2, 5, 20\) \(first and last.*got \(1, 5, 20\)"),
        ("flf2v", dict(encoder_hidden_states_image=(2, 4, 20)), r"pos_embed_seq_len=10\), got \(2, 4, 20\)"),
    ],
)
def test_input_validation(variant, change, match):
    cfg = _config(TINY, variant)
    model = WanTransformer3DModel(**cfg)
    kw = dict(hidden_states=(1, cfg["in_channels"], 3, 4, 6), encoder_hidden_states=(1, 7, 24), timestep=(1,),
              encoder_hidden_states_image=None)
    if variant != "t2v":
        kw["encoder_hidden_states_image"] = (2 if variant == "flf2v" else 1, IMAGE_TOKENS, 20)
    kw.update(change)
    tensors = {k: None if v is None else (torch.full(v, 10) if k == "timestep" else torch.randn(v))
               for k, v in kw.items()}
    with pytest.raises(ValueError, match=match):
        model(**tensors)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(image_dim=20), r"image_dim \(20\) and added_kv_proj_dim \(None\) are set together"),
        (dict(image_dim=20, added_kv_proj_dim=16), r"added_kv_proj_dim must be the model width .* = 32 .*got 16"),
        (dict(pos_embed_seq_len=10), r"pos_embed_seq_len \(10\) positions image tokens: it needs image_dim"),
        (dict(attention_head_dim=15), r"attention_head_dim must be even.*got 15"),
        (dict(patch_size=(2, 2)), r"patch_size must be \(t, h, w\)"),
    ],
)
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        WanTransformer3DModel(**dict(TINY, **change))


def test_scalar_timestep_and_other_text_lengths(tmp_path):
    """A scalar timestep broadcasts; any text length works (text carries no positions)."""
    cfg = _config(TINY, "t2v")
    ref, ours = _pair(tmp_path, cfg)
    kw = _inputs(cfg, "t2v", batch=2)
    kw["encoder_hidden_states"] = kw["encoder_hidden_states"][:, :9]
    with torch.no_grad():
        expected = ref(**dict(kw, timestep=torch.tensor([250, 250]))).sample
        assert rel_max_diff(ours(**dict(kw, timestep=250)).sample, expected) <= 1e-5


def test_older_checkpoints_with_norm_added_q_load(tmp_path):
    """Folders converted by older diffusers hold an unused attn2.norm_added_q, which diffusers skips on load."""
    cfg = _config(TINY, "i2v")
    ref = randomize_(DiffusersWan(**cfg))
    ref.save_pretrained(tmp_path)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    for i in range(cfg["num_layers"]):
        state[f"blocks.{i}.attn2.norm_added_q.weight"] = torch.ones(32)
    save_file(state, file, metadata={"format": "pt"})
    ours = dit.load_transformer(tmp_path)
    kw = _inputs(cfg, "i2v")
    with torch.no_grad():
        assert rel_max_diff(ours(**kw).sample, ref(**kw).sample) <= 1e-5


def test_save_and_from_pretrained_round_trip(tmp_path):
    """Our save_pretrained folder loads in diffusers; our class's own from_pretrained keeps the fp32 modules."""
    model = randomize_(WanTransformer3DModel(**_config(TINY, "flf2v")))
    model.save_pretrained(tmp_path)
    kw = _inputs(dict(model.config), "flf2v")
    with torch.no_grad():
        assert rel_max_diff(DiffusersWan.from_pretrained(tmp_path)(**kw).sample, model(**kw).sample) <= 1e-5
    again = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert again.blocks[0].scale_shift_table.dtype == again.condition_embedder.time_embedder.linear_1.weight.dtype \
        == torch.float32
    assert again.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    ref = DiffusersWan.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}
    with torch.no_grad():
        expected, out = ref(**low).sample, again(**low).sample
    assert out.dtype == torch.bfloat16 and rel_max_diff(out, expected) <= 2e-2


def test_lora_adapter_targets_same_modules(tmp_path):
    """A PEFT LoRA over attention (image K/V included), FFN, shared modulation and head: same names and output,
    and a diffusers-format LoRA file saved from diffusers' model loads into ours."""
    peft = pytest.importorskip("peft")
    cfg = _config(TINY, "i2v")
    ref, ours = _pair(tmp_path / "base", cfg)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2",
               "condition_embedder.time_proj", "proj_out"]
    ref.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    ref_lora = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    assert len(ref_lora) == 2 * ((4 + 6 + 2) * cfg["num_layers"] + 2)  # A and B: attn1, attn2 + image K/V, ffn
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ref_lora.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ref.save_lora_adapter(tmp_path / "lora", adapter_name="default")
    ours.load_lora_adapter(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors", prefix=None,
                           adapter_name="style")
    ours_lora = {n.replace(".style", ".default"): p for n, p in ours.named_parameters() if "lora_" in n}
    assert ours_lora.keys() == ref_lora.keys()
    kw = _inputs(cfg, "i2v")
    with torch.no_grad():
        expected = ref(**kw, attention_kwargs={"scale": 0.5}).sample
        plain = ref(**kw, attention_kwargs={"scale": 0.0}).sample
        assert rel_max_diff(plain, expected) > 1e-3  # the adapter does change the output
        assert rel_max_diff(ours(**kw, attention_kwargs={"scale": 0.5}).sample, expected) <= 1e-5


def _tiny_wan_pipeline(transformer, transformer_2=None):
    """A tiny WanPipeline built offline (word-level tokenizer, 1-layer T5, 3-level Wan VAE); with transformer_2,
    Wan 2.2's two experts switched at boundary_ratio."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    from tests.tiny import tiny_t5, tiny_tokenizer

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    return WanPipeline(tokenizer=tiny_tokenizer(TEXT_LEN), text_encoder=tiny_t5(d_model=16), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
                       transformer_2=transformer_2, boundary_ratio=None if transformer_2 is None else 0.5)


def test_drop_in_for_diffusers_pipeline_with_two_experts_and_lora(tmp_path):
    """Wan 2.2 A14B-style: both experts of a WanPipeline replaced by ours give diffusers' frames (CFG), and a
    diffusers LoRA file loaded through the pipeline does too."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cfg = dict(TINY, in_channels=16, out_channels=16, text_dim=16)
    refs, ours = zip(*(_pair(tmp_path / f"expert{i}", cfg, seed=i) for i in range(2)))
    donor = DiffusersWan.from_pretrained(tmp_path / "expert0")
    donor.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.2"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in donor.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=g)
    WanPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(donor))
    ref_pipe, our_pipe = _tiny_wan_pipeline(*refs), _tiny_wan_pipeline(*ours)

    def frames(pipe):
        return pipe(prompt="a red circle moving left", negative_prompt="blue", height=16, width=16, num_frames=9,
                    num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                    output_type="np").frames

    expected, got = frames(ref_pipe), frames(our_pipe)
    assert got.shape == (1, 9, 16, 16, 3) and expected.std() > 0.01
    assert abs(got - expected).max() <= 1e-4
    for pipe in (ref_pipe, our_pipe):
        pipe.load_lora_weights(tmp_path / "lora", adapter_name="style")
    lora_expected, lora_got = frames(ref_pipe), frames(our_pipe)
    assert abs(lora_expected - expected).max() > 1e-3  # the LoRA changed the frames
    assert abs(lora_got - lora_expected).max() <= 1e-4


# -------------------------------------------------------------------------------------- context parallelism


def _parallel_case(variant: str):
    cfg = dict(_config(TINY, variant), num_attention_heads=4, attention_head_dim=8)
    if cfg.get("added_kv_proj_dim"):
        cfg["added_kv_proj_dim"] = 32
    torch.manual_seed(0)
    model = randomize_(WanTransformer3DModel(**cfg), seed=1, std=0.2).train()
    kw = _inputs(cfg, variant, grid=(3, 2, 10))  # 15 video tokens: uneven shards on 2 ranks
    kw["encoder_hidden_states"] = kw["encoder_hidden_states"][:, :13]
    return model, kw


def _run(model, kw, out_grad):
    model.zero_grad(set_to_none=True)
    x = kw["hidden_states"].clone().requires_grad_()
    out = model(**dict(kw, hidden_states=x), return_dict=False)[0]
    out.backward(out_grad)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def _close(a, b, msg):
    err, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert err <= 1e-5 * scale, f"{msg}: max abs diff {err:.3g} at scale {scale:.3g}"


def _check_parallel(rank, world):
    import torch.distributed as dist

    from dit.parallel import ContextParallelConfig

    def avg(t):
        t = t.clone()
        dist.all_reduce(t)
        return t / world

    for variant in ("i2v", "ti2v"):
        model, kw = _parallel_case(variant)
        ref_out = model(**kw, return_dict=False)[0]
        out_grad = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(3))
        ref = _run(model, kw, out_grad)
        for ring, ulysses, cfg in ((1, 2, 1), (2, 1, 1), (1, 1, 2)):
            name = f"{variant} ring={ring} ulysses={ulysses} cfg={cfg}"
            model.enable_parallelism(ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, cfg_degree=cfg))
            if ring == 2:
                model.enable_gradient_checkpointing()
            out, x_grad, w_grads = _run(model, kw, out_grad)
            model.disable_gradient_checkpointing()
            model.disable_parallelism()
            _close(out, ref[0], name)
            _close(avg(x_grad), ref[1], f"{name} dx")
            for n, grad in w_grads.items():
                _close(avg(grad), ref[2][n], f"{name} d{n}")


@pytest.mark.parallel
def test_context_parallel_equals_one_process():
    """Ulysses, ring (with gradient checkpointing) and CFG parallel on 2 ranks: outputs, input and weight
    gradients equal one process (I2V's image keys and TI2V's per-token timesteps included)."""
    run_distributed(_check_parallel, 2)


def test_load_transformer_keeps_diffusers_fp32_modules_in_bf16(tmp_path):
    """dit.load_transformer(torch_dtype=bf16) keeps the same tensors in fp32 as diffusers' from_pretrained."""
    import dit
    from diffusers import WanTransformer3DModel as Ref

    from tests.tiny import tiny_wan_transformer

    tiny_wan_transformer(0).save_pretrained(tmp_path)
    ours = dit.load_transformer(tmp_path, torch_dtype=torch.bfloat16)
    ref = Ref.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    ours_dtypes = {k: v.dtype for k, v in ours.state_dict().items()}
    ref_dtypes = {k: v.dtype for k, v in ref.state_dict().items()}
    assert ours_dtypes == ref_dtypes and torch.float32 in set(ref_dtypes.values())
