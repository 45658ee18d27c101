"""Word-level tokenizer and tiny T5 encoder: standard save/load, padding/truncation, unk, diffusers' call pattern."""

import json

import pytest
import torch

from dit.data.shapes import (IMAGE_TEMPLATES, MOTION_PHRASES, VIDEO_TEMPLATES, ShapesConfig, all_combinations,
                             caption_words, make_caption)
from dit.text import (build_tiny_t5_encoder, build_word_tokenizer, encode_prompts, load_text_encoder,
                      save_text_encoder)

PROMPT = "a red circle moving right on a blue background"


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(caption_words(), max_length=16)


@pytest.fixture(scope="module")
def enc(tok):
    return build_tiny_t5_encoder(len(tok), d_model=32, num_layers=1, num_heads=2)


def test_ids_padding_truncation_and_unk(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    out = tok([PROMPT, "A RED zebra, circle"], padding="max_length", max_length=16, truncation=True,
              add_special_tokens=True, return_tensors="pt")
    ids, mask = out.input_ids, out.attention_mask
    assert ids.shape == mask.shape == (2, 16)
    # 9 words + </s>, then padding; lower-casing; punctuation is its own token; unknown word -> <unk>.
    assert ids[0, 9] == 1 and (ids[0, 10:] == 0).all() and mask[0].sum() == 10
    assert tok.convert_ids_to_tokens(ids[1, :6].tolist()) == ["a", "red", "<unk>", ",", "circle", "</s>"]
    assert 2 not in ids[0].tolist()
    long = tok([" ".join(["red"] * 40)], padding="max_length", max_length=8, truncation=True,
               add_special_tokens=True).input_ids[0]
    assert len(long) == 8 and long[-1] == 1  # truncated, </s> kept like T5
    assert tok.decode(ids[0], skip_special_tokens=True) == PROMPT


def test_every_dataset_caption_is_in_vocabulary_and_fits(tok):
    longest = 0
    # Every attribute value, template and motion phrase occurs at least once (each value is one word).
    combos = all_combinations(ShapesConfig(split="all"))
    for attrs in combos[::7] + [a for a in combos if a.shape == "triangle" and a.colour == "magenta"]:
        for image, templates in ((False, VIDEO_TEMPLATES), (True, IMAGE_TEMPLATES)):
            for template in range(len(templates)):
                for phrase in range(len(MOTION_PHRASES[attrs.motion])):
                    ids = tok(make_caption(attrs, template=template, phrase=phrase, image=image)).input_ids
                    assert tok.unk_token_id not in ids
                    longest = max(longest, len(ids))
    assert longest <= 16


def test_save_load_round_trip_standard_format(tok, enc, tmp_path):
    save_text_encoder(tmp_path, tok, enc)
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "text_encoder" / "config.json").read_text())["model_type"] == "t5"
    tok2, enc2 = load_text_encoder(tmp_path)
    assert tok2.get_vocab() == tok.get_vocab() and tok2.model_max_length == 16
    assert tok2([PROMPT, "zebra"], padding="max_length", max_length=16).input_ids == \
        tok([PROMPT, "zebra"], padding="max_length", max_length=16).input_ids
    with torch.no_grad():
        e1, m1 = encode_prompts([PROMPT, "a blue square"], tok, enc)
        e2, m2 = encode_prompts([PROMPT, "a blue square"], tok2, enc2)
    assert e1.shape == (2, 16, 32) and m1.shape == (2, 16)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    assert torch.equal(m1, m2)
    with torch.no_grad():
        masked, _ = encode_prompts(PROMPT, tok, enc, use_attention_mask=True)
    assert masked.shape == (1, 16, 32) and not torch.allclose(masked[0, :10], e1[0, :10])


def test_load_errors_name_the_problem(tmp_path, tok, enc):
    with pytest.raises(ValueError, match="is not a folder"):
        load_text_encoder(tmp_path / "nope")
    with pytest.raises(ValueError, match="tokenizer folder .* is missing"):
        load_text_encoder(tmp_path)
    save_text_encoder(tmp_path, tok, enc)
    with pytest.raises(ValueError, match="kind='clip' but .* model_type='t5'"):
        load_text_encoder(tmp_path, kind="clip")
    with pytest.raises(ValueError, match="kind='bert' is not supported; accepted: 'auto', 't5', 'clip'"):
        load_text_encoder(tmp_path, kind="bert")
    with pytest.raises(ValueError, match="max_length=1 must be an integer >= 2"):
        build_word_tokenizer(["a"], max_length=1)
    with pytest.raises(ValueError, match="not single tokens"):
        build_word_tokenizer(["red circle"])


def test_diffusers_cogvideox_prompt_encoding(tok, enc):
    """CogVideoXPipeline.encode_prompt (its _get_t5_prompt_embeds call) with our tokenizer and encoder."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=enc, vae=None, transformer=None,
                             scheduler=CogVideoXDDIMScheduler())
    prompts = [PROMPT, "a green triangle going up against a gray background"]
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(prompts, negative_prompt="", do_classifier_free_guidance=True,
                                      max_sequence_length=16, device="cpu")
        ours, _ = encode_prompts(prompts, tok, enc, max_length=16)
    assert pos.shape == neg.shape == (2, 16, 32)
    torch.testing.assert_close(pos, ours, rtol=0, atol=1e-6)
    assert not torch.allclose(pos[0], pos[1])


@pytest.mark.slow
def test_full_cogvideox_pipeline_with_our_text_encoder_feeds_the_evaluator(tok, enc, tmp_path):
    """A tiny random CogVideoXPipeline runs end to end with our tokenizer/encoder, survives
    save_pretrained + DiffusionPipeline.from_pretrained, and its np frames (B, F, H, W, 3) in [0, 1] are what
    dit.demo.evaluate_clip reads (the random model's answer is noise)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel, DiffusionPipeline)

    from dit.demo import evaluate_clip

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=enc.config.d_model, num_layers=1, sample_width=4, sample_height=4, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8,) * 4,
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=enc, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert pipe.tokenizer.get_vocab() == tok.get_vocab()
    frames = pipe(prompt=PROMPT, height=32, width=32, num_frames=9, num_inference_steps=2, guidance_scale=2.0,
                  max_sequence_length=16, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 9, 32, 32, 3)
    est = evaluate_clip(frames[0])
    assert len(est.centroids) == 9 and set(est.score({"colour": "red", "background": "blue", "motion": "right"})) \
        == {"colour", "background", "motion"}
