"""CogVideoX: expert adaLN and full 3D attention over [text, video] tokens (Yang et al. 2024, arXiv:2408.06072).

Drop-in for diffusers' `CogVideoXTransformer3DModel`: same config keys, parameter names, forward arguments and
outputs. Covers 1.0-2B (3D sin-cos positions), 1.0-5B (3D RoPE; learned positions for I2V) and 1.5 (temporal
patches, `ofs` embedding). Text and video tokens travel as one joint sequence (B, T + N, D) through all blocks:
the two streams share every weight except their adaLN modulation ("expert" adaLN), so keeping them joint
saves the concatenations and splits diffusers does twice per block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale
from torch import Tensor, nn

from dit.embeddings import TimestepEmbedder, patchify_3d, sincos_pos_embed_3d, unpatchify_3d
from dit.cache import StepCacheMixin, run_blocks
from dit.layers import (Attention, AttentionBackendMixin, FeedForward, Modulation, Rope, broadcast_timestep,
                        checkpointed, expert_gated_add, expert_modulate, modulate)
from dit.models import lowmem
from dit.parallel.model import ContextParallelMixin
from dit.rope import apply_rope_, cogvideox_rope, rope_as_complex


# ----------------------------------------------------------------------------------------------- helpers


def video_rope(rotations: Tensor, n_text: int) -> Rope:
    """The RoPE hook of a joint [text, video] sequence: rotate the video tokens' channel pairs in place by
    `rotations` (N, Dh/2), unit complex64, broadcast over batch and heads; text tokens carry no rotation."""

    def rotate(t: Tensor) -> Tensor:  # (B, H, T + N, Dh)
        apply_rope_(t[:, :, n_text:], rotations)
        return t

    return rotate


# ---------------------------------------------------------------------------------------------- embedders


class CogVideoXPatchEmbed(nn.Module):
    """Text projection and video patch embedding into one joint sequence [text, video] (B, T + N, D).

    1.0 checkpoints hold a p x p Conv2d (applied per frame), 1.5 a Linear over (c, pt, p, p) patches; both are
    computed here as one matmul over patchified latents (a strided conv on CPU is much slower).
    """

    def __init__(self, patch_size: int, patch_size_t: int | None, in_channels: int, embed_dim: int,
                 text_embed_dim: int, bias: bool, max_text_seq_length: int, learned_grid: tuple[int, int, int] | None,
                 interpolation_scales: tuple[float, float] = (1.875, 1.0)):
        super().__init__()
        self.patch_size, self.patch_size_t = patch_size, patch_size_t
        if patch_size_t is None:
            self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size, bias=bias)
        else:
            # diffusers (and the released 1.5 weights) keep this bias whatever `patch_bias` says.
            self.proj = nn.Linear(in_channels * patch_size * patch_size * patch_size_t, embed_dim)
        self.text_proj = nn.Linear(text_embed_dim, embed_dim)
        if learned_grid is not None:
            # (1, max_text + N, D): trained positions, a checkpoint entry; initialised as diffusers does, to
            # zeros on text and 3D sin-cos on the (F', H', W') video grid of the sample size.
            video = sincos_pos_embed_3d(embed_dim, *learned_grid, spatial_interpolation_scale=interpolation_scales[0],
                                        temporal_interpolation_scale=interpolation_scales[1]).flatten(0, 1)
            pos = torch.cat([torch.zeros(max_text_seq_length, embed_dim, device=video.device), video])[None]
            self.register_buffer("pos_embedding", pos)
        else:
            self.pos_embedding = None

    def forward(self, text: Tensor, video: Tensor, text_pos: Tensor | None, video_pos: Tensor | None) -> Tensor:
        """text (B, T, Dt), video (B, F, C, H, W); positions None, (T, D) and (N, D) -> (B, T + N, D)."""
        patches = patchify_3d(video, self.patch_size, self.patch_size_t or 1)  # (B, N, C pt p p)
        weight = self.proj.weight.flatten(1)  # Conv2d (D, C, p, p) -> (D, C p p), same (c, p1, p2) order
        tokens = F.linear(patches, weight, self.proj.bias)  # (B, N, D)
        if video_pos is not None:
            tokens = tokens + video_pos
        text = self.text_proj(text)  # (B, T, D)
        if text_pos is not None:
            text = text + text_pos
        return torch.cat([text, tokens], dim=1)  # (B, T + N, D)


# ------------------------------------------------------------------------------------------------- block


class AdaLayerNormModulation(Modulation):
    """LayerNorm followed by named adaLN chunks from the timestep embedding (diffusers' `norm1.linear`/`norm1.norm`)."""

    def __init__(self, cond_dim: int, dim: int, names: tuple[str, ...], eps: float, affine: bool):
        super().__init__(cond_dim, dim, names)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)


class CogVideoXBlock(nn.Module):
    """LayerNorm + expert adaLN -> full 3D attention -> gated residual; the same for the MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, time_embed_dim: int, dropout: float, activation_fn: str,
                 attention_bias: bool, norm_elementwise_affine: bool, norm_eps: float):
        super().__init__()
        names = ("shift", "scale", "gate", "enc_shift", "enc_scale", "enc_gate")  # diffusers' chunk order
        self.norm1 = AdaLayerNormModulation(time_embed_dim, dim, names, norm_eps, norm_elementwise_affine)
        self.attn1 = Attention(dim, heads, head_dim, bias=attention_bias, qk_norm="layer_norm", eps=1e-6)
        self.norm2 = AdaLayerNormModulation(time_embed_dim, dim, names, norm_eps, norm_elementwise_affine)
        self.ff = FeedForward(dim, activation_fn=activation_fn, dropout=dropout, final_dropout=True)

    def forward(self, x: Tensor, temb: Tensor, n_text: int, rope: Tensor | None) -> Tensor:
        """x: joint [text, video] tokens (B, T + N, D); temb (B, time_embed_dim); rope (N, Dh/2) rotations or None."""
        rope = None if rope is None else video_rope(rope, n_text)
        if lowmem.usable(self, x, temb):  # inference: the same arithmetic in place and in token chunks
            return lowmem.cogvideox_block(self, x, temb, n_text, rope)
        m = self.norm1(temb)  # named chunks, each (B, D)
        h = expert_modulate(self.norm1.norm(x), n_text, (m.enc_shift, m.enc_scale), (m.shift, m.scale))
        x = expert_gated_add(x, n_text, (m.enc_gate, m.gate), self.attn1(h, rope=rope))
        m = self.norm2(temb)
        h = expert_modulate(self.norm2.norm(x), n_text, (m.enc_shift, m.enc_scale), (m.shift, m.scale))
        return expert_gated_add(x, n_text, (m.enc_gate, m.gate), self.ff(h))


# ----------------------------------------------------------------------------------------------- model


def _check_config(learned: bool, rotary: bool, timestep_activation_fn: str, ofs_embed_dim: int | None,
                  time_embed_dim: int) -> None:
    """ValueError for config combinations no released CogVideoX has (and diffusers would build wrongly)."""
    if learned and not rotary:
        raise ValueError(
            "use_learned_positional_embeddings=True needs use_rotary_positional_embeddings=True "
            "(the only CogVideoX models with learned positions, the 5B I2V ones, also use RoPE)"
        )
    if timestep_activation_fn != "silu":
        raise ValueError(f"timestep_activation_fn {timestep_activation_fn!r} is not supported; accepted: 'silu'")
    if ofs_embed_dim and ofs_embed_dim != time_embed_dim:
        raise ValueError(f"ofs_embed_dim ({ofs_embed_dim}) must equal time_embed_dim ({time_embed_dim}): "
                         "they are summed")


class CogVideoXTransformer3DModel(ContextParallelMixin, AttentionBackendMixin, ModelMixin, ConfigMixin,
                                  PeftAdapterMixin, StepCacheMixin):
    """CogVideoX denoiser: patch embed -> N expert-adaLN blocks over [text, video] -> adaLN out -> unpatchify.

    Config keys and defaults are exactly diffusers', so its config.json and safetensors load unchanged.
    """

    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]
    _supports_gradient_checkpointing = True
    _no_split_modules = ["CogVideoXBlock", "CogVideoXPatchEmbed"]
    _repeated_blocks = ["CogVideoXBlock"]  # regional compile (dit.compile, diffusers' compile_repeated_blocks)

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 30,
        attention_head_dim: int = 64,
        in_channels: int = 16,
        out_channels: int | None = 16,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embed_dim: int = 512,
        ofs_embed_dim: int | None = None,
        text_embed_dim: int = 4096,
        num_layers: int = 30,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_width: int = 90,
        sample_height: int = 60,
        sample_frames: int = 49,
        patch_size: int = 2,
        patch_size_t: int | None = None,
        temporal_compression_ratio: int = 4,
        max_text_seq_length: int = 226,
        activation_fn: str = "gelu-approximate",
        timestep_activation_fn: str = "silu",
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        spatial_interpolation_scale: float = 1.875,
        temporal_interpolation_scale: float = 1.0,
        use_rotary_positional_embeddings: bool = False,
        use_learned_positional_embeddings: bool = False,
        patch_bias: bool = True,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        _check_config(use_learned_positional_embeddings, use_rotary_positional_embeddings, timestep_activation_fn,
                      ofs_embed_dim, time_embed_dim)
        frames = (sample_frames - 1) // temporal_compression_ratio + 1  # latent frames of the sample size
        learned_grid = (frames, sample_height // patch_size, sample_width // patch_size)
        self.patch_embed = CogVideoXPatchEmbed(
            patch_size, patch_size_t, in_channels, dim, text_embed_dim, patch_bias, max_text_seq_length,
            learned_grid if use_learned_positional_embeddings else None,
            (spatial_interpolation_scale, temporal_interpolation_scale),
        )
        self.embedding_dropout = nn.Dropout(dropout)
        # diffusers' Timesteps(inner_dim) + TimestepEmbedding(inner_dim, time_embed_dim): same weights and names.
        self.time_embedding = TimestepEmbedder(dim, time_embed_dim, flip_sin_to_cos=flip_sin_to_cos,
                                               downscale_freq_shift=freq_shift)
        self.ofs_embedding = None
        if ofs_embed_dim:  # 1.5 I2V: the "offset" scalar, embedded like a timestep and added to it
            self.ofs_embedding = TimestepEmbedder(ofs_embed_dim, ofs_embed_dim, flip_sin_to_cos=flip_sin_to_cos,
                                                  downscale_freq_shift=freq_shift)
        self.transformer_blocks = nn.ModuleList(
            CogVideoXBlock(dim, num_attention_heads, attention_head_dim, time_embed_dim, dropout, activation_fn,
                           attention_bias, norm_elementwise_affine, norm_eps)
            for _ in range(num_layers)
        )
        self.norm_final = nn.LayerNorm(dim, norm_eps, norm_elementwise_affine)
        self.norm_out = AdaLayerNormModulation(time_embed_dim, dim, ("shift", "scale"), norm_eps, norm_elementwise_affine)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * (patch_size_t or 1) * out_channels)
        self.gradient_checkpointing = False
        self.init_buffers()

    # -- buffers --------------------------------------------------------------

    def init_buffers(self) -> None:
        """Forget cached position tables (they are rebuilt per input shape and device on first use)."""
        self._pos_cache: dict[tuple, Tensor] = {}
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    # -- positions ------------------------------------------------------------------------------------

    def _sincos_positions(self, frames: int, gh: int, gw: int, device: torch.device) -> Tensor:
        """3D sin-cos positions of the video tokens (N, D), fp32 (1.0-2B)."""
        key = (frames, gh, gw, device)
        if key not in self._pos_cache:
            cfg = self.config
            pos = sincos_pos_embed_3d(
                self.patch_embed.text_proj.out_features, frames, gh, gw, device=device,
                spatial_interpolation_scale=cfg.spatial_interpolation_scale,
                temporal_interpolation_scale=cfg.temporal_interpolation_scale,
            )  # (F, H W, D)
            self._pos_cache[key] = pos.flatten(0, 1)
        return self._pos_cache[key]

    def _positions(self, n_text: int, frames: int, gh: int, gw: int, device: torch.device
                   ) -> tuple[Tensor | None, Tensor | None]:
        """Absolute positions added to (text (T, D), video (N, D)) tokens; None where there are none."""
        cfg = self.config
        if not cfg.use_rotary_positional_embeddings:  # 1.0-2B: sin-cos on video, nothing on text
            return None, self._sincos_positions(frames, gh, gw, device)
        if not cfg.use_learned_positional_embeddings:  # RoPE only
            return None, None
        if frames != (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1:
            # diffusers falls back to sin-cos positions (zero on text) when only the frame count differs.
            return None, self._sincos_positions(frames, gh, gw, device)
        learned = self.patch_embed.pos_embedding[0]  # (max_text + N, D); text rows are trained as well
        return learned[:n_text], learned[cfg.max_text_seq_length:]

    def _rope(self, frames: int, gh: int, gw: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (frames, gh, gw, device)
        if key not in self._rope_cache:
            cfg = self.config
            self._rope_cache[key] = cogvideox_rope(
                cfg.attention_head_dim, frames, gh, gw, cfg.sample_height // cfg.patch_size,
                cfg.sample_width // cfg.patch_size, temporal_patch=cfg.patch_size_t is not None, device=device,
            )
        return self._rope_cache[key]

    # -- forward --------------------------------------------------------------------------------------

    def _check_inputs(self, x: Tensor, text: Tensor, ofs: Any, timestep_cond: Tensor | None,
                      image_rotary_emb: tuple[Tensor, Tensor] | None) -> None:
        """ValueError naming the expected shape, before any compute (diffusers may silently crop instead)."""
        cfg = self.config
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        if x.ndim != 5 or x.shape[2] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be (batch, frames, {cfg.in_channels}, height, width) latents, got {tuple(x.shape)}"
            )
        b, f, _, h, w = x.shape
        if h % p or w % p:
            raise ValueError(
                f"latent height and width must be divisible by patch_size={p}, got {h}x{w} in hidden_states "
                f"{tuple(x.shape)}; e.g. {h - h % p}x{w - w % p} or {h + -h % p}x{w + -w % p}"
            )
        if f % pt:
            raise ValueError(
                f"latent frames must be divisible by patch_size_t={pt}, got {f} frames in hidden_states "
                f"{tuple(x.shape)}; pad to {f + -f % pt} frames (CogVideoXPipeline does)"
            )
        # The text length is bounded only where absolute positions cover text rows: sin-cos (1.0-2B) and learned
        # (I2V) tables hold max_text_seq_length text rows before the video ones (diffusers' CogVideoXPatchEmbed
        # adds them to the joint sequence). With RoPE alone text carries no positions and any length works, as
        # in diffusers, whose pipeline passes 226 tokens whatever the config says.
        bounded = not cfg.use_rotary_positional_embeddings or cfg.use_learned_positional_embeddings
        text_len = f"text_len <= {cfg.max_text_seq_length}" if bounded else "text_len"
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_embed_dim:
            raise ValueError(
                f"encoder_hidden_states must be ({b}, {text_len}, {cfg.text_embed_dim}), got {tuple(text.shape)}"
            )
        if bounded and text.shape[1] > cfg.max_text_seq_length:
            raise ValueError(
                f"text is longer than max_text_seq_length={cfg.max_text_seq_length}, which this model's "
                f"{'learned' if cfg.use_learned_positional_embeddings else 'sin-cos'} positions cover: "
                f"encoder_hidden_states {tuple(text.shape)}, expected ({b}, {text_len}, {cfg.text_embed_dim})"
            )
        if cfg.use_learned_positional_embeddings and (h, w) != (cfg.sample_height, cfg.sample_width):
            raise ValueError(
                f"this model has learned positions for {cfg.sample_height}x{cfg.sample_width} latents only, "
                f"got {h}x{w} in hidden_states {tuple(x.shape)}"
            )
        if self.ofs_embedding is not None and ofs is None:
            raise ValueError("this model has an ofs embedding (ofs_embed_dim is set): pass ofs=")
        if timestep_cond is not None:
            raise ValueError("timestep_cond is not supported: CogVideoX's time embedding has no condition projection")
        if image_rotary_emb is not None:
            n = (f // pt) * (h // p) * (w // p)
            shape = (n, cfg.attention_head_dim)
            if not cfg.use_rotary_positional_embeddings:
                raise ValueError("image_rotary_emb was passed to a model without rotary embeddings")
            if len(image_rotary_emb) != 2 or any(tuple(t.shape) != shape for t in image_rotary_emb):
                got = [tuple(t.shape) for t in image_rotary_emb]
                raise ValueError(f"image_rotary_emb must be (cos, sin), each of shape {shape}, got {got}")

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: int | float | Tensor,
        timestep_cond: Tensor | None = None,
        ofs: int | float | Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> tuple[Tensor] | Transformer2DModelOutput:
        """hidden_states (B, F, C, H, W) latents, encoder_hidden_states (B, T, text_embed_dim) -> (B, F, C_out, H, W).

        image_rotary_emb: (cos, sin) from diffusers' pipeline, or None to compute the same from the input shape.
        """
        self._check_inputs(hidden_states, encoder_hidden_states, ofs, timestep_cond, image_rotary_emb)
        cfg = self.config
        b, f, _, h, w = hidden_states.shape
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        grid = (f // pt, h // p, w // p)  # token grid (F', H', W')
        # The compute dtype: patch_embed is exempt from layerwise casting (fp8 storage elsewhere).
        dtype, device = self.patch_embed.text_proj.weight.dtype, hidden_states.device
        n_text = encoder_hidden_states.shape[1]

        temb = self.time_embedding(broadcast_timestep(timestep, b, device), dtype)  # (B, time_embed_dim)
        if self.ofs_embedding is not None:
            temb = temb + self.ofs_embedding(broadcast_timestep(ofs, b, device), dtype)

        rope = None
        if cfg.use_rotary_positional_embeddings:
            cos, sin = image_rotary_emb if image_rotary_emb is not None else self._rope(*grid, device)
            rope = rope_as_complex(cos.to(device), sin.to(device))  # (N, Dh/2)
            del cos, sin  # full-length tables: under context parallelism only this rank's rows may stay alive

        text_pos, video_pos = (None if t is None else t.to(dtype) for t in self._positions(n_text, *grid, device))
        x = self.patch_embed(encoder_hidden_states.to(dtype), hidden_states.to(dtype), text_pos, video_pos)  # (B, T + N, D)
        x = self.embedding_dropout(x)
        if self.is_parallel:  # context parallel: this rank's batch half (CFG), text and video tokens, rotations
            text, video = self._cp_shard(x[:, :n_text], x[:, n_text:])
            x, n_text, temb = torch.cat([text, video], dim=1), text.shape[1], self._cfg_split(temb)
            del text, video  # views of the full-length embedding, which would otherwise live through every block
            rope = None if rope is None else self._cp_shard_rows(rope).clone()  # (N_r, Dh/2), not a view of (N, ..)

        def block_fn(i: int, block: nn.Module, s: tuple[Tensor]) -> tuple[Tensor]:  # s: ((B, T + N, D),)
            return (checkpointed(self, block, s[0], temb, n_text, rope),)

        (x,) = run_blocks(self, self.transformer_blocks, block_fn, (x,), hidden=lambda s: s[0][:, n_text:])

        video = self.norm_final(x[:, n_text:])  # (B, N, D); text tokens are done
        m = self.norm_out(temb)
        video = modulate(self.norm_out.norm(video), m.shift, m.scale)
        video = self.proj_out(video)  # (B, N, C_out pt p p)
        if self.is_parallel:
            video = self._cp_gather(video, grid[0] * grid[1] * grid[2])  # (B / cfg, N_r, ..) shards -> (B, N, ..)
        out = unpatchify_3d(video, p, pt, f, h, w)  # (B, F, C_out, H, W)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


# ------------------------------------------------------------------------------------------------ presets

# Released configs (THUDM/CogVideoX-2b, -5b, CogVideoX1.5-5B transformer/config.json); keys as diffusers.
COGVIDEOX_2B: dict[str, Any] = dict(
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
    freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=30, dropout=0.0, attention_bias=True,
    sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
    max_text_seq_length=226, activation_fn="gelu-approximate", timestep_activation_fn="silu",
    norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=False,
)
COGVIDEOX_5B: dict[str, Any] = dict(COGVIDEOX_2B, num_attention_heads=48, num_layers=42,
                                    use_rotary_positional_embeddings=True)
COGVIDEOX_5B_I2V: dict[str, Any] = dict(COGVIDEOX_5B, in_channels=32, use_learned_positional_embeddings=True)
COGVIDEOX_1_5_5B: dict[str, Any] = dict(COGVIDEOX_5B, sample_width=300, sample_height=300, sample_frames=81,
                                        patch_size_t=2, patch_bias=False)
COGVIDEOX_1_5_5B_I2V: dict[str, Any] = dict(COGVIDEOX_1_5_5B, in_channels=32, ofs_embed_dim=512)
