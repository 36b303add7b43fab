"""The adaptive parts of AdaKD: difficulty scores (Eq. 3), LATF (Eqs. 4-7), IDTS (Eqs. 9-10).

See ``docs/method.md``. Scores and temperatures carry no gradient. The ratio controllers (:class:`LATF` and
:class:`RatioSchedule`) are plain Python state machines stepped once per optimizer step, with ``state_dict`` /
``load_state_dict`` so that a resumed run continues exactly.

This module imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .divergences import _hellinger, _jsd, _kl, compute_dtype, log_probs
from .errors import OptionError

__all__ = [
    "INDICATORS",
    "LATF",
    "RatioSchedule",
    "difficulty_scores",
    "idts_from_median",
    "idts_temperatures_with_grad",
    "idts_temperatures",
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
        raise ValueError("indicator 'ce' needs the labels")
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


@torch.no_grad()
def idts_temperatures(scores: Tensor, *, c: float = 0.5, tau_base: float = 1.0, reverse: bool = False) -> Tensor:
    """Inverse difficulty temperature scaling (Eqs. 9-10) over the given (kept) scores.

    m = lower median of ``scores`` (``torch.median``); ŝ = tanh(log(max(s / m, 1e-8))), all 0 when m = 0;
    τ = τ_base · exp(−c · ŝ) (``reverse=True``: exp(+c · ŝ)). Hard tokens (s > m) get τ < τ_base.

    Args:
        scores: ``[...]`` non-negative difficulty scores (any shape; the median is over all of them).
        c: the scaling strength (τ ∈ (τ_base·e^−c, τ_base·e^c)).
        tau_base: τ for a token of median difficulty.
        reverse: the Table 5 ablation (hard tokens get high τ).

    Returns:
        ``[...]`` temperatures, float32 (float64 for float64 scores), detached.
    """
    s = scores.detach().to(compute_dtype(scores))
    if s.numel() == 0:
        return s.clone()
    return idts_from_median(s, s.median(), c=c, tau_base=tau_base, reverse=reverse)


@torch.no_grad()
def idts_from_median(
    scores: Tensor, median: Tensor | float, *, c: float = 0.5, tau_base: float = 1.0, reverse: bool = False
) -> Tensor:
    """Eq. 9-10 with a given median m (the one-pass fused mode takes it from the previous micro-batch).

    Args:
        scores: ``[...]`` scores; median: m (a float or a 0-d tensor); others as :func:`idts_temperatures`.

    Returns:
        ``[...]`` temperatures in the scores' dtype (at least float32).
    """
    s = scores.detach().to(compute_dtype(scores))
    return _idts(s, torch.as_tensor(median, dtype=s.dtype, device=s.device), c, tau_base, reverse)


def _idts(s: Tensor, m: Tensor, c: float, tau_base: float, reverse: bool) -> Tensor:
    """τ = τ_base·exp(∓c·tanh(log(max(s/m, 1e-8)))), 0 for ŝ when m = 0; differentiable in s and m."""
    safe_m = torch.where(m > 0, m, torch.ones_like(m))
    s_hat = torch.tanh(torch.log((s / safe_m).clamp_min(1e-8)))
    s_hat = torch.where(m > 0, s_hat, torch.zeros_like(s_hat))
    sign = 1.0 if reverse else -1.0
    return tau_base * torch.exp(sign * c * s_hat)


def idts_temperatures_with_grad(
    scores: Tensor, *, c: float = 0.5, tau_base: float = 1.0, reverse: bool = False
) -> Tensor:
    """:func:`idts_temperatures` without the detach: the gradient flows through every score and through the
    median (the lower median is one of the scores, which receives the median's gradient). This is how the
    authors' released code differentiates τ (``AdaKDLoss(detach_tau=False)``); the paper detaches.

    Args / Returns: as :func:`idts_temperatures` (``scores [k]`` → ``τ [k]``), attached to the scores' graph.
    """
    s = scores.to(compute_dtype(scores))
    if s.numel() == 0:
        return s.clone()
    return _idts(s, s.median(), c, tau_base, reverse)


class TokenSelection(NamedTuple):
    """What AdaKD does with one set of valid tokens: which it keeps and at which temperature."""

    kept: Tensor  # [N] bool, True for the k kept tokens
    index: Tensor  # [k] long, the kept positions, hardest first
    tau: Tensor | float  # [k] τ of the kept tokens in ``index`` order, or τ_base for ``temperature="fixed"``
    median: Tensor  # 0-d, m: the lower median of the kept scores (IDTS's reference point)


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
    each kept token its IDTS temperature from the kept tokens' median. The loss, the inspector and the demo's plots
    all call this one function.

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
    if temperature not in ("inverse", "fixed", "reverse"):
        raise ValueError(f"unknown temperature {temperature!r}; valid: inverse, fixed, reverse")
    k = keep_count(n, ratio)
    # A stable sort: the same tokens are kept on every device and in every caller, also when scores tie.
    index = torch.argsort(scores.detach(), descending=True, stable=True)[:k]
    kept = torch.zeros(n, dtype=torch.bool, device=scores.device)
    kept[index] = True
    kept_scores = scores[index]
    median = kept_scores.detach().median()
    if temperature == "fixed":
        return TokenSelection(kept, index, float(tau_base), median)
    reverse = temperature == "reverse"
    if differentiable:  # the median itself carries a gradient here: let autograd take it again, attached
        tau = idts_temperatures_with_grad(kept_scores, c=c, tau_base=tau_base, reverse=reverse)
    else:  # the median just taken, not a second one
        tau = idts_from_median(kept_scores, median, c=c, tau_base=tau_base, reverse=reverse)
    return TokenSelection(kept, index, tau, median)


def keep_count(num_valid: int, ratio: float) -> int:
    """k = max(1, floor(N·r)) (Eq. 5), for N ≥ 1.

    The floor is taken after adding 1e-6 so that a ratio written in decimal (0.29 of 100 tokens) keeps the
    29 tokens it means rather than 28 from binary rounding; N·r is exact to ~1e-9 for any realistic N.
    """
    return max(1, min(num_valid, math.floor(num_valid * ratio + 1e-6)))


def _check_ratio(name: str, value: float, low_open: bool = True) -> float:
    value = float(value)
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise OptionError(name, f"must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return value


class LATF:
    """Loss-driven adaptive token focusing: the kept ratio r follows an EMA of the distillation loss.

    One :meth:`update` per optimizer step, with that step's loss averaged over gradient-accumulation micro-steps
    and data-parallel ranks (so every rank computes the same r). The rule (docs/method.md, "LATF"):

    - EMA: L̄ = L at the first step, else β·L̄ + (1 − β)·L.
    - r = ``max_ratio`` for the first ``warmup_steps`` steps; at the first step after warm-up L_ref = L̄.
    - Then: L̄ < L_ref·(1 − ε) → r ← max(r_min, r·(1 − δ)), L_ref ← L̄; L̄ > L_ref·(1 + ε) → r ←
      min(r_max, r·(1 + δ)), L_ref ← L̄; otherwise nothing changes. The new r applies from the next step.

    Args:
        ema_decay: β ∈ [0, 1).
        tolerance: ε ≥ 0.
        step_size: δ ∈ [0, 1).
        min_ratio: r_min ∈ (0, 1].
        max_ratio: r_max ∈ [r_min, 1]; also the starting ratio r_0 (the paper's r_0 = r_max = 1).
        warmup_steps: optimizer steps at r = r_max before the controller starts.
    """

    def __init__(
        self,
        *,
        ema_decay: float = 0.99,
        tolerance: float = 0.05,
        step_size: float = 0.05,
        min_ratio: float = 0.1,
        max_ratio: float = 1.0,
        warmup_steps: int = 0,
    ) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise OptionError("ema_decay", f"must be in [0, 1), got {ema_decay}")
        if not (math.isfinite(tolerance) and tolerance >= 0.0):
            raise OptionError("tolerance", f"must be >= 0, got {tolerance}")
        if not 0.0 <= step_size < 1.0:
            raise OptionError("step_size", f"must be in [0, 1), got {step_size}")
        self.min_ratio = _check_ratio("min_ratio", min_ratio)
        self.max_ratio = _check_ratio("max_ratio", max_ratio)
        if self.min_ratio > self.max_ratio:
            raise OptionError("max_ratio", f"({max_ratio}) must be >= min_ratio ({min_ratio})")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise OptionError("warmup_steps", f"must be a non-negative int, got {warmup_steps!r}")
        self.ema_decay = float(ema_decay)
        self.tolerance = float(tolerance)
        self.step_size = float(step_size)
        self.warmup_steps = warmup_steps
        self.ratio: float = self.max_ratio
        self.ema: float | None = None
        self.ref: float | None = None
        self.num_steps = 0

    def update(self, loss: float) -> float:
        """Advance one optimizer step with that step's distillation loss; returns the ratio for the next step.

        Raises:
            ValueError: a non-finite loss (it would poison the EMA for the rest of the run).
        """
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"LATF.update got a non-finite loss ({loss}) at step {self.num_steps + 1}")
        self.num_steps += 1
        self.ema = loss if self.ema is None else self.ema_decay * self.ema + (1.0 - self.ema_decay) * loss
        if self.num_steps <= self.warmup_steps:
            return self.ratio
        if self.ref is None:
            self.ref = self.ema
        elif self.ema < self.ref * (1.0 - self.tolerance):
            self.ratio = max(self.min_ratio, self.ratio * (1.0 - self.step_size))
            self.ref = self.ema
        elif self.ema > self.ref * (1.0 + self.tolerance):
            self.ratio = min(self.max_ratio, self.ratio * (1.0 + self.step_size))
            self.ref = self.ema
        return self.ratio

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (plain Python values): ratio, EMA, reference loss, step count."""
        return {"ratio": self.ratio, "ema": self.ema, "ref": self.ref, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the configuration comes from the constructor."""
        missing = {"ratio", "ema", "ref", "num_steps"} - set(state)
        if missing:
            raise ValueError(f"LATF state is missing {', '.join(sorted(missing))}")
        self.ratio = float(state["ratio"])
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.ref = None if state["ref"] is None else float(state["ref"])
        self.num_steps = int(state["num_steps"])

    def __repr__(self) -> str:
        return (
            f"LATF(ratio={self.ratio:.4g}, ema_decay={self.ema_decay}, tolerance={self.tolerance}, "
            f"step_size={self.step_size}, min_ratio={self.min_ratio}, max_ratio={self.max_ratio}, "
            f"warmup_steps={self.warmup_steps}, num_steps={self.num_steps})"
        )


class RatioSchedule:
    """A loss-independent kept ratio (the Table 4 ablations), with the same interface as :class:`LATF`.

    - ``fixed``: r = ``ratio`` throughout.
    - ``linear``: r(t) = 1 + (ratio − 1)·min(t/T, 1).
    - ``cosine``: r(t) = ratio + (1 − ratio)·½(1 + cos(π·min(t/T, 1))).

    t counts completed optimizer steps and T is ``total_steps``.
    """

    KINDS = ("fixed", "linear", "cosine")

    def __init__(self, kind: str, *, ratio: float, total_steps: int | None = None) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown ratio schedule {kind!r}; valid: {', '.join(self.KINDS)}")
        self.kind = kind
        self.end_ratio = _check_ratio("ratio", ratio)
        if kind != "fixed" and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"selection={kind!r} needs total_steps, a positive int, got {total_steps!r}")
        self.total_steps = total_steps
        self.num_steps = 0

    @property
    def ratio(self) -> float:
        if self.kind == "fixed":
            return self.end_ratio
        frac = min(self.num_steps / self.total_steps, 1.0)  # type: ignore[operator]
        if self.kind == "linear":
            return 1.0 + (self.end_ratio - 1.0) * frac
        return self.end_ratio + (1.0 - self.end_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def update(self, loss: float | None = None) -> float:
        """Advance one optimizer step (the loss is ignored); returns the ratio for the next step."""
        self.num_steps += 1
        return self.ratio

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "num_steps" not in state:
            raise ValueError("ratio schedule state is missing num_steps")
        self.num_steps = int(state["num_steps"])

    def __repr__(self) -> str:
        return f"RatioSchedule({self.kind!r}, ratio={self.end_ratio}, total_steps={self.total_steps})"
