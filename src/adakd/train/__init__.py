"""Training: DistillConfig, AdaKDTrainer (a transformers.Trainer), model loading and the run entry point.

Needs the ``train`` extra (transformers, peft, accelerate, pyyaml).

``build_trainer`` and ``run`` (:mod:`adakd.train.runner`) compose everything (data, models, a teacher cache, the
trainer, the Hub) and sit above the modules of this package that :mod:`adakd.cache` builds on. They load on first
use (PEP 562), so that importing, say, ``adakd.train.inputs`` does not run the runner and, through it, ``adakd.cache``.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, DistillConfig, load_config
from .trainer import AdaKDTrainer

__all__ = ["AdaKDTrainer", "ConfigError", "DistillConfig", "build_trainer", "load_config", "run"]


def __getattr__(name: str) -> Any:
    if name in ("build_trainer", "run"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
