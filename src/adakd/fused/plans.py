"""The pass schedules of the fused AdaKD loss, each run inside :class:`~adakd.fused.function.FusedFunction`.

- :func:`exact`: pass 1 scores every valid row (no gradient; a mixed-in CE rides along, value and gradient); the
  top-k, the median and the temperatures follow; pass 2 takes the loss and gradients of the kept rows (with the
  1/τ fold where the sources allow it). Plain-KD mode (keep all, one τ) skips pass 1 and takes the CE in pass 2.
- τ-gradient (:func:`exact` with ``KDPlan.score_grad``): pass 2 also returns ∂L/∂τ; τ's graph, built once from the
  kept scores, turns it into ∂L/∂s; pass 3 carries that back through the indicator to the logits.
- :func:`one_pass`: score, select by the previous micro-batch's threshold and differentiate each chunk at once,
  with the previous micro-batch's median.
- :func:`cross_entropy`: the CE alone.

This module imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..adaptive import IDTS, keep_hardest
from ..sparse import LogitScore
from .function import GradBuffers, Job, run_job
from .outcome import Outcome, summarise
from .sources import LinearHead, TeacherSource, chunks
from .terms import KDTerm, ce_chunk, score_backprop

__all__ = ["KDPlan", "cross_entropy", "exact", "one_pass"]


@dataclass(frozen=True)
class KDPlan:
    """What a plan needs of the loss's settings.

    Attributes:
        kd: the per-chunk divergence term (built with ``tau_grad`` for the τ-gradient path).
        score: the difficulty indicator on logits at τ = 1, without gradient.
        idts: the temperatures.
        mean: divide the KD sum by the kept count (``reduction="mean"``) or not.
        chunk_size: rows per chunk.
        dtype: the computation dtype (float32, or float64 for float64 inputs).
        ce_weight: w ≥ 0, the CE's weight next to L_t (see :meth:`adakd.AdaKDLoss.forward`).
        score_grad: the differentiable indicator when the gradient flows through τ, else None.
    """

    kd: KDTerm
    score: LogitScore
    idts: IDTS
    mean: bool
    chunk_size: int
    dtype: torch.dtype
    ce_weight: float = 0.0
    score_grad: LogitScore | None = None

    def ce_coef(self, n: int, k: int) -> float:
        """The factor of Σ CE: w/n next to L_t (``mean``), or w·k/n next to the kept tokens' sum."""
        return self.ce_weight / n if self.mean else self.ce_weight * k / n


def _zero(plan: KDPlan, device: torch.device) -> Tensor:
    return torch.zeros((), dtype=plan.dtype, device=device)


def _score_pass(student, teacher, rows, targets, plan: KDPlan, ce_grads: GradBuffers | None):
    """Pass 1: ``([n] scores, Σ CE | None)``; with ``ce_grads`` the CE's gradients are added to them."""
    scores = torch.empty(rows.numel(), dtype=plan.dtype, device=rows.device)
    ce_sum = None if ce_grads is None else _zero(plan, rows.device)
    for ch in chunks(rows, plan.chunk_size, student, teacher):
        y = ch.part(targets)
        scores[ch.start : ch.stop] = plan.score(ch.student, ch.teacher, y)
        if ce_grads is not None:
            total, grad = ce_chunk(ch.student, y, plan.dtype)
            ce_sum += total
            if ce_grads.any:
                ce_grads.add(ch.rows, ch.hidden, grad, accumulate=True)
    return scores, ce_sum


def _kd_pass(student, teacher, rows, tau, plan: KDPlan, grads: GradBuffers, ce: dict | None, scale: float):
    """Pass 2 without the fold: Σ w(τ)·D of ``rows`` and its gradients times ``scale`` into ``grads`` (added to
    pass 1's when ``ce`` is None and ``grads`` hold them, else written). ``ce`` (every row kept, no pass 1):
    ``{"targets", "coef", "sum", "weighted"}``, the CE from the same logits, its sum and its sum times ``coef``
    accumulated into them."""
    total = _zero(plan, rows.device)
    accumulate = ce is None and plan.ce_weight > 0
    for ch in chunks(rows, plan.chunk_size, student, teacher):
        loss_c, g = plan.kd(ch.student, ch.teacher, ch.part(tau))
        total += loss_c
        g = g * scale
        if ce is not None:
            ce_c, g_ce = ce_chunk(ch.student, ch.part(ce["targets"]), plan.dtype)
            ce["sum"] += ce_c
            ce["weighted"] += ce_c * ce["coef"]
            g = g + ce["coef"] * g_ce
        if grads.any:
            grads.add(ch.rows, ch.hidden, g, accumulate=accumulate)
    return total


def _folded_pass(student, teacher, rows, tau: Tensor, plan: KDPlan, grads: GradBuffers, scale: float) -> Tensor:
    """Pass 2 with 1/τ_i applied to the hidden states (``[c, H]``) rather than to the logits (``[c, V]``): two
    ``[c, V]`` divisions fewer per chunk; the τ² weight is passed apart."""
    total = _zero(plan, rows.device)
    weight = plan.kd.weight_of(tau)
    for ch in chunks(rows, plan.chunk_size, student, teacher, fold=tau):
        loss_c, g = plan.kd(ch.student, ch.teacher, 1.0, ch.part(weight))
        total += loss_c
        if grads.any:
            grads.add(ch.rows, ch.hidden, g * scale, accumulate=plan.ce_weight > 0, row_scale=ch.inv)
    return total


def _tau_grad_pass(student, teacher, rows, kept_scores, targets, plan: KDPlan, grads: GradBuffers, scale: float):
    """Passes 2 and 3 with the gradient through τ: ``(Σ w(τ)·D, τ [k])``, τ's graph built once here."""
    with torch.enable_grad():
        s_k = kept_scores.detach().to(plan.dtype).requires_grad_(True)
        tau_graph = plan.idts.with_grad(s_k)
    tau = tau_graph.detach()
    grad_tau = torch.zeros_like(tau)
    total = _zero(plan, rows.device)
    for ch in chunks(rows, plan.chunk_size, student, teacher):
        loss_c, g, g_tau = plan.kd(ch.student, ch.teacher, ch.part(tau))
        total += loss_c
        grad_tau[ch.start : ch.stop] = g_tau
        if grads.any:
            grads.add(ch.rows, ch.hidden, g * scale, accumulate=plan.ce_weight > 0)
    if grads.any:
        (grad_scores,) = torch.autograd.grad(tau_graph, s_k, grad_outputs=grad_tau * scale)
        for ch in chunks(rows, plan.chunk_size, student, teacher):
            y, g_s = ch.part(targets), ch.part(grad_scores)
            g = score_backprop(plan.score_grad, ch.student, ch.teacher, y, g_s, plan.dtype)
            grads.add(ch.rows, ch.hidden, g, accumulate=True)
    return total, tau


def exact(
    student: LinearHead,
    teacher: TeacherSource,
    rows: Tensor,
    targets: Tensor,
    plan: KDPlan,
    k: int,
) -> tuple[Tensor, Outcome]:
    """The exact AdaKD loss of the valid ``rows [n]`` (``targets [n]``), keeping k of them, and its
    :class:`Outcome`; gradients into the student's hidden states, weight and bias. Plain-KD mode (k = n and a
    fixed τ) computes no scores."""

    def run(grads: GradBuffers) -> tuple[Tensor, Outcome]:
        n = rows.numel()
        mixed = plan.ce_weight > 0
        scores = ce_sum = kept_scores = None
        index, tau = None, plan.idts.tau_base
        if not (k == n and plan.idts.fixed):
            scores, ce_sum = _score_pass(student, teacher, rows, targets, plan, grads if mixed else None)
            index, kept_scores = keep_hardest(scores, k)
            if plan.score_grad is None:
                tau = plan.idts.temperatures(kept_scores)
        kept_rows = rows if index is None else rows[index]
        scale = 1.0 / k if plan.mean else 1.0
        coef = plan.ce_coef(n, k) if mixed else 0.0
        ce_total = _zero(plan, rows.device)
        if ce_sum is not None:  # pass 1 brought the CE's gradients: weigh them now, pass 2 adds to them
            grads.scale_(coef)
            ce_total = ce_sum * coef
        if plan.score_grad is not None:
            kept_targets = targets if index is None else targets[index]
            total, tau = _tau_grad_pass(student, teacher, kept_rows, kept_scores, kept_targets, plan, grads, scale)
        elif isinstance(tau, Tensor) and student.foldable and teacher.foldable:
            total = _folded_pass(student, teacher, kept_rows, tau, plan, grads, scale)
        else:
            ce = None
            if mixed and ce_sum is None:  # every row kept, no pass 1: the CE from pass 2's logits
                ce = {"targets": targets, "coef": coef, "sum": _zero(plan, rows.device), "weighted": ce_total}
            total = _kd_pass(student, teacher, kept_rows, tau, plan, grads, ce, scale)
            if ce is not None:
                ce_sum = ce["sum"]
        kd = total * scale
        stats = summarise(tau, kept_scores, kd if plan.mean else kd / k)
        outcome = Outcome(k, stats, math.nan if ce_sum is None else ce_sum / n, scores)
        return kd + ce_total, outcome

    return run_job(student.hidden, student.weight, student.bias, Job(run, plan.dtype))


class _Tally:
    """The one-pass plan's running sums over the chunks: Σ w(τ)·D, Σ CE, Σ τ, min/max τ and the kept count."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.total = torch.zeros((), dtype=dtype, device=device)
        self.ce_sum = torch.zeros((), dtype=dtype, device=device)
        self.tau_sum = torch.zeros((), dtype=dtype, device=device)
        self.tau_min = torch.full((), math.inf, dtype=dtype, device=device)
        self.tau_max = torch.full((), -math.inf, dtype=dtype, device=device)
        self.count = 0

    def add_tau(self, tau: Tensor | float, kept: int) -> None:
        if isinstance(tau, Tensor):
            self.tau_sum += tau.sum()
            self.tau_min, self.tau_max = torch.minimum(self.tau_min, tau.min()), torch.maximum(self.tau_max, tau.max())
        else:
            self.tau_sum += tau * kept
            self.tau_min.clamp_(max=tau)
            self.tau_max.clamp_(min=tau)


def one_pass(
    student: LinearHead,
    teacher: TeacherSource,
    rows: Tensor,
    targets: Tensor,
    plan: KDPlan,
    previous: tuple[float, float | None],
) -> tuple[Tensor, Outcome]:
    """The one-pass approximation over the valid ``rows [n]``: each chunk is scored, the rows scoring at least the
    previous micro-batch's threshold are kept and differentiated at once, with τ from the previous micro-batch's
    median; ``previous = (threshold (-inf keeps all), median (None for a fixed τ))``. ``Outcome.kept`` 0: nothing
    passed (run :func:`exact`). The CE's gradients wait in a second buffer until the kept count is known."""
    threshold, median = previous

    def run(grads: GradBuffers) -> tuple[Tensor, Outcome]:
        ce_grads = grads.like() if plan.ce_weight else None
        scores = torch.empty(rows.numel(), dtype=plan.dtype, device=rows.device)
        tally = _Tally(plan.dtype, rows.device)
        for ch in chunks(rows, plan.chunk_size, student, teacher):
            y = ch.part(targets)
            s = plan.score(ch.student, ch.teacher, y)
            scores[ch.start : ch.stop] = s
            if ce_grads is not None:
                ce_c, g_ce = ce_chunk(ch.student, y, plan.dtype)
                tally.ce_sum += ce_c
                if ce_grads.any:
                    ce_grads.add(ch.rows, ch.hidden, g_ce, accumulate=True)
            keep = (s >= threshold).nonzero().squeeze(1)
            if keep.numel() == 0:
                continue
            tally.count += keep.numel()
            r, h, z_s, z_t = ch.rows, ch.hidden, ch.student, ch.teacher
            if keep.numel() < r.numel():
                r, h, s = r.index_select(0, keep), h.index_select(0, keep), s.index_select(0, keep)
                z_s, z_t = z_s.index_select(0, keep), teacher.take(z_t, keep)
            tau = plan.idts.tau_base if median is None else plan.idts.from_median(s, median)
            tally.add_tau(tau, keep.numel())
            loss_c, g = plan.kd(z_s, z_t, tau)
            tally.total += loss_c
            if grads.any:
                grads.add(r, h, g)
        return _one_pass_total(grads, ce_grads, plan, tally, scores, threshold)

    return run_job(student.hidden, student.weight, student.bias, Job(run, plan.dtype))


def _one_pass_total(grads, ce_grads, plan: KDPlan, tally: _Tally, scores: Tensor, threshold: float):
    """The one-pass loss and :class:`Outcome` once every chunk is done: the KD scaled by the kept count, the CE's
    gradients weighed in, the statistics of this batch's kept rows."""
    n, count = scores.numel(), tally.count
    scale = 1.0 / max(count, 1) if plan.mean else 1.0
    grads.scale_(scale)
    ce_total = _zero(plan, scores.device)
    if ce_grads is not None:
        coef = plan.ce_coef(n, count)
        grads.add_scaled_(ce_grads, coef)
        ce_total = tally.ce_sum * coef
    kd = tally.total * scale
    if count == 0:
        return kd + ce_total, Outcome(0, torch.zeros(6, dtype=torch.float64), scores=scores)
    kept = scores[scores >= threshold]  # the same statistics as the exact path: of this batch's kept scores
    mean_loss = kd.double() if plan.mean else kd.double() / count
    stats = [tally.tau_sum.double() / count, tally.tau_min.double(), tally.tau_max.double()]
    stats = torch.stack([*stats, kept.median().double(), kept.min().double(), mean_loss])
    ce_mean = tally.ce_sum.double() / n if ce_grads is not None else math.nan
    return kd + ce_total, Outcome(count, stats, ce_mean, scores)


def cross_entropy(student: LinearHead, rows: Tensor, targets: Tensor, chunk_size: int, dtype: torch.dtype) -> Tensor:
    """Σ −log softmax(hidden @ Wᵀ + b)[target] over ``rows [n]`` (``targets [n]``), chunk by chunk, its gradients
    computed in the forward (plain SFT on the fused path: one logit product per chunk, none in the backward)."""

    def run(grads: GradBuffers) -> tuple[Tensor, None]:
        total = torch.zeros((), dtype=dtype, device=rows.device)
        for ch in chunks(rows, chunk_size, student):
            loss_c, g = ce_chunk(ch.student, ch.part(targets), dtype)
            total += loss_c
            if grads.any:
                grads.add(ch.rows, ch.hidden, g)
        return total, None

    return run_job(student.hidden, student.weight, student.bias, Job(run, dtype))[0]
