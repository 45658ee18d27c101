"""SD3 LoRA: a diffusers-format LoRA file loads into a StableDiffusion3Pipeline whose transformer is ours."""

import torch
from _image_models import randomize
from diffusers import SD3Transformer2DModel as RefSD3
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tiny import sd3_pipeline

import dit

# SD3.5-style (qk-norm, one dual-attention block) so the second attention's projections are adapted too.
CONFIG = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
              caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
              qk_norm="rms_norm", dual_attention_layers=(0,))
# Attention (both streams, both attentions), MLPs, adaLN linears, the text projection and the output layer.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
           "norm1_context.linear", "context_embedder", "proj_out"]


def save_random_lora(base_folder, lora_folder) -> None:
    """A LoRA over TARGETS with random non-zero B (PEFT starts B at zero, which would change nothing)."""
    donor = RefSD3.from_pretrained(base_folder)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in donor.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=g)
    StableDiffusion3Pipeline.save_lora_weights(lora_folder, transformer_lora_layers=get_peft_model_state_dict(donor))


def test_diffusers_lora_file_gives_diffusers_images_on_our_transformer(tmp_path):
    base, lora = tmp_path / "transformer", tmp_path / "lora"
    randomize(RefSD3(**CONFIG)).eval().save_pretrained(base)
    save_random_lora(base, lora)
    ref_pipe = sd3_pipeline(RefSD3.from_pretrained(base).eval(), vae_blocks=(4,))
    our_pipe = sd3_pipeline(dit.load_transformer(base), vae_blocks=(4,))

    def images(pipe, **kw):
        return pipe(prompt="a photo of a cat", negative_prompt="blurry", height=32, width=32, num_inference_steps=3,
                    guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images

    plain = images(our_pipe)
    for pipe in (ref_pipe, our_pipe):
        pipe.load_lora_weights(lora, adapter_name="style")
    assert any("lora_A" in name for name, _ in our_pipe.transformer.named_parameters())
    expected, got = images(ref_pipe), images(our_pipe)
    assert got.shape == (1, 32, 32, 3) and got.std() > 0.01
    assert abs(got - plain).max() > 1e-2  # the LoRA changed the image
    assert abs(got - expected).max() <= 1e-4
    # LoRA strength through joint_attention_kwargs, as diffusers' SD3 pipeline passes it.
    half = dict(joint_attention_kwargs={"scale": 0.5})
    got_half, expected_half = images(our_pipe, **half), images(ref_pipe, **half)
    assert abs(got_half - got).max() > 1e-3
    assert abs(got_half - expected_half).max() <= 1e-4
    # fuse_lora merges the LoRA into the base weights (packed for fused QKV by the plain run above);
    # unfuse_lora takes it out again.
    our_pipe.fuse_lora()
    assert abs(images(our_pipe) - got).max() <= 1e-5
    our_pipe.unfuse_lora()
    assert abs(images(our_pipe) - got).max() <= 1e-5
    # Unloading gives the base model back.
    our_pipe.unload_lora_weights()
    assert abs(images(our_pipe) - plain).max() <= 1e-6
