"""DiT: class-conditional diffusion transformer with adaLN-Zero (Peebles & Xie 2023, "Scalable Diffusion
Models with Transformers").

Drop-in for diffusers' DiTTransformer2DModel: same config keys, parameter names and forward arguments.
As in diffusers' port, every block owns its timestep+label embedder (`norm1.emb`); the final layer
reuses the first block's.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import Tensor, nn

from dit.embeddings import TimestepEmbedder, sincos_pos_embed_2d
from dit.cache import StepCacheMixin, run_blocks
from dit.layers import (ADALN_ZERO, Attention, AttentionBackendMixin, FeedForward, Modulation, broadcast_timestep,
                        checkpointed, gated_add, layer_norm, modulate)
from dit.models._image_common import check_latents


# ----------------------------------------------------------------------------------------------- embedders
class PatchEmbed(nn.Module):
    """Patchify (a stride-p conv) + fixed 2D sin-cos positions.

    The table for the training size is a non-persistent buffer (not in checkpoints): `init_buffers`
    rebuilds it after a meta-device load. Other sizes get their own table, on the same grid scale.
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size, self.grid = patch_size, sample_size // patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", self.table(self.grid, self.grid), persistent=False)

    def table(self, h: int, w: int, device=None) -> Tensor:
        dim = self.proj.out_channels
        return sincos_pos_embed_2d(dim, h, w, base_size=self.grid, device=device)[None]  # (1, h*w, D)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        # Called as a module (not via its weight) so offload / LoRA hooks on `proj` see the call.
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)
        pos = self.pos_embed if (h, w) == (self.grid, self.grid) else self.table(h, w, x.device)
        return tokens + pos.to(tokens.dtype)  # (B, h*w, D)


class LabelEmbedding(nn.Module):
    """Class embedding table; the extra last row is the "null" class used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0:  # label dropout trains the unconditional model
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)  # (B, D)


class TimestepLabelEmbedder(nn.Module):
    """c = timestep MLP + class embedding (diffusers' CombinedTimestepLabelEmbeddings; DiT's shift-1 frequencies)."""

    def __init__(self, num_classes: int, dim: int, class_dropout_prob: float = 0.1):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(256, dim, flip_sin_to_cos=True, downscale_freq_shift=1)
        self.class_embedder = LabelEmbedding(num_classes, dim, class_dropout_prob)

    def forward(self, timestep: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
        return self.timestep_embedder(timestep, dtype) + self.class_embedder(labels)  # (B, D)


class AdaLNZero(Modulation):
    """adaLN-Zero modulation that owns its conditioning embedder (`norm1.emb`, `norm1.linear`)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(dim, dim, ADALN_ZERO)
        self.emb = TimestepLabelEmbedder(num_classes, dim)


# ------------------------------------------------------------------------------------------------- block
class DiTBlock(nn.Module):
    """adaLN-Zero block: x += g1 * Attn(mod(LN(x))); x += g2 * MLP(mod(LN(x)))."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, num_classes: int, attention_bias: bool = True,
                 activation_fn: str = "gelu-approximate", dropout: float = 0.0, norm_eps: float = 1e-5,
                 norm_elementwise_affine: bool = False):
        super().__init__()
        self.norm1 = AdaLNZero(dim, num_classes)
        self.attn1 = Attention(dim, heads, head_dim, bias=attention_bias, dropout=dropout)
        # diffusers: the attention norm is AdaLayerNormZero's (eps 1e-6); the MLP norm takes norm_eps.
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, activation_fn=activation_fn, dropout=dropout)

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor) -> Tensor:
        m = self.norm1(self.norm1.emb(timestep, class_labels, x.dtype))  # named (B, D) chunks
        x = gated_add(x, m.gate_msa, self.attn1(modulate(layer_norm(x, 1e-6), m.shift_msa, m.scale_msa)))
        return gated_add(x, m.gate_mlp, self.ff(modulate(self.norm3(x), m.shift_mlp, m.scale_mlp)))


# ------------------------------------------------------------------------------------------------- model
class DiTTransformer2DModel(AttentionBackendMixin, ModelMixin, ConfigMixin,
                            StepCacheMixin):
    """Class-conditional DiT, a drop-in for diffusers' DiTTransformer2DModel (eps and variance out)."""

    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _supports_gradient_checkpointing = True
    _supports_group_offloading = False
    _repeated_blocks = ["DiTBlock"]  # regional compile (dit.compile)

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if norm_type != "ada_norm_zero":
            raise ValueError(f"norm_type {norm_type!r} is not supported; DiT uses 'ada_norm_zero'")
        if num_embeds_ada_norm is None:
            raise ValueError("num_embeds_ada_norm (the number of classes) must be set for 'ada_norm_zero'")
        self.inner_dim = dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        self.patch_size = patch_size
        self.pos_embed = PatchEmbed(sample_size, patch_size, in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(dim, num_attention_heads, attention_head_dim, num_classes=num_embeds_ada_norm,
                     attention_bias=attention_bias, activation_fn=activation_fn, dropout=dropout, norm_eps=norm_eps,
                     norm_elementwise_affine=norm_elementwise_affine)
            for _ in range(num_layers)
        )
        # Final layer: adaLN (shift, scale) from the first block's conditioning, then a linear to patches.
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self.gradient_checkpointing = False

    def init_buffers(self) -> None:
        """Rebuild the non-persistent sin-cos table (created on meta by a meta-device load)."""
        emb = self.pos_embed
        emb.pos_embed = emb.table(emb.grid, emb.grid, emb.proj.weight.device)

    def _check_inputs(self, x: Tensor, timestep, class_labels) -> None:
        cfg = self.config
        b = check_latents(x, timestep, in_channels=cfg.in_channels, patch_size=cfg.patch_size)
        labels = torch.as_tensor(class_labels) if class_labels is not None else None
        if labels is None or labels.shape != (b,) or labels.is_floating_point():
            got = None if labels is None else tuple(labels.shape)
            raise ValueError(f"class_labels must be integer class ids of shape ({b},), got {got}")
        n = cfg.num_embeds_ada_norm  # id n is the null (unconditional) class used by classifier-free guidance
        # A value check reads the tensor (a device sync; a graph break under torch.compile): eager only.
        if not torch.compiler.is_compiling() and labels.numel() and (labels.min() < 0 or labels.max() > n):
            raise ValueError(f"class_labels must lie in [0, {n}] ({n} = the null class), got {labels.tolist()}")

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | None = None,
        class_labels: Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """Model output (B, out_channels, H, W) for latents (B, C, H, W), timesteps and class labels."""
        self._check_inputs(hidden_states, timestep, class_labels)
        b, _, h, w = hidden_states.shape
        p = self.patch_size
        t = broadcast_timestep(timestep, b, hidden_states.device)
        y = torch.as_tensor(class_labels, device=hidden_states.device)
        x = self.pos_embed(hidden_states)  # (B, N, D), N = (H/p)(W/p)
        def block_fn(i: int, block: nn.Module, s: tuple[Tensor]) -> tuple[Tensor]:  # s: ((B, N, D),)
            return (checkpointed(self, block, s[0], t, y),)

        (x,) = run_blocks(self, self.transformer_blocks, block_fn, (x,))
        cond = self.transformer_blocks[0].norm1.emb(t, y, x.dtype)  # (B, D)
        shift, scale = self.proj_out_1(nn.functional.silu(cond)).chunk(2, dim=1)
        x = self.proj_out_2(modulate(layer_norm(x, 1e-6), shift, scale))  # (B, N, p*p*C_out)
        # DiT orders each token's outputs as (p1, p2, c).
        out = rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h // p, w=w // p, p1=p, p2=p)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


# ------------------------------------------------------------------------------------------------ presets
# facebook/DiT-XL-2-256 and -512 (learned sigma: 8 output channels for 4 latent channels).
DIT_XL_2_256 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
    patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    norm_elementwise_affine=False, norm_eps=1e-5, attention_bias=True, dropout=0.0, norm_num_groups=32,
    upcast_attention=False,
)
DIT_XL_2_512 = dict(DIT_XL_2_256, sample_size=64)
