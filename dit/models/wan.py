"""Wan 2.1 / 2.2: a DiT over video tokens with cross-attention to text (Wan Team 2025, arXiv:2503.20314).

Drop-in for diffusers' `WanTransformer3DModel`: same config keys, parameter names, forward arguments and outputs.
Covers Wan 2.1 T2V 1.3B / 14B, I2V 14B (CLIP image tokens with their own keys and values in the cross-attention;
FLF2V adds learned positions over the first and last frames' tokens), Wan 2.2 T2V / I2V A14B (this class, twice:
the two experts are chosen by the pipeline) and TI2V-5B (48 channels, one timestep per token).

    latents (B, C, F, H, W) --Conv3d patch (pt, ph, pw)--> video tokens x (B, N, D), N = F/pt * H/ph * W/pw
    timestep (B,) or (B, N) --sinusoid, MLP--> temb (B, [N,] D) --SiLU, Linear--> modulation (B, [N,] 6, D)
    text (B, T, text_dim) --Linear, GELU, Linear--> (B, T, D);  CLIP image tokens (B, M, image_dim) --> (B, M, D)
    block x num_layers (adaLN parameters = the block's scale_shift_table + the shared modulation):
        x += gate * SelfAttention(adaLN(LN(x)), 3D RoPE)      q/k RMSNorm over all heads
        x += CrossAttention(LN(x), text) [+ the same queries over the image tokens]
        x += gate * FFN(adaLN(LN(x)))
    LN(x), adaLN(model table + temb) --Linear--> (B, N, pt ph pw C_out) --unpatchify--> (B, C_out, F, H, W)

Norms and the residual stream's adaLN arithmetic run in fp32, as in diffusers (and the original code).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale
from einops import rearrange
from torch import Tensor, nn

from dit.embeddings import TimestepEmbedder
from dit.cache import StepCacheMixin, run_blocks
from dit.layers import (ADALN_ZERO, Attention, AttentionBackendMixin, FeedForward, Rope, broadcast_timestep,
                        checkpointed, gated_add, hooked, layer_norm, modulate, modulation_chunks)
from dit.models import lowmem
from dit.parallel.model import ContextParallelMixin
from dit.rope import apply_rope_, wan_rope

FINAL_CHUNKS = ("shift", "scale")  # the order of the output layer's scale_shift_table rows


# ----------------------------------------------------------------------------------------------- helpers


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (weights included), returned in the input's dtype (diffusers' FP32LayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def rotate(rotations: Tensor) -> Rope:
    """The RoPE hook of the video self-attention: rotate every token's channel pairs in place by `rotations`
    (N, Dh/2), unit complex64, broadcast over batch and heads."""
    return lambda t: apply_rope_(t, rotations)  # t: (B, H, N, Dh)


# ---------------------------------------------------------------------------------------------- embedders


class WanTextProjection(nn.Module):
    """Linear -> GELU (tanh) -> Linear (diffusers' PixArtAlphaTextProjection with act_fn='gelu_tanh')."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class WanImageEmbedding(nn.Module):
    """CLIP image tokens -> LN -> MLP (GELU) -> LN (I2V); FLF2V first adds learned positions over the first and
    last frames' tokens."""

    def __init__(self, in_features: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(in_features)  # eps 1e-5 (LayerNorm's default), as in diffusers
        self.ff = FeedForward(in_features, dim, mult=1, activation_fn="gelu")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = None
        if pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_features))

    def forward(self, image: Tensor) -> Tensor:
        """(B, M, E), or FLF2V's (2B, M, E) with each sample's first and last frame adjacent -> (B, M or 2M, D)."""
        if self.pos_embed is not None:
            image = image.reshape(-1, self.pos_embed.shape[1], image.shape[-1]) + self.pos_embed  # (B, 2M, E)
        return self.norm2(self.ff(self.norm1(image)))


class WanTimeTextImageEmbedding(nn.Module):
    """Timestep -> temb and the shared adaLN projection; text and image tokens -> the model width."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int, image_dim: int | None, pos_embed_seq_len: int | None):
        super().__init__()
        # diffusers' Timesteps(freq_dim, flip_sin_to_cos=True, shift 0) + TimestepEmbedding: same weights and names.
        self.time_embedder = TimestepEmbedder(freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)  # shared by all blocks; each adds its own scale_shift_table
        self.text_embedder = WanTextProjection(text_dim, dim)
        self.image_embedder = None
        if image_dim is not None:
            self.image_embedder = WanImageEmbedding(image_dim, dim, pos_embed_seq_len)

    def forward(self, timestep: Tensor, text: Tensor, image: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """timestep (B,) or per token (B, N) -> temb (B, [N,] D), modulation (B, [N,] 6, D); text (B, T, D),
        image (B, M, D) or None. temb takes the text's dtype (the compute dtype), as in diffusers."""
        temb = self.time_embedder(timestep.flatten())  # (B [N], D) in the embedder's dtype (kept fp32 on load)
        temb = temb.unflatten(0, timestep.shape).to(text.dtype)  # (B, [N,] D)
        modulation = self.time_proj(self.act_fn(temb)).unflatten(-1, (6, -1))  # (B, [N,] 6, D)
        return temb, modulation, self.text_embedder(text), None if image is None else self.image_embedder(image)


# ------------------------------------------------------------------------------------------------- block


class WanTransformerBlock(nn.Module):
    """adaLN self-attention with 3D RoPE -> cross-attention to text (+ image) -> adaLN FFN, all residual."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, cross_attn_norm: bool, eps: float,
                 added_kv_proj_dim: int | None):
        super().__init__()
        self.eps = eps
        # diffusers builds the q/k norms as RMSNorm over all heads whatever the config's qk_norm says.
        self.attn1 = Attention(dim, heads, dim // heads, qk_norm="rms_norm_across_heads", eps=eps)
        self.attn2 = Attention(dim, heads, dim // heads, qk_norm="rms_norm_across_heads", eps=eps,
                               added_kv_proj_dim=added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)  # rows in ADALN_ZERO order

    def forward(self, x: Tensor, text: Tensor, image: Tensor | None, modulation: Tensor, rope: Tensor) -> Tensor:
        """x (B, N, D) video tokens, text (B, T, D), image (B, M, D) or None; modulation (B, 6, D), or (B, N, 6, D)
        per token; rope (N, Dh/2) rotations. The residual stream is updated in fp32 and kept in x's dtype."""
        if lowmem.usable(self, x, text, modulation):  # inference: the same arithmetic in place and in token chunks
            return lowmem.wan_block(self, x, text, image, modulation, rope)
        m = modulation_chunks(self.scale_shift_table + modulation.float(), ADALN_ZERO)  # each (B, [N,] D), fp32
        h = modulate(layer_norm(x.float(), self.eps), m.shift_msa, m.scale_msa).type_as(x)
        x = gated_add(x.float(), m.gate_msa, self.attn1(h, rope=rotate(rope))).type_as(x)
        x = x + self.attn2(self.norm2(x.float()).type_as(x), text, added=image)
        h = modulate(layer_norm(x.float(), self.eps), m.shift_mlp, m.scale_mlp).type_as(x)
        return gated_add(x.float(), m.gate_mlp, self.ffn(h).float()).type_as(x)


# ------------------------------------------------------------------------------------------------- model


def _check_config(patch_size: tuple[int, ...], heads: int, head_dim: int, image_dim: int | None,
                  added_kv_proj_dim: int | None, pos_embed_seq_len: int | None) -> None:
    """ValueError for configs no released Wan has and diffusers would build into a model that cannot run."""
    if len(patch_size) != 3:
        raise ValueError(f"patch_size must be (t, h, w), e.g. (1, 2, 2), got {tuple(patch_size)}")
    if head_dim % 2:
        raise ValueError(f"attention_head_dim must be even for the rotary embedding, got {head_dim}; "
                         f"nearest valid: {head_dim - 1} or {head_dim + 1}")
    if (image_dim is None) != (added_kv_proj_dim is None):
        raise ValueError(f"image_dim ({image_dim}) and added_kv_proj_dim ({added_kv_proj_dim}) are set together "
                         "(I2V: image tokens get their own keys and values) or both left None")
    if added_kv_proj_dim is not None and added_kv_proj_dim != heads * head_dim:
        raise ValueError(f"added_kv_proj_dim must be the model width num_attention_heads * attention_head_dim = "
                         f"{heads * head_dim} (the image embedding's output), got {added_kv_proj_dim}")
    if pos_embed_seq_len is not None and image_dim is None:
        raise ValueError(f"pos_embed_seq_len ({pos_embed_seq_len}) positions image tokens: it needs image_dim")


def _nearest(n: int, p: int) -> str:
    """The multiples of p nearest to n, as text."""
    below, above = n - n % p, n + -n % p
    return f"{above}" if below == 0 else f"{below} or {above}"


class WanTransformer3DModel(ContextParallelMixin, AttentionBackendMixin, ModelMixin, ConfigMixin, PeftAdapterMixin,
                            StepCacheMixin):
    """Wan denoiser: Conv3d patches -> N blocks (self-attention with 3D RoPE, cross-attention, FFN) -> adaLN head.

    Config keys and defaults are exactly diffusers', so its config.json and safetensors load unchanged.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    _no_split_modules = ["WanTransformerBlock"]
    _keep_in_fp32_modules = ["rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    _repeated_blocks = ["WanTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        _check_config(patch_size, num_attention_heads, attention_head_dim, image_dim, added_kv_proj_dim,
                      pos_embed_seq_len)
        dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=tuple(patch_size), stride=tuple(patch_size))
        self.condition_embedder = WanTimeTextImageEmbedding(dim, freq_dim, text_dim, image_dim, pos_embed_seq_len)
        self.blocks = nn.ModuleList(
            WanTransformerBlock(dim, ffn_dim, num_attention_heads, cross_attn_norm, eps, added_kv_proj_dim)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)  # rows in FINAL_CHUNKS order
        self.gradient_checkpointing = False
        # Checkpoints converted by older diffusers hold an unused `attn2.norm_added_q`; diffusers skips it on load.
        self.register_load_state_dict_pre_hook(_drop_unused_keys)
        self.init_buffers()

    def init_buffers(self) -> None:
        """Forget cached RoPE tables (rebuilt per token grid and device on first use)."""
        self._rope_cache: dict[tuple, Tensor] = {}

    def _rope(self, frames: int, height: int, width: int, device: torch.device) -> Tensor:
        """Rotations (N, Dh/2), complex64, for a (frames, height, width) token grid."""
        key = (frames, height, width, device)
        if key not in self._rope_cache:
            self._rope_cache[key] = wan_rope(self.config.attention_head_dim, frames, height, width, device=device)
        return self._rope_cache[key]

    def enable_parallelism(self, config, **kwargs) -> None:
        """Context parallelism (see dit.parallel.model): video tokens are sharded; the cross-attention is local
        (each rank's video queries over all text and image tokens), so it keeps the plain backend."""
        super().enable_parallelism(config, **kwargs)
        for block in self.blocks:
            block.attn2.attn_backend = self._cp.previous_backend

    # -- forward --------------------------------------------------------------------------------------

    def _embed_patches(self, latents: Tensor) -> Tensor:
        """patch_embedding (B, C, F, H, W) -> (B, N, D) tokens. For inference, the Conv3d (stride = kernel) as one
        matmul over the flattened patches, which yields the token layout directly (no channels-first conv output
        to transpose); training, and a wrapped or hooked module (LoRA, offloading), call the module."""
        conv = self.patch_embedding
        if not lowmem.usable(conv, latents) or type(conv) is not nn.Conv3d or hooked(conv):
            return conv(latents).flatten(2).transpose(1, 2).contiguous()
        pt, ph, pw = conv.kernel_size
        patches = rearrange(latents, "b c (f pt) (h ph) (w pw) -> b (f h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
        return F.linear(patches, conv.weight.flatten(1), conv.bias)  # weight (D, C, pt, ph, pw): the same order

    def _check_inputs(self, x: Tensor, timestep: Any, text: Tensor, image: Tensor | None) -> None:
        """ValueError naming the expected shape or value, before any compute."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            got = tuple(x.shape)
            raise ValueError(f"hidden_states must be (batch, {cfg.in_channels}, frames, height, width) latents "
                             f"(in_channels={cfg.in_channels}), got {got}")
        b, _, f, h, w = x.shape
        for name, n, p in zip(("frames", "height", "width"), (f, h, w), cfg.patch_size):
            if n % p:
                raise ValueError(f"latent {name} must be divisible by the patch size {p} (patch_size="
                                 f"{tuple(cfg.patch_size)}), got {n} in hidden_states {tuple(x.shape)}; "
                                 f"nearest valid: {_nearest(n, p)}")
            if n // p > cfg.rope_max_seq_len:
                raise ValueError(f"latent {name} {n} gives {n // p} tokens, more than rope_max_seq_len="
                                 f"{cfg.rope_max_seq_len} positions; at most {cfg.rope_max_seq_len * p}")
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
            raise ValueError(f"encoder_hidden_states must be ({b}, text_len, {cfg.text_dim}) (text_dim="
                             f"{cfg.text_dim}), got {tuple(text.shape)}")
        n = math.prod(size // p for size, p in zip((f, h, w), cfg.patch_size))  # video tokens
        shape = tuple(timestep.shape) if isinstance(timestep, Tensor) else ()
        if shape not in ((), (1,), (b,), (b, n)):
            raise ValueError(f"timestep must be a scalar, ({b},), or per token ({b}, {n}) (batch, video tokens: "
                             f"Wan 2.2 TI2V), got shape {shape}")
        self._check_image(image, b)

    def _check_image(self, image: Tensor | None, b: int) -> None:
        cfg = self.config
        if cfg.image_dim is None:
            if image is not None:
                raise ValueError(f"encoder_hidden_states_image was passed ({tuple(image.shape)}) to a model without "
                                 "image_dim (text-to-video, or Wan 2.2 I2V, which takes the image in its latents); "
                                 "pass encoder_hidden_states_image=None")
            return
        pos = cfg.pos_embed_seq_len
        if pos is None:
            expected, ok = f"({b}, image_tokens, {cfg.image_dim})", image is not None and image.shape[0] == b
        else:  # FLF2V: the first and last frames' tokens of each sample, adjacent in the batch
            expected = f"({2 * b}, {pos // 2}, {cfg.image_dim}) (first and last frame per sample)"
            ok = image is not None and image.shape[0] == 2 * b and 2 * image.shape[1] == pos
        if image is None:
            raise ValueError(f"this model has image_dim={cfg.image_dim}: pass encoder_hidden_states_image "
                             f"{expected}, the CLIP image encoder's tokens")
        if not ok or image.ndim != 3 or image.shape[2] != cfg.image_dim:
            raise ValueError(f"encoder_hidden_states_image must be {expected} (image_dim={cfg.image_dim}"
                             f"{'' if pos is None else f', pos_embed_seq_len={pos}'}), got {tuple(image.shape)}")

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | int | float,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_image: Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Tensor] | Transformer2DModelOutput:
        """hidden_states (B, C, F, H, W) latents, timestep (B,) or per token (B, N), encoder_hidden_states
        (B, T, text_dim), encoder_hidden_states_image (B, M, image_dim) for I2V -> (B, C_out, F, H, W)."""
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
        cfg = self.config
        b, _, f, h, w = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, h // ph, w // pw)  # token grid (F', H', W')
        n = math.prod(grid)
        # The compute dtype: patch_embedding is exempt from layerwise casting (fp8 storage elsewhere).
        dtype, device = self.patch_embedding.weight.dtype, hidden_states.device

        x = self._embed_patches(hidden_states.to(dtype))  # (B, N, D), frame-major tokens
        t = torch.as_tensor(timestep, device=device)
        t = t if t.ndim == 2 else broadcast_timestep(t, b, device)  # (B,) or (B, N)
        image = None if encoder_hidden_states_image is None else encoder_hidden_states_image.to(dtype)
        temb, modulation, text, image = self.condition_embedder(t, encoder_hidden_states.to(dtype), image)
        rope = self._rope(*grid, device)  # (N, Dh/2)
        if self.is_parallel:  # context parallel: this rank's batch half (CFG) and video tokens; text stays whole
            (x,) = self._cp_shard(x)
            text, temb, modulation = (self._cfg_split(v) for v in (text, temb, modulation))
            image = None if image is None else self._cfg_split(image)
            if t.ndim == 2:  # per-token timesteps: this rank's rows
                temb, modulation = self._cp_shard_rows(temb, 1), self._cp_shard_rows(modulation, 1)
            rope = self._cp_shard_rows(rope)  # (N_r, Dh/2)

        def block_fn(i: int, block: nn.Module, s: tuple[Tensor]) -> tuple[Tensor]:  # s: ((B, N, D) video tokens,)
            return (checkpointed(self, block, s[0], text, image, modulation, rope),)

        (x,) = run_blocks(self, self.blocks, block_fn, (x,))

        m = modulation_chunks(self.scale_shift_table + temb.unsqueeze(-2), FINAL_CHUNKS)  # each (B, [N,] D)
        shift, scale = m.shift.to(x.device), m.scale.to(x.device)
        if lowmem.usable(self.proj_out, x, shift, scale):  # inference: as the blocks' adaLN norms
            x = lowmem.modulated_norm(x, shift, scale, cfg.eps)
        else:
            x = modulate(layer_norm(x.float(), cfg.eps), shift, scale).type_as(x)
        x = self.proj_out(x)  # (B, N, pt ph pw C_out)
        if self.is_parallel:
            x = self._cp_gather(x, n)  # (B / cfg, N_r, ..) shards -> (B, N, ..)
        out = rearrange(x, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                        f=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw)  # (B, C_out, F, H, W)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _drop_unused_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Remove `blocks.*.attn2.norm_added_q.*` (a query norm older diffusers conversions saved but nothing uses)."""
    for key in [k for k in state_dict if k.startswith(prefix) and ".norm_added_q." in k]:
        del state_dict[key]


# ------------------------------------------------------------------------------------------------ presets

# Released configs (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, -14B, Wan2.1-I2V-14B-*, Wan2.2-TI2V-5B-Diffusers
# transformer/config.json); keys as diffusers. Wan 2.2 T2V / I2V A14B are two WAN_2_1_14B-shaped experts
# (I2V: in_channels 36, no image_dim).
WAN_2_1_1_3B: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
WAN_2_1_14B: dict[str, Any] = dict(WAN_2_1_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
WAN_2_1_I2V_14B: dict[str, Any] = dict(WAN_2_1_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
WAN_2_1_FLF2V_14B: dict[str, Any] = dict(WAN_2_1_I2V_14B, pos_embed_seq_len=514)
WAN_2_2_I2V_A14B: dict[str, Any] = dict(WAN_2_1_14B, in_channels=36)
WAN_2_2_TI2V_5B: dict[str, Any] = dict(WAN_2_1_1_3B, num_attention_heads=24, ffn_dim=14336, in_channels=48,
                                       out_channels=48)
