"""The checks of :class:`adakd.train.trainer.AdaKDTrainer`'s arguments that do not need the Trainer: the fused
path's exactness (``loss.fused: auto`` picks it where it is exact) and the arguments' values."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..loss import AdaKDLoss
from .config import NONFINITE_POLICIES
from .engines import check_linear_head
from .teacher import Teacher, as_teacher

__all__ = ["auto_fused", "check_arguments", "check_fused"]


def auto_fused(student: torch.nn.Module, teacher: torch.nn.Module | Teacher | None) -> tuple[bool, str]:
    """``loss.fused: auto``: the fused path where it computes exactly the models' logits (each output layer is
    ``hidden @ Wᵀ (+ b)``, :func:`adakd.train.engines.check_linear_head`), else the logits path; with the reason."""
    try:
        check_fused(student, as_teacher(teacher))
    except ConfigError as e:
        return False, e.reason
    return True, "the output layers are hidden @ Wᵀ (+ b)"


def check_fused(student: torch.nn.Module, teacher: Teacher | None) -> None:
    """Refuse the fused path for a student or teacher whose logits it would not compute exactly (``ConfigError``
    with ``key="loss.fused"`` and the ``reason``)."""
    check_linear_head(student, "student")
    if teacher is not None:
        teacher.check_fused()


def check_arguments(loss_fn: AdaKDLoss, teacher: Teacher | None, kd_ratio: float, fused: Any, nonfinite: str) -> None:
    """The trainer's arguments that do not depend on the Trainer (``ValueError`` naming the argument)."""
    if loss_fn.reduction != "sum":
        raise ValueError("AdaKDTrainer needs AdaKDLoss(reduction='sum'): it normalises over the whole window")
    if teacher is None and kd_ratio > 0:
        raise ValueError("no teacher: kd_ratio must be 0 (plain SFT)")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite: unknown policy {nonfinite!r}; valid: {', '.join(NONFINITE_POLICIES)}")
    if fused not in (True, False, "auto"):
        raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
