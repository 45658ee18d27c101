"""Diffusion transformers (DiT, MMDiT, CogVideoX, CogView3-Plus) and everything that drives them."""

__version__ = "0.1.0"
