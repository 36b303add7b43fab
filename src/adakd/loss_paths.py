"""The two computation paths of :class:`adakd.AdaKDLoss`: materialised logits (the reference) and the fused plans
of :mod:`adakd.fused` on hidden states and lm_head weights (imports only torch).

Both select tokens and temperatures by the same rule (:func:`adakd.adaptive.keep_hardest`, :class:`adakd.adaptive.IDTS`)
and report through the same :class:`~adakd.fused.outcome.Outcome`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import fused
from .adaptive import IDTS, hardest, keep_count, keep_hardest
from .divergences import DivergenceFn, compute_dtype
from .errors import OptionError
from .fused.outcome import Outcome, summarise
from .loss_report import LossReport
from .shapes import check_hidden_inputs, check_logits_inputs
from .sparse import FULL_STUDENT_INDICATORS, SparseTeacher, logit_scorer, pair_log_probs

__all__ = ["PathsMixin"]


class PathsMixin:
    """:class:`adakd.AdaKDLoss`'s ``_forward_logits`` and ``_forward_hidden`` (``forward`` and ``forward_hidden``
    without a mix, under a given reduction) and the selection they share."""

    div: DivergenceFn
    idts: IDTS
    controller: Any
    ratio: float
    tau_base: float
    tau_weight: str
    tau_has_grad: bool
    detach_tau: bool
    indicator: str
    ignore_index: int
    vocab_size: int | None
    impl: str
    one_pass: bool
    _prev_scores: Tensor | None
    _chunk_fns: dict

    def _weight(self, tau: Tensor | float) -> Tensor | float:
        """The per-token factor of Eq. 2: τ² (``tau_weight="squared"``) or 1 (``"none"``)."""
        return tau * tau if self.tau_weight == "squared" else 1.0

    def _scorer(self, dtype: torch.dtype, differentiable: bool = False):
        """The indicator on logits (dense or sparse teacher), at τ = 1."""
        score = self.score_with_grad if differentiable else self.score
        direct = None if differentiable else self.indicator
        return logit_scorer(score, dtype, self.indicator in FULL_STUDENT_INDICATORS, direct)

    def _keep(self, n: int) -> int:
        """k of n valid tokens at the current ratio (n without a controller)."""
        return n if self.controller is None else keep_count(n, self.ratio)

    def _needs_scores(self, n: int) -> bool:
        """Whether n valid tokens need difficulty scores: not in plain-KD mode (keep all, one τ)."""
        return not (self._keep(n) == n and self.idts.fixed)

    def _choose(self, n: int, score_pass: Callable[[], Tensor]):
        """Selection and temperatures for n valid tokens (Eqs. 4-10) on the logits path: ``(k, kept [k] | None
        (None: keep all, in position order), kept_scores [k] | None, tau)``. ``score_pass()`` returns the ``[n]``
        scores; it is not called in plain-KD mode (keep all, one τ), which needs none."""
        k = self._keep(n)
        if not self._needs_scores(n):
            return k, None, None, self.tau_base
        scores = score_pass()
        index, kept_scores = keep_hardest(scores, k)
        if not self.tau_has_grad:
            return k, index, kept_scores, self.idts.temperatures(kept_scores)
        if index is not None:
            return k, index, kept_scores, self.idts.with_grad(kept_scores)
        # Every token kept: τ's graph over the scores in rank order (its median's gradient sums in that order),
        # then moved back to position order.
        order = hardest(scores, n)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=order.device)
        return k, None, scores, self.idts.with_grad(scores[order])[inverse]

    def _forward_logits(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | SparseTeacher,
        labels: Tensor,
        ce_weight: float,
        reduction: str,
    ) -> tuple[Tensor, LossReport]:
        """:meth:`forward` without a mix, under ``reduction``."""
        student_logits, teacher_logits = check_logits_inputs(
            student_logits, teacher_logits, labels, self.vocab_size, self.ignore_index
        )
        student = student_logits.reshape(-1, student_logits.shape[-1])
        teacher = fused.teacher_source(teacher_logits)
        dtype = compute_dtype(student, teacher.dtype_ref)
        flat_labels = labels.reshape(-1)
        rows = (flat_labels != self.ignore_index).nonzero().squeeze(1)
        n = rows.numel()
        if n == 0:
            # An empty sum keeps the graph (backward gives zeros), even if the logits hold -inf.
            loss = student[:0].sum().to(dtype)
            return loss, self._record_empty(loss)

        def score_pass() -> Tensor:
            targets = flat_labels.index_select(0, rows)
            if self.tau_has_grad:  # τ will carry the gradient back through these scores
                return self._scorer(dtype, True)(student.index_select(0, rows), teacher.rows(rows), targets)
            with torch.no_grad():
                return self._scorer(dtype)(student.detach().index_select(0, rows), teacher.rows(rows), targets)

        _check_ce_weight(ce_weight)
        ratio = self.ratio
        k, kept, kept_scores, tau = self._choose(n, score_pass)
        ce_sum = None
        if ce_weight:
            valid = student.index_select(0, rows).to(dtype)
            ce_sum = torch.nn.functional.cross_entropy(valid, flat_labels.index_select(0, rows), reduction="sum")
        if kept is not None:
            rows = rows[kept]
        # One gather of the rows that take loss, straight from the inputs (no intermediate copy of all valid rows).
        z_t = teacher.whole
        if rows.numel() < student.shape[0]:
            student, z_t = student.index_select(0, rows), teacher.rows(rows)
        per_token = self.div(*pair_log_probs(student, z_t, tau, dtype))
        per_token = per_token * self._weight(tau)
        kd = per_token.mean() if reduction == "mean" else per_token.sum()
        ce_coef = ce_weight / n if reduction == "mean" else ce_weight * k / n
        loss = kd if ce_sum is None else kd + ce_coef * ce_sum
        self._finite(loss)
        ce_mean = math.nan if ce_sum is None else ce_sum.detach() / n
        return loss, self._record(loss, ratio, n, Outcome(k, summarise(tau, kept_scores, per_token.mean()), ce_mean))

    def _forward_hidden(
        self,
        student: tuple[Tensor, Tensor, Tensor | None],
        teacher: tuple[Tensor | SparseTeacher, Tensor | None, Tensor | None],
        labels: Tensor,
        ce_weight: float,
        reduction: str,
        *,
        chunk_size: int | None,
        impl: str | None,
        one_pass: bool | None,
    ) -> tuple[Tensor, LossReport]:
        """:meth:`forward_hidden` without a mix, under ``reduction``: the exact plan, or the one-pass plan when it
        is on and a previous micro-batch left its scores."""
        check_hidden_inputs(student, teacher, labels, self.vocab_size, self.ignore_index)
        if chunk_size is not None and chunk_size < 1:
            raise OptionError("chunk_size", f"must be a positive int, got {chunk_size}")
        hidden, weight, bias = student
        source = fused.LinearHead(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
        v_s = weight.shape[0]
        t_hidden, t_weight, t_bias = teacher
        crop = (None if t is None else t[:v_s] for t in (t_weight, t_bias))  # V_t's padding rows
        t_source = fused.teacher_source(t_hidden, *crop)
        dtype = compute_dtype(source.hidden, t_source.dtype_ref)
        flat_labels = labels.reshape(-1)
        rows = (flat_labels != self.ignore_index).nonzero().squeeze(1)
        n = rows.numel()
        if n == 0:
            # Empty sums keep every student input in the graph with a zero gradient.
            loss = source.hidden[:0].sum().to(dtype) + weight[:0].sum().to(dtype)
            if bias is not None:
                loss = loss + bias[:0].sum().to(dtype)
            return loss, self._record_empty(loss)
        targets = flat_labels.index_select(0, rows)
        _check_ce_weight(ce_weight)
        one_pass = self.one_pass if one_pass is None else one_pass
        if one_pass and not self.detach_tau:
            reason = "false needs one_pass off (one_pass takes its temperatures from the previous batch)"
            message = "one_pass supports detach_tau=True only (its temperatures come from the previous batch)"
            raise OptionError("detach_tau", reason, message)
        chunk_size = chunk_size or fused.default_chunk_size(v_s, source.hidden.device)
        impl, ratio = impl or self.impl, self.ratio
        if one_pass and self._needs_scores(n) and self._prev_scores is not None:
            plan = self._plan(dtype, impl, chunk_size, ce_weight, reduction)
            loss, outcome = fused.one_pass(source, t_source, rows, targets, plan, self._previous(rows.device))
            if outcome.kept:
                self._finite(loss)  # before the state changes
            self._prev_scores = outcome.scores
            if outcome.kept:
                return loss, self._record(loss, ratio, n, outcome)
        plan = self._plan(dtype, impl, chunk_size, ce_weight, reduction, self.tau_has_grad)
        loss, outcome = fused.exact(source, t_source, rows, targets, plan, self._keep(n))
        self._finite(loss)
        if one_pass and outcome.scores is not None:  # the one-pass state, once the loss is known to be finite
            self._prev_scores = outcome.scores
        return loss, self._record(loss, ratio, n, outcome)

    def _plan(
        self, dtype: torch.dtype, impl: str, chunk_size: int, ce_weight: float, reduction: str, tau_grad: bool = False
    ) -> fused.KDPlan:
        """The fused plans' view of the loss's settings (``tau_grad``: the gradient flows through τ)."""
        return fused.KDPlan(
            kd=self._kd_term(dtype, impl, tau_grad),
            score=self._scorer(dtype),
            idts=self.idts,
            mean=reduction == "mean",
            chunk_size=chunk_size,
            dtype=dtype,
            ce_weight=ce_weight,
            score_grad=self._scorer(dtype, True) if tau_grad else None,
        )

    def _previous(self, device: torch.device) -> tuple[float, float | None]:
        """The one-pass mode's (threshold, median) from the previous micro-batch's scores: its k-th score at the
        current ratio (-inf when every token was kept) and its kept scores' median (None for a fixed τ)."""
        prev = self._prev_scores.to(device)
        k_prev = self._keep(prev.numel())
        top = prev.topk(k_prev).values  # descending: the last is the k-th score
        threshold = top[-1].item() if k_prev < prev.numel() else -math.inf
        return threshold, None if self.idts.fixed else top.median().item()

    def _kd_term(self, dtype: torch.dtype, impl: str, tau_grad: bool = False) -> fused.KDTerm:
        key = (dtype, impl, tau_grad)
        if key not in self._chunk_fns:
            self._chunk_fns[key] = fused.chunk_loss_fn(self.div, dtype, impl, self.tau_weight, tau_grad)
        return self._chunk_fns[key]


def _check_ce_weight(ce_weight: float) -> None:
    if ce_weight < 0 or not math.isfinite(ce_weight):
        raise OptionError("ce_weight", f"must be a finite number >= 0, got {ce_weight}")
