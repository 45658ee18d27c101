"""CogView3-Plus: DiT over [text, image] tokens with text/image adaLN-Zero (Zheng et al. 2024, "CogView3:
Finer and Faster Text-to-Image Generation via Relay Diffusion"; the Plus model is its DiT variant).

Unlike MMDiT, text and image share the attention and MLP weights; only the adaLN modulation is
per-stream (12 chunks). Conditioning is timestep + SDXL-style size/crop micro-conditions.
Drop-in for diffusers' CogView3PlusTransformer2DModel: same config keys, parameter names, forward arguments.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from dit.embeddings import TimestepEmbedder, patchify_2d, sincos_pos_embed_2d, timestep_embedding, unpatchify_2d
from dit.cache import StepCacheMixin, run_blocks
from dit.layers import (ADALN_CONTINUOUS, ADALN_ZERO, Attention, AttentionBackendMixin, FeedForward, Modulation,
                        broadcast_timestep, checkpointed, expert_gated_add, expert_modulate, layer_norm, modulate)
from dit.models._image_common import TextProjection, check_latents, check_shape

EPS = 1e-5  # the block LayerNorms (the qk-norm and the output norm use 1e-6)
# The block's 12 modulation chunks: image (x) first, then text (context) with a "c_" prefix.
TEXT_IMAGE_ADALN = ADALN_ZERO + tuple("c_" + n for n in ADALN_ZERO)


# ----------------------------------------------------------------------------------------------- embedders
class CogView3PlusPatchEmbed(nn.Module):
    """Image patches and text tokens projected to the model width; image positions from a sin-cos grid.

    The (max, max, D) table is a non-persistent buffer (rebuilt by `init_buffers`); an h x w latent
    takes its top-left h x w window. Text tokens get no position.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, text_dim: int, max_size: int):
        super().__init__()
        self.patch_size, self.max_size = patch_size, max_size
        self.proj = nn.Linear(in_channels * patch_size**2, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.register_buffer("pos_embed", self.table(), persistent=False)

    def table(self, device=None) -> Tensor:
        m, dim = self.max_size, self.proj.out_features
        return sincos_pos_embed_2d(dim, m, m, base_size=m, device=device).view(m, m, dim)  # (max, max, D)

    def forward(self, x: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.proj(patchify_2d(x, self.patch_size))  # (B, h*w, D), channels (c, p1, p2)
        pos = self.pos_embed[:h, :w].reshape(1, h * w, -1)  # (1, h*w, D)
        return tokens + pos.to(tokens.dtype), self.text_proj(text)  # (B, N, D), (B, M, D)


class TimestepSizeEmbedder(nn.Module):
    """c = MLP(timestep) + MLP(sin-cos of original size, crop coords, target size) (SDXL micro-conditioning)."""

    def __init__(self, dim: int, condition_dim: int, timesteps_dim: int):
        super().__init__()
        self.condition_dim = condition_dim
        self.timestep_embedder = TimestepEmbedder(timesteps_dim, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.condition_embedder = TextProjection(6 * condition_dim, dim)

    def forward(self, timestep: Tensor, original_size: Tensor, target_size: Tensor, crop_coords: Tensor,
                dtype: torch.dtype) -> Tensor:
        b = timestep.shape[0]
        sizes = torch.stack([original_size, crop_coords, target_size], dim=1).flatten()  # (B*3*2,): diffusers' order
        sizes = timestep_embedding(sizes, self.condition_dim).view(b, 6 * self.condition_dim)  # (B, 6 * cond_dim)
        return self.timestep_embedder(timestep, dtype) + self.condition_embedder(sizes.to(dtype))  # (B, D_t)


# ------------------------------------------------------------------------------------------------- block
class CogView3PlusTransformerBlock(nn.Module):
    """Shared-weight attention and MLP over [text, image], each stream with its own adaLN-Zero chunks."""

    def __init__(self, dim: int, heads: int, head_dim: int, time_embed_dim: int):
        super().__init__()
        self.norm1 = Modulation(time_embed_dim, dim, TEXT_IMAGE_ADALN)
        self.attn1 = Attention(dim, heads, head_dim, qk_norm="layer_norm", qk_norm_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        m, n_text = self.norm1(emb), encoder_hidden_states.shape[1]  # named (B, D) chunks
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # joint [text, image] (B, M + N, D)
        h = expert_modulate(layer_norm(x, EPS), n_text, (m.c_shift_msa, m.c_scale_msa), (m.shift_msa, m.scale_msa))
        x = expert_gated_add(x, n_text, (m.c_gate_msa, m.gate_msa), self.attn1(h))
        h = expert_modulate(layer_norm(x, EPS), n_text, (m.c_shift_mlp, m.c_scale_mlp), (m.shift_mlp, m.scale_mlp))
        x = expert_gated_add(x, n_text, (m.c_gate_mlp, m.gate_mlp), self.ff(h))
        if x.dtype == torch.float16:  # fp16 activations of the released model overflow otherwise
            x = x.clip(-65504, 65504)
        return x[:, n_text:], x[:, :n_text]  # image (B, N, D), text (B, M, D)


# ------------------------------------------------------------------------------------------------- model
class CogView3PlusTransformer2DModel(AttentionBackendMixin, ModelMixin, ConfigMixin,
                                     StepCacheMixin):
    """CogView3-Plus denoiser, a drop-in for diffusers' CogView3PlusTransformer2DModel (v-prediction out)."""

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]
    _no_split_modules = ["CogView3PlusTransformerBlock", "CogView3PlusPatchEmbed"]
    _repeated_blocks = ["CogView3PlusTransformerBlock"]  # regional compile (dit.compile)

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 30,
        attention_head_dim: int = 40,
        num_attention_heads: int = 64,
        out_channels: int = 16,
        text_embed_dim: int = 4096,
        time_embed_dim: int = 512,
        condition_dim: int = 256,
        pos_embed_max_size: int = 128,
        sample_size: int = 128,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.inner_dim = dim = num_attention_heads * attention_head_dim
        self.patch_embed = CogView3PlusPatchEmbed(in_channels, dim, patch_size, text_embed_dim, pos_embed_max_size)
        # The timestep's sin-cos features are as wide as the model (diffusers' timesteps_dim=inner_dim).
        self.time_condition_embed = TimestepSizeEmbedder(time_embed_dim, condition_dim, timesteps_dim=dim)
        self.transformer_blocks = nn.ModuleList(
            CogView3PlusTransformerBlock(dim, num_attention_heads, attention_head_dim, time_embed_dim)
            for _ in range(num_layers)
        )
        self.norm_out = Modulation(time_embed_dim, dim, ADALN_CONTINUOUS)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.gradient_checkpointing = False

    def init_buffers(self) -> None:
        """Rebuild the non-persistent sin-cos table (created on meta by a meta-device load)."""
        self.patch_embed.pos_embed = self.patch_embed.table(self.patch_embed.proj.weight.device)

    def _check_inputs(self, x: Tensor, text: Tensor, timestep, sizes: dict) -> None:
        cfg = self.config
        b = check_latents(x, timestep, in_channels=cfg.in_channels, patch_size=cfg.patch_size,
                          max_grid=cfg.pos_embed_max_size)
        check_shape("encoder_hidden_states", text, (b, "L", cfg.text_embed_dim))
        for name, value in sizes.items():
            check_shape(name, value, (b, 2))

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Tensor,
        original_size: Tensor,
        target_size: Tensor,
        crop_coords: Tensor,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """Model output (B, C, H, W) for latents (B, C, H, W), text (B, L, text_dim) and (B, 2) size conditions."""
        sizes = dict(original_size=original_size, target_size=target_size, crop_coords=crop_coords)
        self._check_inputs(hidden_states, encoder_hidden_states, timestep, sizes)
        b, _, h, w = hidden_states.shape
        x, c = self.patch_embed(hidden_states, encoder_hidden_states)  # (B, N, D), (B, M, D)
        t = broadcast_timestep(timestep, b, hidden_states.device)
        emb = self.time_condition_embed(t, original_size, target_size, crop_coords, x.dtype)  # (B, D_t)
        def block_fn(i: int, block: nn.Module, s: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            return checkpointed(self, block, *s, emb)  # s: (B, N, D) image tokens, (B, M, D) text tokens

        x, c = run_blocks(self, self.transformer_blocks, block_fn, (x, c))
        m = self.norm_out(emb)
        x = self.proj_out(modulate(layer_norm(x, 1e-6), m.shift, m.scale))  # (B, N, C p p)
        out = unpatchify_2d(x, self.config.patch_size, h, w)  # (B, C, H, W)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


# ------------------------------------------------------------------------------------------------ presets
# THUDM/CogView3-Plus-3B transformer/config.json.
COGVIEW3_PLUS = dict(
    patch_size=2, in_channels=16, num_layers=30, attention_head_dim=40, num_attention_heads=64, out_channels=16,
    text_embed_dim=4096, time_embed_dim=512, condition_dim=256, pos_embed_max_size=128, sample_size=128,
)
