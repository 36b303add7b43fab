"""The adaptive parts of AdaKD: difficulty scores (Eq. 3), the token selection and IDTS (Eqs. 9-10).

See ``docs/method.md``. Scores and temperatures carry no gradient unless asked for (:meth:`IDTS.with_grad`). The
ratio controllers (:class:`LATF`, :class:`RatioSchedule`, Eqs. 4-7) live in :mod:`adakd.controllers` and are
re-exported here.

This module imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .controllers import LATF, RatioSchedule
from .divergences import _hellinger, _jsd, _kl, compute_dtype, log_probs
from .errors import OptionError

__all__ = [
    "IDTS",
    "INDICATORS",
    "LATF",
    "RatioSchedule",
    "difficulty_scores",
    "idts_from_median",
    "idts_temperatures_with_grad",
    "idts_temperatures",
    "hardest",
    "keep_hardest",
    "keep_count",
    "score_fn",
    "select_tokens",
]

# (student_log_probs [N, V], teacher_log_probs [N, V], labels [N] | None) -> scores [N]; higher = harder.
# Called without gradient on scratch log-probabilities, which an indicator may overwrite.
ScoreFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _hellinger_inplace(lq: Tensor, lp: Tensor, labels: Tensor | None) -> Tensor:
    # The same value as divergences._hellinger, (1/√2)‖√p − √q‖₂, but in place on the scratch log-probs: the
    # score pass runs over every valid token, and this keeps its peak memory at the two [N, V] inputs.
    d = lq.mul_(0.5).exp_().sub_(lp.mul_(0.5).exp_()).square_()
    return d.sum(-1).mul_(0.5).clamp_(max=1.0).sqrt_()


def hellinger_from_logits(student_logits: Tensor, teacher_logits: Tensor, dtype: torch.dtype) -> Tensor:
    """The Hellinger score straight from logits ``[c, V]`` at τ = 1: (1/√2)‖√p − √q‖₂ with √p from the softmax.

    The same value as the indicator on log-probabilities to float rounding, in fewer passes over the ``[c, V]``
    logits (two softmaxes and two square roots, where log-softmax, a halving and an exponential per side take more):
    the fused loss's pass 1 scores every valid token with it. No gradient.
    """
    d = torch.softmax(student_logits.to(dtype), dim=-1).sqrt_()
    d.sub_(torch.softmax(teacher_logits.to(dtype), dim=-1).sqrt_())
    return torch.linalg.vector_norm(d, dim=-1).mul_(math.sqrt(0.5)).clamp_(max=1.0)


# Indicators with a faster implementation on (dense) logits than on log-probabilities, for the score passes.
LOGIT_INDICATORS: dict[str, Callable[[Tensor, Tensor, torch.dtype], Tensor]] = {"hellinger": hellinger_from_logits}

NMTKD_TOP_K = 5


def _ce(lq: Tensor, lp: Tensor, labels: Tensor | None) -> Tensor:
    if labels is None:
        raise ValueError("indicator 'ce' needs the labels")  # an input missing, not an option
    # Masked positions (-100) are clamped to a valid index; their score is never used.
    return -lq.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def _nmtkd(lq: Tensor, lp: Tensor, labels: Tensor | None, k: int = NMTKD_TOP_K) -> Tensor:
    # Ranking disagreement: U = teacher top-k (t1 its argmax), S = student top-k.
    # s = Σ_{u∈U} max(0, q(u) − q(t1)) + Σ_{u∈U} Σ_{v∈S} [p(u) > p(v)] · max(0, q(v) − q(u))
    k = min(k, lq.shape[-1])
    top_t = lp.topk(k, dim=-1).indices  # sorted: column 0 is the teacher's argmax t1
    top_s = lq.topk(k, dim=-1).indices
    q_u = lq.gather(-1, top_t).exp()
    q_v = lq.gather(-1, top_s).exp()
    p_u = lp.gather(-1, top_t).exp()
    p_v = lp.gather(-1, top_s).exp()
    first = (q_u - q_u[..., :1]).clamp_min(0).sum(-1)
    inverted = p_u.unsqueeze(-1) > p_v.unsqueeze(-2)  # [..., u, v]
    gap = (q_v.unsqueeze(-2) - q_u.unsqueeze(-1)).clamp_min(0)
    return first + (inverted * gap).sum((-1, -2))


INDICATORS: dict[str, ScoreFn] = {
    "hellinger": _hellinger_inplace,
    "fkl": lambda lq, lp, y: _kl(lp, lq),
    "rkl": lambda lq, lp, y: _kl(lq, lp),
    "jsd": lambda lq, lp, y: _jsd(lq, lp, 0.5),
    "ce": _ce,
    "nmtkd": _nmtkd,
}


def score_fn(indicator: str, differentiable: bool = False) -> ScoreFn:
    """Resolve an indicator name into ``f(student_log_probs, teacher_log_probs, labels) -> scores``.

    ``differentiable=True`` gives a version that keeps its inputs intact, so that a gradient can flow from the
    scores to the student's log-probabilities (the Hellinger score otherwise works in place on scratch buffers);
    ``AdaKDLoss(detach_tau=False)`` needs it.

    Raises:
        ValueError: unknown indicator (the message lists the valid ones).
    """
    fn = INDICATORS.get(indicator)
    if fn is None:
        message = f"unknown indicator {indicator!r}; valid: {', '.join(INDICATORS)}"
        raise OptionError("indicator", message, message)
    if differentiable and indicator == "hellinger":
        return lambda lq, lp, y: _hellinger(lq, lp)
    return fn


@torch.no_grad()
def difficulty_scores(
    indicator: str, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None
) -> Tensor:
    """Per-token difficulty s_i at τ = 1, without gradient (Eq. 3 and the indicators of the paper's Table 3).

    Args:
        indicator: ``hellinger`` (the paper's), ``fkl``, ``rkl``, ``jsd`` (λ = 0.5), ``ce`` (needs ``labels``),
            or ``nmtkd`` (k = 5).
        student_logits: ``[..., V]``.
        teacher_logits: ``[..., V]``, same shape.
        labels: ``[...]`` target ids, only for ``ce``.

    Returns:
        ``[...]`` float32 scores; higher means harder.
    """
    fn = score_fn(indicator)
    dtype = compute_dtype(student_logits, teacher_logits)
    return fn(log_probs(student_logits, 1.0, dtype), log_probs(teacher_logits, 1.0, dtype), labels)


TEMPERATURES = ("inverse", "fixed", "reverse")


@dataclass(frozen=True)
class IDTS:
    """Inverse difficulty temperature scaling (Eqs. 9-10), built once from the loss's options.

    m = a median of kept scores (the lower median, ``torch.median``); ŝ = tanh(log(max(s / m, 1e-8))), all 0 when
    m = 0; τ = τ_base · exp(−c · ŝ) (``mode="reverse"``: exp(+c · ŝ), the Table 5 ablation). ``mode="fixed"``
    gives every token τ_base (a float, no tensor).

    Args:
        c: the scaling strength (τ ∈ (τ_base·e^−c, τ_base·e^c)).
        tau_base: τ for a token of median difficulty.
        mode: ``inverse`` | ``fixed`` | ``reverse``.
    """

    c: float = 0.5
    tau_base: float = 1.0
    mode: str = "inverse"

    def __post_init__(self) -> None:
        if self.mode not in TEMPERATURES:
            valid = f"{self.mode!r}; valid: {', '.join(TEMPERATURES)}"
            raise OptionError("temperature", f"unknown {valid}", f"unknown temperature {valid}")

    @property
    def fixed(self) -> bool:
        """Whether every token gets τ_base (no scores needed for the temperatures)."""
        return self.mode == "fixed"

    def temperatures(self, kept_scores: Tensor) -> Tensor | float:
        """``[k]`` τ of the kept tokens from their own median (no gradient); τ_base for ``fixed``."""
        if self.fixed:
            return float(self.tau_base)
        s = kept_scores.detach().to(compute_dtype(kept_scores))
        if s.numel() == 0:
            return s.clone()
        return self.from_median(s, s.median())

    def from_median(self, scores: Tensor, median: Tensor | float) -> Tensor | float:
        """``[...]`` τ of ``scores`` for a given median m (the one-pass mode takes it from the previous
        micro-batch), in the scores' dtype (at least float32), no gradient; τ_base for ``fixed``."""
        if self.fixed:
            return float(self.tau_base)
        with torch.no_grad():
            s = scores.detach().to(compute_dtype(scores))
            return self._tau(s, torch.as_tensor(median, dtype=s.dtype, device=s.device))

    def with_grad(self, kept_scores: Tensor) -> Tensor:
        """:meth:`temperatures` attached to the scores' graph: the gradient flows through every score and through
        the median (the lower median is one of the scores, which receives the median's gradient), as the authors'
        released code differentiates τ (``AdaKDLoss(detach_tau=False)``). Not for ``fixed``."""
        s = kept_scores.to(compute_dtype(kept_scores))
        if s.numel() == 0:
            return s.clone()
        return self._tau(s, s.median())

    def _tau(self, s: Tensor, m: Tensor) -> Tensor:
        """τ = τ_base·exp(∓c·tanh(log(max(s/m, 1e-8)))), 0 for ŝ when m = 0; differentiable in s and m."""
        safe_m = torch.where(m > 0, m, torch.ones_like(m))
        s_hat = torch.tanh(torch.log((s / safe_m).clamp_min(1e-8)))
        s_hat = torch.where(m > 0, s_hat, torch.zeros_like(s_hat))
        sign = 1.0 if self.mode == "reverse" else -1.0
        return self.tau_base * torch.exp(sign * self.c * s_hat)


def _idts(reverse: bool, c: float, tau_base: float) -> IDTS:
    return IDTS(c=c, tau_base=tau_base, mode="reverse" if reverse else "inverse")


@torch.no_grad()
def idts_temperatures(scores: Tensor, *, c: float = 0.5, tau_base: float = 1.0, reverse: bool = False) -> Tensor:
    """Inverse difficulty temperature scaling (Eqs. 9-10) over the given (kept) scores: :meth:`IDTS.temperatures`.

    Args:
        scores: ``[...]`` non-negative difficulty scores (any shape; the median is over all of them).
        c: the scaling strength (τ ∈ (τ_base·e^−c, τ_base·e^c)).
        tau_base: τ for a token of median difficulty.
        reverse: the Table 5 ablation (hard tokens get high τ).

    Returns:
        ``[...]`` temperatures, float32 (float64 for float64 scores), detached.
    """
    return _idts(reverse, c, tau_base).temperatures(scores)


def idts_from_median(
    scores: Tensor, median: Tensor | float, *, c: float = 0.5, tau_base: float = 1.0, reverse: bool = False
) -> Tensor:
    """Eqs. 9-10 with a given median m: :meth:`IDTS.from_median`.

    Args:
        scores: ``[...]`` scores; median: m (a float or a 0-d tensor); others as :func:`idts_temperatures`.

    Returns:
        ``[...]`` temperatures in the scores' dtype (at least float32).
    """
    return _idts(reverse, c, tau_base).from_median(scores, median)


def idts_temperatures_with_grad(
    scores: Tensor, *, c: float = 0.5, tau_base: float = 1.0, reverse: bool = False
) -> Tensor:
    """:func:`idts_temperatures` without the detach (:meth:`IDTS.with_grad`): ``scores [k]`` → ``τ [k]``, attached
    to the scores' graph."""
    return _idts(reverse, c, tau_base).with_grad(scores)


class TokenSelection(NamedTuple):
    """What AdaKD does with one set of valid tokens: which it keeps and at which temperature."""

    kept: Tensor  # [N] bool, True for the k kept tokens
    index: Tensor  # [k] long, the kept positions, hardest first
    tau: Tensor | float  # [k] τ of the kept tokens in ``index`` order, or τ_base for ``temperature="fixed"``
    median: Tensor  # 0-d, m: the lower median of the kept scores (IDTS's reference point)


def hardest(scores: Tensor, k: int) -> Tensor:
    """``[k]`` positions of the k highest ``scores [N]``, hardest first; ties by position (a stable sort, so the
    same tokens are kept on every device and in every caller)."""
    return torch.argsort(scores.detach(), descending=True, stable=True)[:k]


def keep_hardest(scores: Tensor, k: int) -> tuple[Tensor | None, Tensor]:
    """``(index [k] | None, kept scores [k])``: the k hardest of ``scores [N]`` (:func:`hardest`), or, when every
    token is kept, None and the scores in position order (no gather, and temperatures stay in position order)."""
    if k < scores.numel():
        index = hardest(scores, k)
        return index, scores[index]
    return None, scores


def select_tokens(
    scores: Tensor,
    ratio: float,
    *,
    temperature: str = "inverse",
    c: float = 0.5,
    tau_base: float = 1.0,
    differentiable: bool = False,
) -> TokenSelection:
    """AdaKD's rule for one set of valid tokens (Eqs. 4-10): keep the k = max(1, floor(N·r)) hardest, then give
    each kept token its IDTS temperature from the kept tokens' median. The inspector and the demo's plots call
    this function; the loss applies the same rule (:func:`hardest`, :class:`IDTS`).

    Args:
        scores: ``[N]`` difficulty scores (N ≥ 1); ties are broken by position (the earlier token first).
        ratio: r ∈ (0, 1].
        temperature: ``inverse`` (IDTS), ``reverse`` (the Table 5 ablation) or ``fixed`` (τ = τ_base).
        c: IDTS strength; tau_base: τ at the median difficulty.
        differentiable: keep the gradient of τ through the scores and their median (``detach_tau=False``).

    Returns:
        A :class:`TokenSelection`.
    """
    n = scores.numel()
    if n == 0:
        raise ValueError("select_tokens needs at least one score")
    idts = IDTS(c=c, tau_base=tau_base, mode=temperature)
    index = hardest(scores, keep_count(n, ratio))
    kept = torch.zeros(n, dtype=torch.bool, device=scores.device)
    kept[index] = True
    kept_scores = scores[index]
    median = kept_scores.detach().median()
    if idts.fixed:
        tau: Tensor | float = float(tau_base)
    elif differentiable:  # the median itself carries a gradient here: let autograd take it again, attached
        tau = idts.with_grad(kept_scores)
    else:  # the median just taken, not a second one
        tau = idts.from_median(kept_scores, median)
    return TokenSelection(kept, index, tau, median)


def keep_count(num_valid: int, ratio: float) -> int:
    """k = max(1, floor(N·r)) (Eq. 5), for N ≥ 1.

    The floor is taken after adding 1e-6 so that a ratio written in decimal (0.29 of 100 tokens) keeps the
    29 tokens it means rather than 28 from binary rounding; N·r is exact to ~1e-9 for any realistic N.
    """
    return max(1, min(num_valid, math.floor(num_valid * ratio + 1e-6)))
