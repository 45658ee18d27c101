"""CogView3-Plus: parity with diffusers' CogView3PlusTransformer2DModel on copied weights, validation, presets."""

import pytest
import torch
from _image_models import (assert_bf16_load_close, assert_checkpointing_keeps_gradients, assert_compiles_fullgraph,
                           assert_each_raises, assert_same_parameters, build_on_meta, fresh_copy, randomize,
                           rel_err, roundtrip)
from diffusers import CogView3PlusTransformer2DModel as RefCV3

from dit.models.cogview3plus import COGVIEW3_PLUS, CogView3PlusTransformer2DModel, CogView3PlusTransformerBlock

TINY = dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4, out_channels=4,
            text_embed_dim=24, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8)
MEDIUM = dict(patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64, num_attention_heads=8, out_channels=16,
              text_embed_dim=256, time_embed_dim=128, condition_dim=64, pos_embed_max_size=32, sample_size=32)


def inputs(cfg, b=2, h=12, w=16, text=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(b, cfg["in_channels"], h, w, generator=g),
        encoder_hidden_states=torch.randn(b, text, cfg["text_embed_dim"], generator=g),
        timestep=torch.tensor([3, 700][:b]),
        original_size=torch.tensor([[1024.0, 768.0], [512.0, 512.0]][:b]),
        target_size=torch.tensor([[1024.0, 1024.0], [768.0, 512.0]][:b]),
        crop_coords=torch.tensor([[0.0, 0.0], [16.0, 32.0]][:b]),
    )


def cast(kw, dtype):
    return {k: v.to(dtype) if k in ("hidden_states", "encoder_hidden_states") else v for k, v in kw.items()}


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    ref = randomize(RefCV3(**TINY)).eval()
    return ref, roundtrip(ref, tmp_path_factory.mktemp("cv3"))


def test_tiny_parity_fp32_and_bf16(tiny_pair, tmp_path):
    ref, ours = tiny_pair
    assert isinstance(ours, CogView3PlusTransformer2DModel)
    kw = inputs(TINY)
    with torch.no_grad():
        expected, got = ref(**kw).sample, ours(**kw).sample
        (tup,) = ours(**kw, return_dict=False)
    assert got.shape == expected.shape == (2, 4, 12, 16)
    assert rel_err(got, expected) <= 1e-5
    torch.testing.assert_close(tup, got, rtol=0, atol=0)
    assert_bf16_load_close(ref, tmp_path, kw, cast(kw, torch.bfloat16))


def test_medium_parity(tmp_path):
    ref = randomize(RefCV3(**MEDIUM)).eval()
    ours = roundtrip(ref, tmp_path)
    kw = inputs(MEDIUM, h=16, w=12, text=8)  # 4 layers x 512 wide: the width is what matters here
    with torch.no_grad():
        assert rel_err(ours(**kw).sample, ref(**kw).sample) <= 1e-5
        kw16 = cast(kw, torch.bfloat16)
        assert rel_err(ours.to(torch.bfloat16)(**kw16).sample, ref.to(torch.bfloat16)(**kw16).sample) <= 2e-2


def test_validation_errors():
    model = CogView3PlusTransformer2DModel(**TINY).eval()
    kw = inputs(TINY)
    bad = [
        (dict(hidden_states=torch.randn(2, 3, 12, 16)), r"hidden_states must have shape \(B, 4, H, W\)"),
        (dict(hidden_states=torch.randn(2, 4, 13, 16)), r"divisible by patch_size 2, got 13x16"),
        (dict(hidden_states=torch.randn(2, 4, 34, 16)), r"must be <= 32"),
        (dict(encoder_hidden_states=torch.randn(2, 7, 23)), r"encoder_hidden_states must have shape \(2, L, 24\)"),
        (dict(crop_coords=torch.zeros(2, 3)), r"crop_coords must have shape \(2, 2\)"),
        (dict(timestep=torch.tensor([1, 2, 3])), r"timestep must be a scalar or have shape \(2,\)"),
    ]
    assert_each_raises(model, kw, bad)


def test_full_size_preset_matches_diffusers_parameter_count():
    ours, ref = build_on_meta(CogView3PlusTransformer2DModel, COGVIEW3_PLUS), build_on_meta(RefCV3, COGVIEW3_PLUS)
    assert assert_same_parameters(ours, ref) > 2.5e9


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pair):
    assert_checkpointing_keeps_gradients(fresh_copy(tiny_pair[1]), inputs(TINY))


def test_block_compiles_fullgraph():
    block = randomize(CogView3PlusTransformerBlock(32, 4, 8, 16))
    assert_compiles_fullgraph(block, torch.randn(1, 6, 32), torch.randn(1, 3, 32), torch.randn(1, 16))


def test_drop_in_replaces_pipe_transformer(tmp_path):
    # Text embeddings are passed in, so the pipeline needs no T5 (no tokenizer can be built offline for it).
    from diffusers import AutoencoderKL, CogVideoXDDIMScheduler, CogView3PlusPipeline

    import dit

    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1)
    transformer = randomize(RefCV3(**dict(TINY, sample_size=16))).eval()
    pipe = CogView3PlusPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    text, negative = torch.randn(1, 9, 24, generator=g), torch.randn(1, 9, 24, generator=g)

    def images():
        return pipe(prompt_embeds=text, negative_prompt_embeds=negative, height=32, width=32, num_inference_steps=3,
                    guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="np").images

    expected = images()
    transformer.save_pretrained(tmp_path)
    pipe.transformer = dit.load_transformer(tmp_path)
    got = images()
    assert got.shape == (1, 32, 32, 3) and got.std() > 0.01
    assert abs(got - expected).max() <= 1e-4
