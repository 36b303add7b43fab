"""What a fused plan returns besides its loss: :class:`Outcome`, every value the loss's report needs.

This module imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["STAT_NAMES", "Outcome", "empty_stats", "summarise"]

# The order of the values in :attr:`Outcome.stats`.
STAT_NAMES = ("tau_mean", "tau_min", "tau_max", "score_median", "score_threshold", "mean_loss")


@dataclass(frozen=True)
class Outcome:
    """The result of one AdaKD forward, next to its loss.

    Attributes:
        kept: k, the kept token count (0: the one-pass threshold kept nothing; the caller runs the exact passes).
        stats: ``[6]`` the statistics of :data:`STAT_NAMES` (τ of the kept tokens, their scores, L_t), still on
            the device: the report reads them with one sync.
        ce_mean: the mean CE over the valid tokens (0-d tensor) when one was mixed in, else NaN.
        scores: ``[n]`` every valid token's score at τ = 1 (the one-pass mode's state), None when none were taken.
    """

    kept: int
    stats: Tensor
    ce_mean: Tensor | float = math.nan
    scores: Tensor | None = None


def summarise(tau: Tensor | float, kept_scores: Tensor | None, mean_loss: Tensor) -> Tensor:
    """``[6]`` float32 :data:`STAT_NAMES` of a forward that kept tokens with temperatures ``tau`` (``[k]`` or one
    τ) and scores ``kept_scores [k]`` (None in plain-KD mode, which computes no scores: NaN), and L_t."""
    tau = tau.detach() if isinstance(tau, Tensor) else tau
    loss_value = mean_loss.detach().float()
    t = tau.float() if isinstance(tau, Tensor) else torch.full_like(loss_value, tau)
    nan = torch.full_like(loss_value, math.nan)
    s = None if kept_scores is None else kept_scores.detach().float()
    median, low = (nan, nan) if s is None else (s.median(), s.min())
    return torch.stack([t.mean(), t.min(), t.max(), median, low, loss_value])


def empty_stats(tau_base: float) -> Tensor:
    """:data:`STAT_NAMES` of a batch without a valid token: τ_base, and zeros."""
    return torch.tensor([tau_base] * 3 + [0.0] * 3, dtype=torch.float64)
