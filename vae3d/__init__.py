"""The causal 3D VAE (CogVideoX architecture) with streaming, tiling and batch slicing."""

from .causal_conv import CausalConv3d, ConvCache
from .loading import load_vae
from .model import PRESETS, CausalVAE3D

__all__ = ["CausalConv3d", "CausalVAE3D", "ConvCache", "PRESETS", "load_vae"]
