"""MMDiT (SD3 / SD3.5): parity with diffusers' SD3Transformer2DModel on copied weights, validation, presets."""

import pytest
import torch
from _image_models import (assert_bf16_load_close, assert_checkpointing_keeps_gradients, assert_compiles_fullgraph,
                           assert_each_raises, assert_same_parameters, build_on_meta, fresh_copy, randomize,
                           rel_err, roundtrip)
from diffusers import SD3Transformer2DModel as RefSD3
from tiny import _clip_vocab, sd3_pipeline  # noqa: F401  (_clip_vocab: kept importable from here)

from dit.models.mmdit import SD3_5_LARGE, SD3_5_MEDIUM, SD3_MEDIUM, SD3Transformer2DModel

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
            pos_embed_max_size=12)
TINY_35 = dict(TINY, dual_attention_layers=(0, 1), qk_norm="rms_norm")
MEDIUM = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64, num_attention_heads=8,
              joint_attention_dim=256, caption_projection_dim=512, pooled_projection_dim=128, out_channels=16,
              pos_embed_max_size=32)
MEDIUM_35 = dict(MEDIUM, dual_attention_layers=(0, 1), qk_norm="rms_norm")


def inputs(cfg, b=2, h=16, w=12, text=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(b, cfg["in_channels"], h, w, generator=g),
        encoder_hidden_states=torch.randn(b, text, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(b, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([3.0, 700.0][:b]),
    )


def cast(kw, dtype):
    return {k: v.to(dtype) if k != "timestep" else v for k, v in kw.items()}


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    pairs = {}
    for name, cfg in (("sd3", TINY), ("sd35", TINY_35)):
        ref = randomize(RefSD3(**cfg)).eval()
        pairs[name] = (ref, roundtrip(ref, tmp_path_factory.mktemp(name)))
    return pairs


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
@pytest.mark.parametrize("skip_layers", [None, [1]])
def test_tiny_parity_fp32(tiny_pair, variant, skip_layers):
    ref, ours = tiny_pair[variant]
    assert isinstance(ours, SD3Transformer2DModel)
    kw = inputs(TINY)
    with torch.no_grad():
        expected = ref(**kw, skip_layers=skip_layers).sample
        got = ours(**kw, skip_layers=skip_layers).sample
    assert got.shape == expected.shape == kw["hidden_states"].shape
    assert rel_err(got, expected) <= 1e-5
    # return_dict=False gives the same tensor in a tuple, like diffusers.
    with torch.no_grad():
        (again,) = ours(**kw, skip_layers=skip_layers, return_dict=False)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_tiny_parity_controlnet_residuals(tiny_pair):
    ref, ours = tiny_pair["sd3"]
    kw = inputs(TINY)
    residuals = [torch.randn(2, 48, 32) * 0.1 for _ in range(2)]  # 48 = (16/2) * (12/2) tokens
    with torch.no_grad():
        expected = ref(**kw, block_controlnet_hidden_states=residuals).sample
        got = ours(**kw, block_controlnet_hidden_states=residuals).sample
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_tiny_parity_bf16(tiny_pair, variant, tmp_path):
    kw = inputs(TINY)
    assert_bf16_load_close(tiny_pair[variant][0], tmp_path, kw, cast(kw, torch.bfloat16))


@pytest.mark.parametrize("cfg", [MEDIUM, MEDIUM_35], ids=["sd3", "sd35"])
def test_medium_parity(cfg, tmp_path):
    ref = randomize(RefSD3(**cfg)).eval()
    ours = roundtrip(ref, tmp_path)
    kw = inputs(cfg, h=16, w=12, text=8)  # 4 layers x 512 wide: the width is what matters here
    with torch.no_grad():
        assert rel_err(ours(**kw, skip_layers=[2]).sample, ref(**kw, skip_layers=[2]).sample) <= 1e-5
        expected = ref(**kw).sample
        assert rel_err(ours(**kw).sample, expected) <= 1e-5
        ours16, kw16 = ours.to(torch.bfloat16), cast(kw, torch.bfloat16)
        assert rel_err(ours16(**kw16).sample, ref.to(torch.bfloat16)(**kw16).sample) <= 2e-2


def test_validation_errors():
    model = SD3Transformer2DModel(**TINY).eval()
    kw = inputs(TINY)
    bad = [
        (dict(hidden_states=torch.randn(2, 3, 16, 12)), r"hidden_states must have shape \(B, 4, H, W\)"),
        (dict(hidden_states=torch.randn(2, 4, 15, 12)), r"divisible by patch_size 2, got 15x12"),
        (dict(hidden_states=torch.randn(2, 4, 26, 12)), r"must be <= 24"),
        (dict(encoder_hidden_states=torch.randn(2, 7, 23)), r"encoder_hidden_states must have shape \(2, L, 24\)"),
        (dict(pooled_projections=torch.randn(2, 19)), r"pooled_projections must have shape \(2, 20\)"),
        (dict(timestep=torch.tensor([1.0, 2.0, 3.0])), r"timestep must be a scalar or have shape \(2,\)"),
    ]
    assert_each_raises(model, kw, bad)
    with torch.no_grad():  # a scalar timestep is broadcast
        model(**{**kw, "timestep": 5.0})


@pytest.mark.parametrize("preset", [SD3_MEDIUM, SD3_5_MEDIUM, SD3_5_LARGE],
                         ids=["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_full_size_presets_match_diffusers_parameter_counts(preset):
    assert_same_parameters(build_on_meta(SD3Transformer2DModel, preset), build_on_meta(RefSD3, preset))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pair):
    assert_checkpointing_keeps_gradients(fresh_copy(tiny_pair["sd35"][1]), inputs(TINY))


def test_attention_backend_is_selectable(tiny_pair):
    _, ours = tiny_pair["sd3"]
    kw = inputs(TINY)
    calls = []

    def spy(q, k, v, *, mask=None, scale=None):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with torch.no_grad():
        base = ours(**kw).sample
        try:
            ours.set_attention_backend("math")
            torch.testing.assert_close(ours(**kw).sample, base, rtol=1e-5, atol=1e-5)
            ours.set_attention_backend(spy)
            ours(**kw)
        finally:
            ours.reset_attention_backend()
    # 3 joint attentions over 48 image + 7 text tokens, the last (context pre-only) block's included.
    assert [tuple(s) for s in calls] == [(2, 4, 55, 8)] * 3
    with pytest.raises(ValueError, match="unknown attention backend"):
        ours.set_attention_backend("flash9")


def test_save_and_from_pretrained_roundtrip(tiny_pair, tmp_path):
    _, ours = tiny_pair["sd35"]
    ours.save_pretrained(tmp_path)
    again = SD3Transformer2DModel.from_pretrained(tmp_path)
    kw = inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(again(**kw).sample, ours(**kw).sample, rtol=0, atol=0)


def test_model_compiles_fullgraph(tiny_pair):
    _, ours = tiny_pair["sd35"]
    assert_compiles_fullgraph(ours, **inputs(TINY), skip_layers=[1])


def test_block_compiles_fullgraph():
    from dit.models.mmdit import JointTransformerBlock

    torch.manual_seed(0)
    block = randomize(JointTransformerBlock(32, 4, 8, qk_norm="rms_norm", use_dual_attention=True))
    assert_compiles_fullgraph(block, torch.randn(1, 6, 32), torch.randn(1, 3, 32), torch.randn(1, 32))


def test_fused_qkv_keeps_names_and_follows_weight_changes(tmp_path):
    ref = randomize(RefSD3(**TINY)).eval()
    ours = roundtrip(ref, tmp_path)
    kw = inputs(TINY)
    attn, ref_attn = ours.transformer_blocks[0].attn, ref.transformer_blocks[0].attn
    with torch.no_grad():
        ours(**kw)
    # Inference packed q, k, v into one buffer (one matmul, no copy per call); names are unchanged.
    q, k, v = attn.to_q.weight, attn.to_k.weight, attn.to_v.weight
    assert k.data_ptr() == q.data_ptr() + q.numel() * 4 and v.data_ptr() == k.data_ptr() + k.numel() * 4
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    with torch.no_grad():
        # An in-place change of one packed weight is seen by the fused matmul.
        attn.to_v.weight.mul_(0.5)
        ref_attn.to_v.weight.mul_(0.5)
        assert rel_err(ours(**kw).sample, ref(**kw).sample) <= 1e-5
        # Tensors replaced by an assigning load are detected and repacked.
        ref_attn.add_k_proj.bias.add_(1.0)
        ours.load_state_dict({n: t.clone() for n, t in ref.state_dict().items()}, assign=True)
        assert rel_err(ours(**kw).sample, ref(**kw).sample) <= 1e-5
    # A hooked projection (accelerate offload, activation capture) is called as a module, not fused.
    seen = []
    handle = attn.to_k.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        assert rel_err(ours(**kw).sample, ref(**kw).sample) <= 1e-5
    handle.remove()
    assert seen == [(2, 48, 32)]
    # Frozen weights with gradients on (a ControlNet's base model): packed, input gradients still flow.
    ours.requires_grad_(False)
    x = kw["hidden_states"].clone().requires_grad_(True)
    ours(**{**kw, "hidden_states": x}).sample.square().sum().backward()
    x_ref = kw["hidden_states"].clone().requires_grad_(True)
    ref(**{**kw, "hidden_states": x_ref}).sample.square().sum().backward()
    assert rel_err(x.grad, x_ref.grad) <= 1e-5
    ours.requires_grad_(True)
    # Training after packed inference: gradients reach every projection.
    ours(**kw).sample.sum().backward()
    assert all(p.grad is not None for p in (attn.to_q.weight, attn.to_k.weight, attn.add_v_proj.bias))


def test_fp16_inference(tmp_path):
    ref = randomize(RefSD3(**TINY_35)).eval()
    ours = roundtrip(ref, tmp_path, torch_dtype=torch.float16)
    kw = inputs(TINY)
    with torch.no_grad():
        got = ours(**cast(kw, torch.float16)).sample
        assert got.dtype == torch.float16
        assert rel_err(got, ref(**kw).sample) <= 1e-2


# ------------------------------------------------------------------------------------ drop-in in a pipeline
def test_drop_in_replaces_pipe_transformer(tmp_path):
    import dit

    transformer = randomize(RefSD3(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                   num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                   pooled_projection_dim=64, out_channels=4, qk_norm="rms_norm",
                                   dual_attention_layers=(0,))).eval()
    pipe = sd3_pipeline(transformer, vae_blocks=(4,))

    def images(**kw):
        return pipe(prompt="a photo of a cat", negative_prompt="blurry", height=32, width=32, num_inference_steps=3,
                    guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images

    # SD3.5's skip-layer guidance runs the transformer with skip_layers on steps 1 and 2 here.
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    expected, expected_slg = images(), images(**slg)
    transformer.save_pretrained(tmp_path)
    pipe.transformer = dit.load_transformer(tmp_path)
    got, got_slg = images(), images(**slg)
    assert got.shape == (1, 32, 32, 3) and got.std() > 0.01
    assert abs(expected_slg - expected).max() > 1e-3  # skip-layer guidance changed the image
    assert abs(got - expected).max() <= 1e-4
    assert abs(got_slg - expected_slg).max() <= 1e-4


@pytest.mark.slow
def test_block_compiles_fullgraph_with_inductor():
    from dit.models.mmdit import JointTransformerBlock

    block = randomize(JointTransformerBlock(32, 4, 8, qk_norm="rms_norm", use_dual_attention=True))
    assert_compiles_fullgraph(block, torch.randn(1, 6, 32), torch.randn(1, 3, 32), torch.randn(1, 32),
                              backend="inductor")


def test_sequential_cpu_offload_hooks_are_honoured(tmp_path):
    # accelerate's sequential offload keeps weights on meta until each leaf module's pre-forward hook:
    # projections must be called as modules (fusion steps aside), or they would compute on meta tensors.
    from accelerate import cpu_offload

    ref = randomize(RefSD3(**TINY_35)).eval()
    ours = roundtrip(ref, tmp_path)
    kw = inputs(TINY)
    cpu_offload(ours, execution_device=torch.device("cpu"))
    assert ours.transformer_blocks[0].attn.to_q.weight.is_meta
    with torch.no_grad():
        assert rel_err(ours(**kw).sample, ref(**kw).sample) <= 1e-5
