"""The causal 3D VAE in two configurations, CogVideoX's (``CausalVAE3D``) and Wan 2.1 / 2.2's (``WanVAE3D``),
with streaming, tiling, batch slicing and time sharding; ``load_vae`` picks the class from a folder's config."""

from .causal_conv import CausalConv3d, ConvCache, FlatCausalConv3d
from .loading import load_vae
from .model import PRESETS, CausalVAE3D
from .wan_model import PRESETS as WAN_PRESETS
from .wan_model import WanVAE3D

__all__ = ["CausalConv3d", "CausalVAE3D", "ConvCache", "FlatCausalConv3d", "PRESETS", "WAN_PRESETS", "WanVAE3D",
           "load_vae"]
