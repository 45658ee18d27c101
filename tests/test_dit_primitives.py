"""Shared transformer primitives: embeddings equal diffusers', modulation is named, attention backends agree."""

import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_3d_sincos_pos_embed, get_timestep_embedding

from dit.attention import attention
from dit.embeddings import (patchify_2d, patchify_3d, sincos_pos_embed_2d, sincos_pos_embed_3d, timestep_embedding,
                            unpatchify_2d, unpatchify_3d)
from dit.layers import Modulation, modulate


@pytest.mark.parametrize("dim,flip,shift", [(256, True, 0), (255, False, 1)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    t = torch.rand(7) * 1000
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    torch.testing.assert_close(ours, get_timestep_embedding(t, dim, flip, shift), rtol=0, atol=1e-6)


def test_sincos_positions_match_diffusers():
    ours = sincos_pos_embed_2d(64, 6, 8, base_size=4, interpolation_scale=2)
    ref = get_2d_sincos_pos_embed(64, (6, 8), base_size=4, interpolation_scale=2)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-6)
    ours = sincos_pos_embed_3d(64, 3, 6, 8, spatial_interpolation_scale=1.875)
    ref = get_3d_sincos_pos_embed(64, (8, 6), 3, 1.875, 1.0)  # diffusers takes (width, height)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-6)


def test_modulation_is_named_and_zero_initialised():
    mod = Modulation(8, 4, ("shift", "scale", "gate"))
    out = mod(torch.randn(2, 8))
    assert list(out) == ["shift", "scale", "gate"] and out.gate.shape == (2, 4)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(modulate(x, out.shift, out.scale), x)  # adaLN-Zero: identity at init
    with pytest.raises(AttributeError, match="no chunk 'c_gate'"):
        out.c_gate


def test_patchify_round_trip():
    x = torch.randn(2, 4, 6, 8)
    assert patchify_2d(x, 2).shape == (2, 12, 16)
    torch.testing.assert_close(unpatchify_2d(patchify_2d(x, 2), 2, 6, 8), x)
    v = torch.randn(1, 4, 3, 6, 8)  # (B, F, C, H, W)
    assert patchify_3d(v, 2, 2).shape == (1, 2 * 3 * 4, 3 * 8)
    torch.testing.assert_close(unpatchify_3d(patchify_3d(v, 2, 2), 2, 2, 4, 6, 8), v)


def test_attention_backends_agree_and_fail_clearly():
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(attention(q, k, v, mask=mask), attention(q, k, v, mask=mask, backend="math"))
    with pytest.raises(ValueError, match="unknown attention backend 'flash9'"):
        attention(q, k, v, backend="flash9")
    with pytest.raises(ValueError, match="xformers"):
        attention(q, k, v, backend="xformers")  # not installed here, or not on CUDA
