"""The CE/KD mix of :class:`adakd.AdaKDLoss` (``forward(..., mix=Mix(...))``): the loss normalised over an
accumulation window, as the trainer's algebra (imports only torch).

With a :class:`~adakd.loss_report.Mix` (α, W) the loss is ``(1 − α)·ΣCE/W + α·ΣKD_kept/(W·k/n)``: on the fused path
the KD sum carries the CE with weight w = (1 − α)/α (its gradients ride in the fused passes) and the whole is
divided by W·k/n and multiplied by α, exactly as ``adakd.integrations.window_mean`` scales a micro-batch's share.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from .errors import OptionError
from .fused import default_chunk_size, fused_cross_entropy
from .fused.outcome import empty_stats
from .loss_report import LossReport, Mix, make_report
from .shapes import check_student_inputs

__all__ = ["MixMixin", "check_mix", "kept_fraction", "window"]


def check_mix(mix: Mix, ce_weight: float, teacher: object) -> None:
    """A mix sets the CE's weight itself, and needs a teacher unless α = 0."""
    if not isinstance(mix, Mix):
        raise TypeError(f"mix must be an adakd.Mix, got {type(mix).__name__}")
    if ce_weight:
        raise OptionError("ce_weight", f"must be 0 with a mix (its kd_ratio sets the CE's weight), got {ce_weight}")
    if teacher is None and mix.kd_ratio > 0:
        raise ValueError(f"a mix with kd_ratio {mix.kd_ratio} > 0 needs a teacher (None only at kd_ratio 0)")


def window(mix: Mix, labels: Tensor, ignore_index: int) -> Tensor:
    """W as the trainer forms it: a float32 scalar ≥ 1 on the labels' device (the call's valid count for None);
    the callers promote it to a float64 loss's dtype."""
    if mix.window_tokens is None:
        return (labels != ignore_index).sum().clamp_min(1).to(torch.float32)
    return torch.as_tensor(mix.window_tokens, device=labels.device, dtype=torch.float32).clamp_min(1)


def kept_fraction(report: LossReport) -> float:
    """k/n of a forward (1 for a batch without a valid token), as ``adakd.integrations.window_mean`` takes it."""
    return report.kept_tokens / report.valid_tokens if report.valid_tokens else 1.0


class MixMixin:
    """:class:`adakd.AdaKDLoss`'s forwards with a :class:`Mix` (the loss's private ``_forward_logits`` and
    ``_forward_hidden`` under ``reduction="sum"`` do the work)."""

    ignore_index: int
    ratio: float
    tau_base: float
    last_report: LossReport | None

    def _mixed_logits(
        self, student_logits: Tensor, teacher: Any, labels: Tensor, mix: Mix, ce_weight: float
    ) -> tuple[Tensor, LossReport]:
        """The trainer's CE on the float32 logits, the KD sum, both normalised."""
        check_mix(mix, ce_weight, teacher)
        alpha = mix.kd_ratio
        denom = window(mix, labels, self.ignore_index)
        ce_sum = None
        if alpha < 1:
            flat = student_logits.reshape(-1, student_logits.shape[-1]).float()
            ce_sum = torch.nn.functional.cross_entropy(
                flat, labels.reshape(-1), ignore_index=self.ignore_index, reduction="sum"
            )
            self._finite(ce_sum)  # before the KD forward moves any state
        if alpha == 0:
            return self._ce_only(ce_sum, labels, denom)
        kd_sum, report = self._forward_logits(student_logits, teacher, labels, 0.0, "sum")
        denom = denom.to(torch.promote_types(denom.dtype, kd_sum.dtype))  # float64 losses keep float64 W·k/n
        kd = kd_sum / (denom * kept_fraction(report))
        loss = alpha * kd if ce_sum is None else (1 - alpha) * (ce_sum / denom) + alpha * kd
        return loss, self._mixed_report(report, loss, denom, alpha, ce_sum)

    def _mixed_hidden(
        self, student: tuple, teacher: tuple, labels: Tensor, mix: Mix, ce_weight: float, options: dict[str, Any]
    ) -> tuple[Tensor, LossReport]:
        """The CE in the fused passes (w = (1 − α)/α next to the kept tokens' KD sum), normalised by W·k/n, which
        makes it (1 − α)·ΣCE/W + α·ΣKD/(W·k/n) exactly as the trainer's algebra; at α = 0 the fused CE alone."""
        check_mix(mix, ce_weight, teacher[0])
        alpha = mix.kd_ratio
        denom = window(mix, labels, self.ignore_index)
        if alpha == 0:
            hidden, weight, bias = student
            check_student_inputs(hidden, weight, bias, labels)
            flat = hidden.reshape(-1, hidden.shape[-1])
            chunk_size = options["chunk_size"] or default_chunk_size(weight.shape[0], hidden.device)
            ce_sum = fused_cross_entropy(flat, weight, bias, labels.reshape(-1), chunk_size, self.ignore_index)
            return self._ce_only(ce_sum, labels, denom)
        total, report = self._forward_hidden(student, teacher, labels, (1 - alpha) / alpha, "sum", **options)
        denom = denom.to(torch.promote_types(denom.dtype, total.dtype))  # float64 losses keep float64 W·k/n
        loss = alpha * (total / (denom * kept_fraction(report)))
        return loss, self._mixed_report(report, loss, denom, alpha, None)

    def _ce_only(self, ce_sum: Tensor, labels: Tensor, denom: Tensor) -> tuple[Tensor, LossReport]:
        """A mix at α = 0: ΣCE/W and its report (nothing kept, no KD); the loss's state does not change."""
        loss = ce_sum / denom
        self._finite(loss)
        n = (labels != self.ignore_index).sum()
        report = make_report(loss, self.ratio, 0, 0, empty_stats(self.tau_base), math.nan)
        n, ce_total, w = torch.stack([n.double(), ce_sum.detach().double(), denom.double()]).tolist()
        ce_loss = ce_total / n if n else math.nan
        return loss, dataclasses.replace(
            report, valid_tokens=int(n), mean_loss=math.nan, ce_loss=ce_loss, ce_term=ce_total / w
        )

    def _mixed_report(
        self, report: LossReport, loss: Tensor, denom: Tensor, alpha: float, ce_sum: Tensor | None
    ) -> LossReport:
        """``report`` (kept as ``last_report``) with the mix's loss, ``ce_term`` and ``kd_term`` (one device sync)."""
        n = report.valid_tokens
        ce = torch.zeros_like(denom) if ce_sum is None else ce_sum.detach()
        value, ce_total, w = torch.stack([loss.detach().double(), ce.double(), denom.double()]).tolist()
        ce_loss = report.ce_loss if ce_sum is None else (ce_total / n if n else 0.0)
        ce_term = math.nan if alpha == 1 else ce_loss * n / w if n else 0.0
        # From the loss itself: the report's mean_loss is rounded to float32.
        kd_term = value if alpha == 1 else (value - (1 - alpha) * ce_term) / alpha
        report = dataclasses.replace(report, loss=loss, ce_loss=ce_loss, ce_term=ce_term, kd_term=kd_term)
        self.last_report = report
        return report
