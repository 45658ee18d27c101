"""bench/relay.py's FLOP count: attention must be in it (on CPU, FlopCounterMode counts 0 for fused SDPA)."""

import sys

import pytest

from bench import relay
from bench.relay import meta_forward_flops, sd3_forward_flops

CONFIG = dict(num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=128,
              text_embed_dim=128, num_layers=1, sample_width=16, sample_height=16, sample_frames=17, patch_size=2,
              max_text_seq_length=32, use_rotary_positional_embeddings=True)


def test_forward_flops_include_attention():
    text = (1, 32, 128)
    lo = meta_forward_flops(CONFIG, (1, 5, 16, 16, 16), text)  # 320 video + 32 text tokens
    hi = meta_forward_flops(CONFIG, (1, 5, 16, 32, 32), text)  # 1280 + 32
    linear_only = (1280 + 32) / (320 + 32)  # what the ratio would be with attention left out
    # Closed form for the attention products alone (QK^T and PV, 2 FLOPs per multiply-add, 2 heads x 64).
    attention = [2 * 2 * n * n * 128 for n in (352, 1312)]
    assert hi - lo > attention[1] - attention[0]
    assert hi / lo > 1.5 * linear_only


def test_sd3_forward_flops_include_attention():
    config = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=64,
                  num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32,
                  out_channels=16, pos_embed_max_size=64)
    lo, hi = sd3_forward_flops(config, (1, 16, 32, 32)), sd3_forward_flops(config, (1, 16, 64, 64))  # 256, 1024 tokens
    text = 333
    assert hi / lo > 1.2 * (1024 + text) / (256 + text)  # more than linear in tokens: attention is counted


@pytest.mark.parametrize("argv, message", [
    (["--size", "15"], "--size 15: the base latent must divide by the patch size 2 (e.g. 16)"),
    (["--reps", "0"], "--reps 0: give at least 1"),
    (["--cogvideox-2b-layers", "0"], "--cogvideox-2b-layers 0: give 1 to 30 (of its 30 layers)"),
    (["--cogvideox-2b-layers", "31"], "--cogvideox-2b-layers 31: give 1 to 30 (of its 30 layers)"),
    (["--cogvideox-2b-layers", "1", "--quick"], "--quick and --cogvideox-2b-layers: choose one"),
    (["--sd3-medium-layers", "25"], "--sd3-medium-layers 25: give 1 to 24 (of its 24 layers)"),
    (["--sd3-medium-layers", "1", "--quick"], "--sd3-medium-layers: give it alone, without --quick"),
    (["--sd3-medium-layers", "1", "--steps", "0"], "--steps 0: give at least 1"),
])
def test_bad_arguments_fail_before_any_model_is_built(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.relay", *argv])
    monkeypatch.setattr(relay, "CogVideoXTransformer3DModel", None)  # building one would raise TypeError
    monkeypatch.setattr(relay.torch, "set_num_threads", None)  # nor may the test session's threads change
    with pytest.raises(SystemExit) as exit_info:
        relay.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
