"""Training on accelerate: `dit train CONFIG.yaml` (strict YAML config, see dit.train.config)."""

from dit.train.config import TrainConfig, load_config, parse_config

__all__ = ["TrainConfig", "load_config", "parse_config", "train"]


def train(cfg: TrainConfig):
    """Run (or resume) the training described by `cfg`; returns the final export folder."""
    from dit.train.trainer import train as _train

    return _train(cfg)
