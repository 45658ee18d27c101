"""MMDiT: Stable Diffusion 3 / 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers").

Image and text tokens keep separate weights (two streams) and meet in one joint attention. SD3.5 adds
RMS qk-norm and, in its first layers, a second image-only self-attention (MMDiT-X "dual attention").
Drop-in for diffusers' SD3Transformer2DModel: same config keys, parameter names, forward arguments.
"""

from __future__ import annotations

from typing import Any

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from einops import rearrange
from torch import Tensor, nn

from dit.embeddings import TimestepEmbedder, sincos_pos_embed_2d
from dit.cache import StepCacheMixin, run_blocks
from dit.layers import (ADALN_CONTINUOUS, ADALN_ZERO, Attention, AttentionBackendMixin, FeedForward, Modulation,
                        broadcast_timestep, checkpointed, gated_add, layer_norm, modulate)
from dit.models._image_common import TextProjection, check_latents, check_shape
from dit.parallel.model import ContextParallelMixin

EPS = 1e-6  # every LayerNorm / qk-norm in SD3


# ----------------------------------------------------------------------------------------------- embedders
class SD3PatchEmbed(nn.Module):
    """Patchify (a stride-p conv) + the centre crop of a max-size sin-cos grid.

    SD3 stores a (1, max*max, D) sin-cos table (a persistent buffer, so it is in the checkpoint) and adds
    the centre h x w window of it, so every resolution up to max sees positions around the grid centre.
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, dim: int, max_size: int):
        super().__init__()
        self.patch_size, self.max_size = patch_size, max_size
        self.base_size = sample_size // patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", self.table(), persistent=True)

    def table(self) -> Tensor:
        dim = self.proj.out_channels
        return sincos_pos_embed_2d(dim, self.max_size, self.max_size, base_size=self.base_size)[None]  # (1, M*M, D)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        # Called as a module (not via its weight) so offload / LoRA hooks on `proj` see the call.
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        pos = self.pos_embed.view(self.max_size, self.max_size, -1)[top: top + h, left: left + w]  # (h, w, D)
        return tokens + pos.reshape(1, h * w, -1).to(tokens.dtype)  # (B, h*w, D)


class TimestepTextEmbedder(nn.Module):
    """Conditioning vector: timestep MLP + pooled-text MLP (diffusers' CombinedTimestepTextProjEmbeddings)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(256, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.text_embedder = TextProjection(pooled_dim, dim)

    def forward(self, timestep: Tensor, pooled: Tensor) -> Tensor:
        return self.timestep_embedder(timestep, pooled.dtype) + self.text_embedder(pooled)  # (B, D)


# ------------------------------------------------------------------------------------------------- block
class JointTransformerBlock(nn.Module):
    """MMDiT block: per-stream adaLN-Zero and MLP, one joint attention over [image, text].

    `context_pre_only` (the last block): text only feeds keys/values, so it has no text MLP or output.
    `use_dual_attention` (SD3.5 MMDiT-X): a second image-only attention on the same normalised input.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, context_pre_only: bool = False,
                 qk_norm: str | None = None, use_dual_attention: bool = False):
        super().__init__()
        self.context_pre_only, self.use_dual_attention = context_pre_only, use_dual_attention
        dual = ("shift_msa2", "scale_msa2", "gate_msa2") if use_dual_attention else ()
        self.norm1 = Modulation(dim, dim, ADALN_ZERO + dual)
        # The last block's context norm is an AdaLayerNormContinuous: (scale, shift) only, no gates.
        self.norm1_context = Modulation(dim, dim, ("scale_msa", "shift_msa") if context_pre_only else ADALN_ZERO)
        self.attn = Attention(dim, heads, head_dim, qk_norm=qk_norm, eps=EPS, added_kv_proj_dim=dim, joint=True,
                              joint_out=not context_pre_only)
        self.attn2 = Attention(dim, heads, head_dim, qk_norm=qk_norm, eps=EPS) if use_dual_attention else None
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor,
                temb: Tensor) -> tuple[Tensor | None, Tensor]:
        x, c = hidden_states, encoder_hidden_states  # (B, N, D), (B, M, D)
        m, mc = self.norm1(temb), self.norm1_context(temb)  # named (B, D) chunks
        x_norm, c_norm = layer_norm(x, EPS), layer_norm(c, EPS)
        x_attn, c_attn = self.attn(modulate(x_norm, m.shift_msa, m.scale_msa),
                                   added=modulate(c_norm, mc.shift_msa, mc.scale_msa))  # joint over [image, text]
        x = gated_add(x, m.gate_msa, x_attn)
        if self.attn2 is not None:
            x = gated_add(x, m.gate_msa2, self.attn2(modulate(x_norm, m.shift_msa2, m.scale_msa2)))
        x = gated_add(x, m.gate_mlp, self.ff(modulate(layer_norm(x, EPS), m.shift_mlp, m.scale_mlp)))
        if self.context_pre_only:
            return None, x
        c = gated_add(c, mc.gate_msa, c_attn)
        c = gated_add(c, mc.gate_mlp, self.ff_context(modulate(layer_norm(c, EPS), mc.shift_mlp, mc.scale_mlp)))
        return c, x


# ------------------------------------------------------------------------------------------------- model
class SD3Transformer2DModel(ContextParallelMixin, AttentionBackendMixin, ModelMixin, ConfigMixin, PeftAdapterMixin,
                            StepCacheMixin):
    """MMDiT denoiser of SD3 / SD3.5, a drop-in for diffusers' SD3Transformer2DModel (flow velocity out)."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JointTransformerBlock"]
    _repeated_blocks = ["JointTransformerBlock"]  # regional compile (dit.compile)
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
    ):
        super().__init__()
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.inner_dim = dim = num_attention_heads * attention_head_dim
        self.pos_embed = SD3PatchEmbed(sample_size, patch_size, in_channels, dim, pos_embed_max_size)
        self.time_text_embed = TimestepTextEmbedder(dim, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(dim, num_attention_heads, attention_head_dim, context_pre_only=i == num_layers - 1,
                                  qk_norm=qk_norm, use_dual_attention=i in dual_attention_layers)
            for i in range(num_layers)
        )
        self.norm_out = Modulation(dim, dim, ADALN_CONTINUOUS)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self.gradient_checkpointing = False

    def init_buffers(self) -> None:
        """Rebuild the sin-cos table when it is on meta (built without weights, or a checkpoint lacks it)."""
        if self.pos_embed.pos_embed.is_meta:
            self.pos_embed.pos_embed = self.pos_embed.table().to(self.pos_embed.proj.weight.device)

    def _check_inputs(self, x: Tensor, c: Tensor | None, pooled: Tensor | None, timestep) -> None:
        cfg = self.config
        b = check_latents(x, timestep, in_channels=cfg.in_channels, patch_size=cfg.patch_size,
                          max_grid=cfg.pos_embed_max_size)
        check_shape("encoder_hidden_states", c, (b, "L", cfg.joint_attention_dim))
        check_shape("pooled_projections", pooled, (b, cfg.pooled_projection_dim))

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor = None,
        pooled_projections: Tensor = None,
        timestep: Tensor = None,
        block_controlnet_hidden_states: list | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """Velocity for latents (B, C, H, W) given text tokens (B, L, joint_dim) and pooled text (B, pooled_dim)."""
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        if joint_attention_kwargs and "ip_adapter_image_embeds" in joint_attention_kwargs:
            raise NotImplementedError("IP-Adapter image embeddings are not supported by this SD3 implementation")
        # diffusers' LoRA strength (`joint_attention_kwargs={"scale": s}`) for PEFT adapters loaded on us.
        lora_scale = (joint_attention_kwargs or {}).get("scale", 1.0) if USE_PEFT_BACKEND else 1.0
        if lora_scale != 1.0:
            scale_lora_layers(self, lora_scale)
        try:
            out = self._forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                block_controlnet_hidden_states, set(skip_layers or ()))
        finally:
            if lora_scale != 1.0:
                unscale_lora_layers(self, lora_scale)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def enable_parallelism(self, config, **kwargs) -> None:
        """Context parallelism (see dit.parallel.model); SD3.5's second attention sees image tokens only."""
        super().enable_parallelism(config, **kwargs)
        image_only = self._cp_stream_attention(0)
        for block in self.transformer_blocks:
            if block.attn2 is not None:
                block.attn2.attn_backend = image_only

    def _forward(self, latents: Tensor, text: Tensor, pooled: Tensor, timestep, controlnet, skip: set[int]) -> Tensor:
        b, _, h, w = latents.shape
        p = self.config.patch_size
        x = self.pos_embed(latents)  # (B, N, D), N = (H/p)(W/p)
        temb = self.time_text_embed(broadcast_timestep(timestep, b, latents.device), pooled)  # (B, D)
        c = self.context_embedder(text)  # (B, M, D)
        n_img = x.shape[1]
        if self.is_parallel:  # context parallel: this rank's batch half (CFG), image and text tokens
            x, c = self._cp_shard(x, c)
            temb = self._cfg_split(temb)
        def block_fn(i: int, block: nn.Module, s: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
            x, c = s  # (B, N, D) image tokens, (B, M, D) text tokens (None after a context_pre_only block)
            if i not in skip:
                c, x = checkpointed(self, block, x, c, temb)
            if controlnet is not None and not block.context_pre_only:
                # ControlNet residuals: evenly spread over the blocks (diffusers' interval rule).
                residual = controlnet[int(i / (len(self.transformer_blocks) / len(controlnet)))]
                x = x + (self._cp_shard_rows(self._cfg_split(residual), 1) if self.is_parallel else residual)
            return x, c

        x, _ = run_blocks(self, self.transformer_blocks, block_fn, (x, c))
        m = self.norm_out(temb)
        x = self.proj_out(modulate(layer_norm(x, EPS), m.shift, m.scale))  # (B, N, p*p*C)
        if self.is_parallel:
            x = self._cp_gather(x, n_img)  # (B / cfg, N_r, ..) shards -> (B, N, ..)
        # SD3 orders each token's outputs as (p1, p2, c).
        return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h // p, w=w // p, p1=p, p2=p)


# ------------------------------------------------------------------------------------------------ presets
# Released transformer configs (config.json of the diffusers-format checkpoints).
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SD3_5_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD3_5_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)
