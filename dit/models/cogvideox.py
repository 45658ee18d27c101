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
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale
from torch import Tensor, nn

from dit.attention import Backend, attention, resolve_backend
from dit.embeddings import TimestepEmbedder, patchify_3d, sincos_pos_embed_3d, unpatchify_3d
from dit.layers import Modulation, ModulationOut, modulate
from dit.parallel.model import ContextParallelMixin
from dit.rope import apply_rope_, cogvideox_rope, rope_as_complex

Rope = Tensor  # unit complex rotations (N, head_dim / 2), complex64, one per video token and channel pair


# ----------------------------------------------------------------------------------------------- helpers


def _autograd_free(*tensors: Tensor) -> bool:
    """True when no gradient flows through these tensors, so they may be overwritten in place."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def expert_modulate(h: Tensor, n_text: int, m: ModulationOut) -> Tensor:
    """Expert adaLN: text tokens h[:, :T] take the enc_* chunks, video tokens the others. (B, L, D) -> (B, L, D)."""
    ht, hv = h[:, :n_text], h[:, n_text:]  # (B, T, D), (B, N, D): views
    if _autograd_free(h, *m.values()):
        # In place: a fresh (B, L, D) tensor costs a page-faulting allocation and a pass on CPU.
        torch.addcmul(m.enc_shift[:, None], ht, 1 + m.enc_scale[:, None], out=ht)
        torch.addcmul(m.shift[:, None], hv, 1 + m.scale[:, None], out=hv)
        return h
    return torch.cat([modulate(ht, m.enc_shift, m.enc_scale), modulate(hv, m.shift, m.scale)], dim=1)


# Long sequences run the residual branches in token chunks (as diffusers' forward chunking, but by default):
# chunks under glibc's 32 MiB mmap threshold are reused heap, whereas a larger CPU allocation is a fresh mmap
# whose page faults cost several times the arithmetic done on it. Below CHUNK_ABOVE_BYTES fewer, larger ops
# win (each op is a thread barrier, costly on a shared CPU), so short sequences are not chunked.
CHUNK_BYTES = 16 << 20
CHUNK_ABOVE_BYTES = 256 << 20


def expert_gated_add(x: Tensor, fn: nn.Module, y: Tensor, n_text: int, gate_text: Tensor, gate_video: Tensor,
                     hidden: int) -> Tensor:
    """Gated residual x + gate * fn(y), one gate per stream; x, y (B, L, D), gates (B, D); fn acts per token
    with an intermediate of `hidden` channels.

    Without autograd the result is added into x in place, for long inputs chunk by chunk of tokens, so the
    (tokens, hidden) MLP state never exists in full.
    """
    if _autograd_free(x, y, gate_text, gate_video, *fn.parameters()):
        b, length, _ = y.shape
        row_bytes = hidden * y.element_size()
        rows = length if b * length * row_bytes <= CHUNK_ABOVE_BYTES else max(16, CHUNK_BYTES // row_bytes)
        if rows >= length:
            y = fn(y)  # (B, L, D)
            x[:, :n_text].addcmul_(y[:, :n_text], gate_text[:, None])
            x[:, n_text:].addcmul_(y[:, n_text:], gate_video[:, None])
            return x
        for i in range(b):
            for start, stop, gate in ((0, n_text, gate_text[i]), (n_text, length, gate_video[i])):
                for j in range(start, stop, rows):
                    k = min(j + rows, stop)
                    x[i, j:k].addcmul_(fn(y[i, j:k]), gate)  # (rows, D)
        return x
    y = fn(y)  # (B, L, D)
    return torch.cat(
        [torch.addcmul(x[:, :n_text], y[:, :n_text], gate_text[:, None]),
         torch.addcmul(x[:, n_text:], y[:, n_text:], gate_video[:, None])], dim=1,
    )


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


class CogVideoXAttention(nn.Module):
    """Full self-attention over [text, video] with per-head LayerNorm on q and k and RoPE on video tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, out_bias: bool):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias), nn.Dropout(0.0)])
        self._fused: tuple[tuple, Tensor, Tensor | None] | None = None

    def _qkv_params(self) -> tuple[Tensor, Tensor | None]:
        """One (3 inner, dim) weight for q, k, v, so the projection is a single matmul.

        Checkpoints (and LoRA files) keep to_q/to_k/to_v; the concatenation is cached until a weight changes
        (one extra copy of the q/k/v weights in inference, about 1/6 of a block's parameters). While gradients
        flow it is rebuilt every call so that it stays differentiable.
        """
        layers = (self.to_q, self.to_k, self.to_v)
        ws = [lin.weight for lin in layers]
        bs = [lin.bias for lin in layers]
        if not _autograd_free(*ws) or torch.compiler.is_compiling():  # compiled graphs fuse the cat themselves
            return torch.cat(ws), None if bs[0] is None else torch.cat(bs)
        # Inference tensors (weights made under inference_mode) carry no version counter; they cannot change.
        key = tuple((t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype, t.device) for t in ws + bs
                    if t is not None)
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, torch.cat(ws).detach(), None if bs[0] is None else torch.cat(bs).detach())
        return self._fused[1], self._fused[2]

    def forward(self, h: Tensor, n_text: int, rope: Rope | None, backend: Backend = None) -> Tensor:
        """h: joint tokens (B, L, D) -> (B, L, D)."""
        return self.to_out[0](self.attend(h, n_text, rope, backend))

    def attend(self, h: Tensor, n_text: int, rope: Rope | None, backend: Backend = None) -> Tensor:
        """Attention before the output projection: (B, L, D) -> (B, L, H Dh)."""
        if all(type(lin) is nn.Linear for lin in (self.to_q, self.to_k, self.to_v)):
            qkv = F.linear(h, *self._qkv_params())  # (B, L, 3 H Dh)
        else:  # wrapped (e.g. LoRA) projections: call them, so their extra terms count
            qkv = torch.cat([self.to_q(h), self.to_k(h), self.to_v(h)], dim=-1)
        qkv = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh), a view
        # LayerNorm writes a fresh tensor in the input's logical order, so q and k come out (B, H, L, Dh)
        # contiguous; the CPU attention kernel runs measurably faster on that layout (bf16: ~14%).
        q, k, v = self.norm_q(qkv[0]), self.norm_k(qkv[1]), qkv[2].contiguous()  # (B, H, L, Dh) each
        del qkv  # q, k, v are copies: the (B, L, 3 H Dh) projection need not live through the attention
        if rope is not None:  # video tokens only; (N, Dh/2) rotations broadcast over batch and heads
            apply_rope_(q[:, :, n_text:], rope)
            apply_rope_(k[:, :, n_text:], rope)
        out = attention(q, k, v, backend=backend)  # (B, H, L, Dh)
        return out.transpose(1, 2).flatten(2)  # (B, L, H Dh)


class GELUProj(nn.Module):
    """Linear then GELU (diffusers' `GELU` activation module, hence the `proj` name in checkpoints)."""

    def __init__(self, dim: int, hidden: int, approximate: str, bias: bool):
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=bias)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        if _autograd_free(x):
            return torch.ops.aten.gelu_(x, approximate=self.approximate)  # no second (B, L, 4D) buffer
        return F.gelu(x, approximate=self.approximate)


class FeedForward(nn.Module):
    """Transformer MLP laid out as diffusers' FeedForward (`ff.net.0.proj`, `ff.net.2`)."""

    def __init__(self, dim: int, hidden: int, activation_fn: str, dropout: float, bias: bool):
        super().__init__()
        acts = {"gelu-approximate": "tanh", "gelu": "none"}
        if activation_fn not in acts:
            raise ValueError(f"activation_fn {activation_fn!r} is not supported; accepted: {', '.join(acts)}")
        self.net = nn.ModuleList(
            [GELUProj(dim, hidden, acts[activation_fn], bias), nn.Dropout(dropout), nn.Linear(hidden, dim, bias=bias),
             nn.Dropout(dropout)]
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class CogVideoXBlock(nn.Module):
    """LayerNorm + expert adaLN -> full 3D attention -> gated residual; the same for the MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, time_embed_dim: int, dropout: float, activation_fn: str,
                 attention_bias: bool, norm_elementwise_affine: bool, norm_eps: float):
        super().__init__()
        names = ("shift", "scale", "gate", "enc_shift", "enc_scale", "enc_gate")  # diffusers' chunk order
        self.norm1 = AdaLayerNormModulation(time_embed_dim, dim, names, norm_eps, norm_elementwise_affine)
        self.attn1 = CogVideoXAttention(dim, heads, head_dim, attention_bias, out_bias=True)
        self.norm2 = AdaLayerNormModulation(time_embed_dim, dim, names, norm_eps, norm_elementwise_affine)
        self.ff = FeedForward(dim, 4 * dim, activation_fn, dropout, bias=True)

    def forward(self, x: Tensor, temb: Tensor, n_text: int, rope: Rope | None, backend: Backend = None) -> Tensor:
        """x: joint [text, video] tokens (B, T + N, D); temb (B, time_embed_dim)."""
        m = self.norm1(temb)  # named chunks, each (B, D)
        h = expert_modulate(self.norm1.norm(x), n_text, m)
        out = self.attn1.attend(h, n_text, rope, backend)  # (B, L, H Dh), before the output projection
        x = expert_gated_add(x, self.attn1.to_out[0], out, n_text, m.enc_gate, m.gate, x.shape[-1])
        m = self.norm2(temb)
        h = expert_modulate(self.norm2.norm(x), n_text, m)
        return expert_gated_add(x, self.ff, h, n_text, m.enc_gate, m.gate, self.ff.net[2].in_features)


# ----------------------------------------------------------------------------------------------- model


class CogVideoXTransformer3DModel(ContextParallelMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin):
    """CogVideoX denoiser: patch embed -> N expert-adaLN blocks over [text, video] -> adaLN out -> unpatchify.

    Config keys and defaults are exactly diffusers', so its config.json and safetensors load unchanged.
    """

    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]
    _supports_gradient_checkpointing = True
    _no_split_modules = ["CogVideoXBlock", "CogVideoXPatchEmbed"]

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
        if use_learned_positional_embeddings and not use_rotary_positional_embeddings:
            raise ValueError(
                "use_learned_positional_embeddings=True needs use_rotary_positional_embeddings=True "
                "(the only CogVideoX models with learned positions, the 5B I2V ones, also use RoPE)"
            )
        if timestep_activation_fn != "silu":
            raise ValueError(f"timestep_activation_fn {timestep_activation_fn!r} is not supported; accepted: 'silu'")
        if ofs_embed_dim and ofs_embed_dim != time_embed_dim:
            raise ValueError(f"ofs_embed_dim ({ofs_embed_dim}) must equal time_embed_dim ({time_embed_dim}): they are summed")

        learned_grid = None
        if use_learned_positional_embeddings:
            learned_grid = ((sample_frames - 1) // temporal_compression_ratio + 1, sample_height // patch_size,
                            sample_width // patch_size)
        self.patch_embed = CogVideoXPatchEmbed(
            patch_size, patch_size_t, in_channels, dim, text_embed_dim, patch_bias, max_text_seq_length, learned_grid,
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
        self.attn_backend: Backend = None
        self.init_buffers()

    # -- buffers, backend, diffusers API --------------------------------------------------------------

    def init_buffers(self) -> None:
        """Forget cached position tables (they are rebuilt per input shape and device on first use)."""
        self._pos_cache: dict[tuple, Tensor] = {}
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def set_attention_backend(self, backend: Backend) -> None:
        """'sdpa', 'xformers', 'math', or a callable attention(q, k, v, *, mask, scale) (context parallel)."""
        resolve_backend(backend)  # fail now, with the list of accepted names, rather than mid-forward
        self.attn_backend = backend

    def fuse_qkv_projections(self) -> None:
        """No-op kept for diffusers' pipeline API: q, k and v are always projected with one fused matmul."""

    def unfuse_qkv_projections(self) -> None:
        """No-op kept for diffusers' pipeline API (see fuse_qkv_projections)."""

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

    @staticmethod
    def _batched(t: Any, batch: int, device: torch.device) -> Tensor:
        """A timestep-like scalar, 0-d, (1,) or (B,) tensor -> (B,) tensor."""
        t = torch.as_tensor(t, device=device)
        return t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)

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
        dtype, device = self.time_embedding.linear_1.weight.dtype, hidden_states.device
        n_text = encoder_hidden_states.shape[1]

        temb = self.time_embedding(self._batched(timestep, b, device), dtype)  # (B, time_embed_dim)
        if self.ofs_embedding is not None:
            temb = temb + self.ofs_embedding(self._batched(ofs, b, device), dtype)

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

        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, temb, n_text, rope, self.attn_backend)
            else:
                x = block(x, temb, n_text, rope, self.attn_backend)

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
