"""diffusers' model-level hooks reach our modules' weights: layerwise casting (fp8 storage) and group offload
give diffusers' own numbers on CogVideoX (the fused-QKV speed path steps aside for hooked projections)."""

import pytest
import torch

from tests.test_cogvideox import TINY, _config, _inputs, _pair, _pipeline_rope


@pytest.mark.parametrize("setup", ["layerwise_casting", "group_offload"])
def test_hooks_on_our_cogvideox_give_diffusers_numbers(tmp_path, setup):
    cfg = _config(TINY, "5b-rope")  # RoPE: diffusers needs the tables passed in, ours computes the same
    ref, ours = _pair(tmp_path, cfg)
    for model in (ref, ours):
        if setup == "layerwise_casting":
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        else:
            model.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    if setup == "layerwise_casting":  # the storage really is fp8 in ours too
        assert ours.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    kw = _inputs(cfg)
    with torch.no_grad():
        expected = ref(**kw, image_rotary_emb=_pipeline_rope(ref, kw["hidden_states"])).sample
        computed = ours(**kw).sample
    torch.testing.assert_close(computed, expected, rtol=1e-4, atol=1e-4)
