"""Per-chunk terms of the fused plans: a value (and where it trains, its gradient with respect to the student's
logits) from one chunk's logits.

- :class:`KDTerm`: Σ w(τ)·D for any divergence, with ∂/∂ student logits (``torch.func.grad_and_value``);
- :func:`ce_chunk`: the cross-entropy and its gradient (softmax − one-hot);
- :func:`score_backprop`: ∂(Σ g_i·s_i)/∂ logits of the difficulty scores (the gradient through τ);
- :func:`eval_terms`: float64 per-token CE, KD at τ = 1 and Hellinger (the evaluation sums);
- :func:`entropy_chunk`: Σ of the softmax entropies.

This module imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..adaptive import score_fn
from ..divergences import DivergenceFn, log_probs
from ..errors import OptionError
from ..shapes import align_vocab
from ..sparse import LogitScore, SparseTeacher, pair_log_probs

__all__ = ["IMPLS", "KDTerm", "ce_chunk", "chunk_loss_fn", "entropy_chunk", "eval_terms", "score_backprop"]

IMPLS = ("torch", "compile")


@dataclass(frozen=True)
class KDTerm:
    """The per-chunk ``(Σ w(τ)·D, ∂/∂ student logits)`` of a divergence; w(τ) = τ² (Eq. 2, ``squared``) or 1.
    With ``tau_grad`` a call returns ``(Σ w·D, ∂/∂ logits, ∂/∂ τ [c])``.

    The gradient is taken with ``torch.func.grad_and_value`` on the logits of the chunk only, so every divergence
    of the library works here without a hand-written gradient; the matrix products stay outside.
    """

    div: DivergenceFn
    dtype: torch.dtype
    impl: str = "torch"
    squared: bool = True
    tau_grad: bool = False
    _fn: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            valid = f"{self.impl!r}; valid: {', '.join(IMPLS)}"
            raise OptionError("impl", f"unknown {valid}", f"unknown impl {valid}")
        grad_and_value = torch.func.grad_and_value(self._value, argnums=(0, 2) if self.tau_grad else 0)
        dtype, tau_grad = self.dtype, self.tau_grad

        def chunk(student_logits, teacher_logits, tau, weight=None):
            grad, loss = grad_and_value(student_logits.to(dtype), teacher_logits, tau, weight)
            return (loss, *grad) if tau_grad else (loss, grad)

        object.__setattr__(self, "_fn", torch.compile(chunk, dynamic=True) if self.impl == "compile" else chunk)

    def _value(
        self, student_logits: Tensor, teacher_logits: Tensor | SparseTeacher, tau: Tensor | float, weight: Tensor | None
    ) -> Tensor:
        per_token = self.div(*pair_log_probs(student_logits, teacher_logits, tau, self.dtype))
        if weight is not None:  # logits already divided by τ (the fold): the τ² weight comes apart
            return (per_token * weight).sum()
        return (per_token * (tau * tau)).sum() if self.squared else per_token.sum()

    def weight_of(self, tau: Tensor) -> Tensor:
        """The per-row weight w(τ) the fold passes apart: τ² or ones."""
        return tau * tau if self.squared else torch.ones_like(tau)

    def __call__(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | SparseTeacher,
        tau: Tensor | float,
        weight: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """``student_logits [c, V]``, the teacher's ``[c, V]`` (or sparse ``[c]``), ``tau [c]`` or a float, and
        under the fold ``weight [c]`` (the logits then already divided by τ, τ passed as 1)."""
        return self._fn(student_logits, teacher_logits, tau, weight)


def chunk_loss_fn(
    div: DivergenceFn, dtype: torch.dtype, impl: str = "torch", tau_weight: str = "squared", tau_grad: bool = False
) -> KDTerm:
    """:class:`KDTerm` of a divergence (``tau_weight``: ``squared`` or ``none``)."""
    return KDTerm(div, dtype, impl, squared=tau_weight == "squared", tau_grad=tau_grad)


def ce_chunk(student_logits: Tensor, targets: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(Σ −log q(y), softmax − one-hot)`` of a chunk of student logits ``[c, V]`` with targets ``[c]`` (all valid),
    in ``dtype``: the cross-entropy and its gradient with respect to the logits."""
    lq = torch.log_softmax(student_logits.to(dtype), dim=-1)
    index = targets.unsqueeze(-1)
    total = -lq.gather(-1, index).sum()
    grad = lq.exp_()
    grad.scatter_add_(-1, index, torch.full(index.shape, -1.0, dtype=grad.dtype, device=grad.device))
    return total, grad


def score_backprop(
    score: LogitScore,
    student_logits: Tensor,
    teacher_logits: Tensor | SparseTeacher,
    targets: Tensor,
    grad_scores: Tensor,
    dtype: torch.dtype,
) -> Tensor:
    """``[c, V]`` ∂(Σ_i g_i·s_i)/∂ student logits, s the differentiable indicator ``score`` at τ = 1 and
    ``grad_scores [c]`` = g (∂L/∂s from the temperatures): the gradient that flows through τ."""
    with torch.enable_grad():
        z_s = student_logits.detach().to(dtype).requires_grad_(True)
        s = score(z_s, teacher_logits, targets)
        (g,) = torch.autograd.grad(s, z_s, grad_outputs=grad_scores)
    return g


def eval_terms(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    targets: Tensor,
    divergence: DivergenceFn,
    vocab_size: int | None = None,
) -> Tensor:
    """Per-token CE, KD at τ = 1 and Hellinger difficulty, computed and returned in float64 ``[c, 3]`` (no τ²
    factor, no selection; the KD and Hellinger columns are 0 without a teacher).

    Args:
        student_logits: ``[c, V_s]``.
        teacher_logits: ``[c, V_t]``, V_t ≥ V_s (its padding rows are cropped, as the loss does), or None.
        targets: ``[c]`` label ids (valid positions only).
        divergence: the base divergence, ``f(student_log_probs, teacher_log_probs)``.
        vocab_size: the tokenizer's size, checked by :func:`adakd.align_vocab`.
    """
    lq = log_probs(student_logits, 1.0, torch.float64)
    ce = -lq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if teacher_logits is None:
        zeros = torch.zeros_like(ce)
        return torch.stack([ce, zeros, zeros], -1)
    _, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    lp = log_probs(teacher_logits, 1.0, torch.float64)
    kd = divergence(lq, lp)
    # The difficulty score LATF ranks tokens by (Eq. 3); it works in place on its inputs, which are spent by now.
    hellinger = score_fn("hellinger")(lq, lp, None)
    return torch.stack([ce, kd, hellinger], -1)


def entropy_chunk(logits: Tensor) -> Tensor:
    """Σ over the rows of ``logits [c, V]`` of the softmax entropy (nats), in float32."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum()
