"""LoRA on our pipelines, driven as diffusers' LoRA docs drive diffusers' pipelines: `load_lora_weights(folder,
adapter_name=...)`, `set_adapters`, `fuse_lora` / `unfuse_lora`, `delete_adapters`, `unload_lora_weights`, the
strength through the call's attention kwargs, and a community (original Wan) key format diffusers converts. Every
step gives the same frames or images as diffusers' own pipeline holding the same LoRA (1e-4).

CogVideoX, SD3 and Wan inherit diffusers' LoRA loader mixins (CogVideoXLoraLoaderMixin, SD3LoraLoaderMixin,
WanLoraLoaderMixin); peft injects into our transformers because their modules carry diffusers' names. diffusers'
CogView3PlusPipeline has no LoRA loader, and neither has ours: a clear AttributeError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from dit.pipeline import DiTPipeline
from tests.tiny import tiny_cogview3plus_pipeline, tiny_cogvideox_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline


@dataclass
class Family:
    build: Callable  # writes a tiny diffusers pipeline folder
    pipeline_class: str  # diffusers' pipeline class
    transformer_class: str  # diffusers' transformer class (the LoRA donor)
    targets: list[str]  # the modules a LoRA adapts (attention, MLP, adaLN, output)
    call: dict  # one tiny generation
    scale_kwarg: str  # the call argument that carries the LoRA strength
    text_encoder_targets: tuple[str, ...] = ()  # a text-encoder LoRA in the first file too (SD3's CLIPs)


def _diffusers(name: str):
    import diffusers

    return getattr(diffusers, name)


VIDEO = dict(prompt="a red circle moving left", negative_prompt="blue", num_frames=9, height=32, width=32,
             num_inference_steps=2, max_sequence_length=16, output_type="np")
FAMILIES = {
    "cogvideox": Family(lambda f: tiny_cogvideox_pipeline(f, rotary=True), "CogVideoXPipeline",
                        "CogVideoXTransformer3DModel",
                        ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "proj_out"],
                        dict(VIDEO, guidance_scale=6.0), "attention_kwargs"),
    "sd3": Family(tiny_sd3_pipeline, "StableDiffusion3Pipeline", "SD3Transformer2DModel",
                  ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "norm1.linear", "context_embedder",
                   "proj_out"],
                  dict(prompt="a photo of a cat", negative_prompt="blurry", height=32, width=32,
                       num_inference_steps=2, guidance_scale=5.0, output_type="np"), "joint_attention_kwargs",
                  ("q_proj", "k_proj", "v_proj", "out_proj")),
    "wan": Family(tiny_wan_pipeline, "WanPipeline", "WanTransformer3DModel",
                  ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out"],
                  dict(VIDEO, guidance_scale=4.0), "attention_kwargs"),
}


def random_lora(base: Path, family: Family, seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA (alpha 8) over the family's targets in diffusers' PEFT format, with random non-zero B (PEFT
    starts B at zero, which would change nothing)."""
    return _randomised(_diffusers(family.transformer_class).from_pretrained(base / "transformer"), family.targets,
                       seed)


def _randomised(model: torch.nn.Module, targets, seed: int) -> dict[str, torch.Tensor]:
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)), model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=g)
    return get_peft_model_state_dict(model)


def text_encoder_lora(base: Path, family: Family, seed: int) -> dict[str, torch.Tensor] | None:
    """A LoRA on the folder's first text encoder (SD3's CLIP; None for families without text_encoder_targets)."""
    if not family.text_encoder_targets:
        return None
    from transformers import CLIPTextModelWithProjection

    encoder = CLIPTextModelWithProjection.from_pretrained(base / "text_encoder")
    return _randomised(encoder, family.text_encoder_targets, seed)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_folder(request, tmp_path_factory):
    """(family, pipeline folder, two LoRA folders in diffusers' format written by save_lora_weights)."""
    family = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    family.build(folder)
    for name, seed in (("lora_a", 1), ("lora_b", 2)):
        lora = random_lora(folder, family, seed)
        text = dict(text_encoder_lora_layers=text_encoder_lora(folder, family, seed)) if name == "lora_a" else {}
        _diffusers(family.pipeline_class).save_lora_weights(folder / name, transformer_lora_layers=lora,
                                                            **{k: v for k, v in text.items() if v is not None})
    return family, folder


def _pair(family: Family, folder: Path):
    # The tiny SD3 folder has no T5 ([null, null] entries): diffusers wants them named as absent.
    absent = dict(text_encoder_3=None, tokenizer_3=None) if family.pipeline_class == "StableDiffusion3Pipeline" else {}
    ours, ref = DiTPipeline.from_pretrained(folder), _diffusers(family.pipeline_class).from_pretrained(folder, **absent)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


def _output(pipe, family: Family, **kw) -> np.ndarray:
    out = pipe(**family.call, **kw, generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images if getattr(out, "images", None) is not None else out.frames)


def _close(a, b, atol: float = 1e-4) -> None:
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def test_lora_workflow_gives_diffusers_outputs(family_folder):
    family, folder = family_folder
    ours, ref = _pair(family, folder)
    base = _output(ours, family)
    _close(base, _output(ref, family))

    for pipe in (ours, ref):
        pipe.load_lora_weights(folder / "lora_a", adapter_name="a")
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["a"]
    if family.text_encoder_targets:  # the text encoder's LoRA loaded too (its strength follows the call's scale)
        assert any("lora_A" in name for name, _ in ours.text_encoder.named_parameters())
    with_a = _output(ours, family)
    assert abs(with_a - base).max() > 1e-2  # the LoRA reaches our fused q/k/v and in-place paths
    _close(with_a, _output(ref, family))
    half = {family.scale_kwarg: {"scale": 0.5}}  # LoRA strength through the call, as diffusers' docs pass it
    got_half = _output(ours, family, **half)
    assert abs(got_half - with_a).max() > 1e-3
    _close(got_half, _output(ref, family, **half))

    for pipe in (ours, ref):
        pipe.load_lora_weights(folder / "lora_b", adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])
    assert ours.get_list_adapters() == ref.get_list_adapters()
    mixed = _output(ours, family)
    _close(mixed, _output(ref, family))

    ours.fuse_lora()  # the active adapters merged into the base weights: the same outputs, and back
    _close(_output(ours, family), mixed, atol=1e-5)
    ours.unfuse_lora()
    _close(_output(ours, family), mixed, atol=1e-5)
    for pipe in (ours, ref):  # a fusing scale stays on the adapters after unfuse_lora, in diffusers too
        pipe.fuse_lora(lora_scale=0.7)
    _close(_output(ours, family), _output(ref, family))
    for pipe in (ours, ref):
        pipe.unfuse_lora()
    _close(_output(ours, family), _output(ref, family))

    for pipe in (ours, ref):
        pipe.delete_adapters("a")
    assert ours.get_list_adapters() == ref.get_list_adapters()
    _close(_output(ours, family), _output(ref, family))

    ours.unload_lora_weights()
    assert not any("lora_" in name for name, _ in ours.transformer.named_parameters())
    _close(_output(ours, family), base, atol=1e-5)  # fp32 rounding of the merge and unmerge above


def _original_wan_keys(lora: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers' Wan LoRA keys -> the original Wan / ComfyUI format (`diffusion_model.blocks.0.self_attn.q.
    lora_down.weight`, with an `alpha` per module), which WanLoraLoaderMixin converts on load."""
    renames = (("attn1.", "self_attn."), ("attn2.", "cross_attn."), (".to_q.", ".q."), (".to_k.", ".k."),
               (".to_v.", ".v."), (".to_out.0.", ".o."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
               ("lora_A", "lora_down"), ("lora_B", "lora_up"))
    out = {}
    for key, value in lora.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[f"diffusion_model.{key}"] = value
        if ".lora_down." in key:
            out[f"diffusion_model.{key.split('.lora_down.')[0]}.alpha"] = torch.tensor(alpha)
    return out


def test_original_wan_format_lora_gives_diffusers_frames(tmp_path):
    family = FAMILIES["wan"]
    family.build(tmp_path)
    blocks_only = Family(**{**family.__dict__, "targets": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj",
                                                            "ffn.net.2"]})
    file = tmp_path / "community" / "wan_lora.safetensors"
    file.parent.mkdir()
    save_file(_original_wan_keys(random_lora(tmp_path, blocks_only, 3), alpha=8.0), file)
    ours, ref = _pair(family, tmp_path)
    base = _output(ours, family)
    for pipe in (ours, ref):
        pipe.load_lora_weights(file, adapter_name="community")
    got = _output(ours, family)
    assert abs(got - base).max() > 1e-2
    _close(got, _output(ref, family))
    ours.unload_lora_weights()
    _close(_output(ours, family), base, atol=1e-6)


def test_cogview3plus_has_no_lora_loader_like_diffusers(tmp_path):
    ref = tiny_cogview3plus_pipeline(tmp_path)
    ours = DiTPipeline.from_pretrained(tmp_path)
    for name in ("load_lora_weights", "fuse_lora", "set_adapters"):
        assert not hasattr(ref, name) and not hasattr(ours, name)  # diffusers' pipeline has none either
    with pytest.raises(AttributeError, match="diffusers' CogView3PlusPipeline has no LoRA loader either"):
        ours.load_lora_weights(tmp_path / "lora", adapter_name="x")
