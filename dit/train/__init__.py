"""Training on accelerate: `dit train CONFIG.yaml` (strict YAML config, see dit.train.config)."""

from dit.train import launch as _launch  # noqa: F401  (first import: records the launcher's pid, see launch.py)
from dit.train.config import TrainConfig, load_config, parse_config

__all__ = ["TrainConfig", "load_config", "parse_config", "train"]


def train(cfg: TrainConfig):
    """Run (or resume) the training described by `cfg`; returns the final export folder."""
    from dit.train.trainer import train as _train

    return _train(cfg)
