"""What one forward of :class:`adakd.AdaKDLoss` did: the :class:`LossReport` (imports only torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import OptionError

__all__ = ["LossReport", "Mix", "make_report"]


@dataclass(frozen=True)
class Mix:
    """How :class:`adakd.AdaKDLoss` mixes the student's cross-entropy with the distillation term and normalises
    both over an accumulation window (``forward(..., mix=Mix(...))``, ``forward_hidden(..., mix=...)``).

    The returned loss is ``(1 − α)·ΣCE / W + α·ΣKD_kept / (W·k/n)``: ΣCE over the n valid tokens of the call,
    ΣKD_kept the sum over the k kept tokens of w(τ)·D (as with ``reduction="sum"``), whatever the loss's own
    ``reduction``. Summed over a window's micro-batches it is the window's mix of the two means.

    Args:
        kd_ratio: α in [0, 1]. 0 computes the CE alone (the teacher may be None), 1 computes no CE.
        window_tokens: W, the valid tokens of the whole accumulation window (every micro-batch and rank), a scalar
            tensor or a number; None: this call's valid count n. Clamped to ≥ 1.
    """

    kd_ratio: float
    window_tokens: Tensor | float | None = None

    def __post_init__(self) -> None:
        alpha = self.kd_ratio
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise OptionError("kd_ratio", f"must be a number in [0, 1], got {alpha!r}")


@dataclass(frozen=True)
class LossReport:
    """What one forward of :class:`AdaKDLoss` did. ``loss`` is the returned value (per ``reduction``);
    ``mean_loss`` is L_t, the mean over kept tokens of τ_i²·D (what LATF consumes), whatever the reduction. The
    score statistics are NaN in plain-KD mode (keep all, one τ), which computes no scores; an empty batch (no
    valid token) has ``kept_tokens == valid_tokens == 0``."""

    loss: Tensor
    ratio: float
    valid_tokens: int
    kept_tokens: int
    tau_mean: float
    tau_min: float
    tau_max: float
    score_median: float
    score_threshold: float
    mean_loss: float
    ce_loss: float = math.nan  # the mean CE over the valid tokens, when ``ce_weight`` or a mix took it; else NaN
    # With a :class:`Mix`: ΣCE/W and ΣKD_kept/(W·k/n), so that (1 − α)·ce_term + α·kd_term is the loss; NaN for
    # the part the mix did not compute (the CE at α = 1, the KD at α = 0) and without a mix.
    ce_term: float = math.nan
    kd_term: float = math.nan

    def as_dict(self) -> dict[str, float]:
        """The statistics by their logged names (``loss`` is ``mean_loss``)."""
        return {
            "ratio": self.ratio, "valid_tokens": float(self.valid_tokens), "kept_tokens": float(self.kept_tokens),
            "tau_mean": self.tau_mean, "tau_min": self.tau_min, "tau_max": self.tau_max,
            "score_median": self.score_median, "score_threshold": self.score_threshold, "loss": self.mean_loss,
        }  # fmt: skip


def make_report(
    loss: Tensor, ratio: float, n: int, k: int, stats: Tensor, ce_mean: Tensor | float = math.nan
) -> LossReport:
    """The report of a forward that kept ``k`` of ``n`` valid tokens, read with one device sync.

    Args:
        loss: the returned loss (scalar).
        ratio: the ratio r the forward used.
        stats: ``[6]`` τ mean, min and max of the kept tokens, their scores' median and minimum, and L_t
            (:func:`adakd.fused.outcome.summarise`, or a plan's own).
        ce_mean: the mean CE over the valid tokens mixed into ``loss`` (0-d tensor), NaN when none was.
    """
    ce = torch.as_tensor(ce_mean, dtype=torch.float64, device=stats.device).reshape(1)
    values = torch.cat([stats.detach().double(), ce.detach()]).tolist()
    return LossReport(loss, float(ratio), int(n), int(k), *values[:6], ce_loss=values[6])
