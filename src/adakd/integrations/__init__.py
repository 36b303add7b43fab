"""AdaKD inside other training loops: the two steps every loop around :class:`adakd.AdaKDLoss` needs, and the
framework integrations.

- :func:`window_mean`: a micro-batch's share of the accumulation window's mean over kept tokens;
- :func:`step_latf`: the once-per-optimizer-step LATF update, with L_t averaged over micro-batches and ranks;
- :mod:`adakd.integrations.trl`: :class:`~adakd.integrations.trl.AdaKDDistillationTrainer`, TRL's
  ``DistillationTrainer`` with the AdaKD loss (``pip install 'adakd[trl]'``).

The two functions live in :mod:`adakd.window` (torch only), which both trainers import; they are re-exported here
for loops outside adakd. Each integration imports its framework itself.
"""

from __future__ import annotations

from ..window import step_latf, window_mean

__all__ = ["step_latf", "window_mean"]
