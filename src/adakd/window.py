"""The two steps every training loop around :class:`adakd.AdaKDLoss` needs, whatever the loop:

- :func:`window_mean`: a micro-batch's share of the accumulation window's mean over kept tokens;
- :func:`step_latf`: the once-per-optimizer-step LATF update, with L_t averaged over micro-batches and ranks.

Both trainers (:class:`adakd.train.AdaKDTrainer`, :class:`adakd.integrations.trl.AdaKDDistillationTrainer`) use
them, and :mod:`adakd.integrations` re-exports them for other loops. This module imports only torch.
"""

from __future__ import annotations

from typing import Any

import torch

from .loss import AdaKDLoss, LossReport

__all__ = ["step_latf", "window_mean"]


def window_mean(kd_sum: torch.Tensor, report: LossReport, window_tokens: torch.Tensor | float) -> torch.Tensor:
    """A micro-batch's share of the window's mean over kept tokens, as :class:`adakd.train.AdaKDTrainer` computes it.

    ``kd_sum`` (Σ τ²·D over the micro-batch's kept tokens, from ``AdaKDLoss(reduction="sum")``) divided by
    ``window_tokens`` (the valid tokens of the whole accumulation window, over every micro-batch and rank) times the
    micro-batch's kept share. With every token kept this is Σ / valid-in-window exactly, so the sum over the window's
    micro-batches does not depend on how the window was split.

    Args:
        kd_sum: scalar, the micro-batch's summed loss.
        report: that forward's :class:`adakd.loss.LossReport` (its kept and valid token counts).
        window_tokens: scalar, the window's valid-token count (≥ 1).

    Returns:
        A scalar to backpropagate (summed over the window's micro-batches it is the window's loss).
    """
    kept_fraction = report.kept_tokens / report.valid_tokens if report.valid_tokens else 1.0
    return kd_sum / (window_tokens * kept_fraction)


def step_latf(loss_fn: AdaKDLoss, accelerator: Any | None = None) -> None:
    """Advance the loss's ratio controller once, with L_t averaged over the training forwards since the last step
    and over every data-parallel rank (one all-reduce of :meth:`adakd.AdaKDLoss.pending`), so that all ranks hold
    the same ratio.

    Args:
        loss_fn: the loss.
        accelerator: an ``accelerate.Accelerator`` (its ``reduce`` and ``device``); None: ``torch.distributed`` when
            it is initialised (the tensor on the current CUDA device under NCCL), else this process alone.

    Every rank must call it at every optimizer step (the all-reduce is a collective). A step in which no rank saw a
    supervised token leaves the controller where it is.
    """
    import torch.distributed as dist

    pending = loss_fn.pending()
    if accelerator is not None:
        total = torch.tensor(pending, dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total, reduction="sum")
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        total = torch.tensor(pending, dtype=torch.float64, device=device)
        dist.all_reduce(total)
    else:
        total = torch.tensor(pending, dtype=torch.float64)
    if float(total[1]) > 0:
        loss_fn.step(float(total[0] / total[1]))  # also clears the loss's pending sums
