"""Diffusion transformers (DiT, MMDiT, CogVideoX, CogView3-Plus) and everything that drives them."""

__version__ = "0.1.0"


def load_transformer(path, *, torch_dtype=None, device=None, variant=None):
    """Load a diffusers-format transformer folder into our implementation (see dit.convert)."""
    from dit.convert import load_transformer as _load

    return _load(path, torch_dtype=torch_dtype, device=device, variant=variant)


def __getattr__(name: str):
    # Lazy: `import dit` stays light; the pipeline pulls in diffusers and transformers when first used.
    if name == "DiTPipeline":
        from dit.pipeline import DiTPipeline

        return DiTPipeline
    raise AttributeError(f"module 'dit' has no attribute {name!r}")
