"""The causal 3D VAE (CogVideoX architecture) with streaming, tiling and time-sharded execution."""
