"""Training: DistillConfig, AdaKDTrainer (a transformers.Trainer), model loading and the run entry point.

Needs the ``train`` extra (transformers, peft, accelerate, pyyaml).
"""

from .config import ConfigError, DistillConfig, load_config
from .run import build_trainer, run
from .trainer import AdaKDTrainer

__all__ = ["AdaKDTrainer", "ConfigError", "DistillConfig", "build_trainer", "load_config", "run"]
