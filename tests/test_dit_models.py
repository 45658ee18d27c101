"""DiT (adaLN-Zero, class-conditional): parity with diffusers' DiTTransformer2DModel on copied weights."""

import json

import pytest
import torch
from _image_models import (assert_bf16_load_close, assert_checkpointing_keeps_gradients, assert_compiles_fullgraph,
                           assert_each_raises, assert_same_parameters, build_on_meta, fresh_copy, randomize,
                           rel_err, roundtrip)
from diffusers import DiTTransformer2DModel as RefDiT

from dit.models.dit import DIT_XL_2_256, DIT_XL_2_512, DiTBlock, DiTTransformer2DModel

TINY = dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10)
MEDIUM = dict(num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=4, sample_size=12,
              patch_size=2, num_embeds_ada_norm=100)


def inputs(cfg, b=2, size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = size or cfg["sample_size"]
    return dict(hidden_states=torch.randn(b, cfg["in_channels"], size, size, generator=g),
                timestep=torch.tensor([3, 700][:b]), class_labels=torch.tensor([1, cfg["num_embeds_ada_norm"] - 1][:b]))


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    ref = randomize(RefDiT(**TINY)).eval()
    return ref, roundtrip(ref, tmp_path_factory.mktemp("dit"))


def test_tiny_parity_fp32_and_bf16(tiny_pair, tmp_path):
    ref, ours = tiny_pair
    assert isinstance(ours, DiTTransformer2DModel)
    # The training-size table and another size (diffusers recomputes positions for it) both match.
    for size in (8, 12):
        kw = inputs(TINY, size=size)
        with torch.no_grad():
            expected, got = ref(**kw).sample, ours(**kw).sample
        assert got.shape == expected.shape == (2, 8, size, size)
        assert rel_err(got, expected) <= 1e-5
    kw = inputs(TINY)
    assert_bf16_load_close(ref, tmp_path, kw, dict(kw, hidden_states=kw["hidden_states"].bfloat16()))
    with torch.no_grad():
        (tup,) = ours(**kw, return_dict=False)
    assert tup.shape == (2, 8, 8, 8)


def test_medium_parity(tmp_path):
    ref = randomize(RefDiT(**MEDIUM)).eval()
    ours = roundtrip(ref, tmp_path)
    kw = inputs(MEDIUM)
    with torch.no_grad():
        assert rel_err(ours(**kw).sample, ref(**kw).sample) <= 1e-5
        kw16 = dict(kw, hidden_states=kw["hidden_states"].bfloat16())
        assert rel_err(ours.to(torch.bfloat16)(**kw16).sample, ref.to(torch.bfloat16)(**kw16).sample) <= 2e-2


def test_non_square_latents_work():
    # diffusers' unpatchify assumes a square grid; ours keeps H and W apart.
    model = DiTTransformer2DModel(**TINY).eval()
    kw = inputs(TINY)
    kw["hidden_states"] = torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        assert model(**kw).sample.shape == (2, 8, 8, 12)


def test_validation_errors():
    model = DiTTransformer2DModel(**TINY).eval()
    kw = inputs(TINY)
    bad = [
        (dict(hidden_states=torch.randn(2, 3, 8, 8)), r"hidden_states must have shape \(B, 4, H, W\)"),
        (dict(hidden_states=torch.randn(2, 4, 9, 8)), r"divisible by patch_size 2, got 9x8"),
        (dict(class_labels=torch.tensor([1])), r"class_labels must be integer class ids of shape \(2,\)"),
        (dict(timestep=torch.tensor([1, 2, 3])), r"timestep must be a scalar or have shape \(2,\)"),
        (dict(class_labels=torch.tensor([1, 11])), r"class_labels must lie in \[0, 10\] \(10 = the null class\)"),
    ]
    assert_each_raises(model, kw, bad)


@pytest.mark.parametrize("preset", [DIT_XL_2_256, DIT_XL_2_512], ids=["xl-2-256", "xl-2-512"])
def test_full_size_presets_match_diffusers_parameter_counts(preset):
    assert assert_same_parameters(build_on_meta(DiTTransformer2DModel, preset), build_on_meta(RefDiT, preset)) > 600e6


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pair):
    # eval: no label dropout, so both passes see the same labels
    assert_checkpointing_keeps_gradients(fresh_copy(tiny_pair[1]).eval(), inputs(TINY))


def test_model_compiles_fullgraph(tiny_pair):
    assert_compiles_fullgraph(tiny_pair[1], **inputs(TINY))


def test_block_compiles_fullgraph():
    block = randomize(DiTBlock(32, 4, 8, num_classes=10)).eval()
    assert_compiles_fullgraph(block, torch.randn(2, 6, 32), torch.tensor([1.0, 5.0]), torch.tensor([2, 3]))


def test_drop_in_replaces_pipe_transformer(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    import dit

    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1)
    # DiTPipeline hard-codes 1000 as the null class for guidance.
    transformer = randomize(RefDiT(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                   num_layers=2, sample_size=16, num_embeds_ada_norm=1000)).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(class_labels=[1, 3], num_inference_steps=3, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    expected = images()
    transformer.save_pretrained(tmp_path)
    pipe.transformer = dit.load_transformer(tmp_path)
    got = images()
    assert got.shape == (2, 16, 16, 3) and got.std() > 0.01
    assert abs(got - expected).max() <= 1e-4


def test_load_transformer_reads_legacy_transformer2dmodel(tmp_path):
    # Released DiT folders (facebook/DiT-XL-2-256) name diffusers' legacy Transformer2DModel with ada_norm_zero.
    from diffusers import Transformer2DModel

    import dit

    legacy = {k: v for k, v in DIT_XL_2_256.items() if k not in ("out_channels", "norm_num_groups")}
    ref = randomize(Transformer2DModel(**dict(legacy, **TINY))).eval()
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    ours = dit.load_transformer(tmp_path)
    assert isinstance(ours, DiTTransformer2DModel)
    kw = inputs(TINY)
    with torch.no_grad():
        assert rel_err(ours(**kw).sample, ref(**kw).sample) <= 1e-5
    # Any other Transformer2DModel (PixArt's ada_norm_single, a latent-diffusion layer_norm one) is refused.
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, norm_type="ada_norm_single")))
    with pytest.raises(ValueError, match=r"Transformer2DModel with norm_type 'ada_norm_single' is not supported; "
                                         r"accepted norm_type: 'ada_norm_zero'"):
        dit.load_transformer(tmp_path)
