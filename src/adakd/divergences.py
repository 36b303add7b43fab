"""Per-token divergences between a teacher and a student next-token distribution.

Every function here works on log-probabilities over the last (vocabulary) dimension and returns one value per
position, with no reduction and no τ² factor (see ``docs/method.md``, "Base divergences"). Notation follows
that page: ``p`` is the teacher, ``q`` the student. All are true divergences: 0 when p = q, ≥ 0 otherwise.

Numerics: probabilities are handled in log space in float32 (float64 stays float64). A logit of -inf is a token
with probability 0; such terms contribute exactly 0 and a zero gradient, never NaN. Where one distribution puts
mass on a token the other rules out, KL-type divergences are +inf, as in the mathematics.

This module imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import OptionError

__all__ = [
    "DIVERGENCES",
    "DivergenceFn",
    "compute_dtype",
    "divergence",
    "divergence_fn",
    "hellinger_distance",
    "log_probs",
]

# (student_log_probs [..., V], teacher_log_probs [..., V]) -> per-position values [...]
DivergenceFn = Callable[[Tensor, Tensor], Tensor]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype probabilities are computed in: float32, or float64 when an input is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def log_probs(logits: Tensor, temperature: float | Tensor = 1.0, dtype: torch.dtype | None = None) -> Tensor:
    """``log softmax(logits / τ)`` over the last dimension, upcast to float32 (or ``dtype``).

    Args:
        logits: ``[..., V]``, any floating dtype; -inf entries get probability 0.
        temperature: a positive float, or a tensor broadcastable to ``logits.shape[:-1]`` (one τ per position).
        dtype: the computation dtype; defaults to :func:`compute_dtype` of ``logits``.

    Returns:
        ``[..., V]`` log-probabilities in ``dtype``.
    """
    z = logits.to(dtype or compute_dtype(logits))
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        # ∂(z/τ)/∂τ = −z/τ² is infinite at z = -inf, and 0·inf would make τ's gradient NaN: divide the finite
        # entries only (the masked entries' zero gradient stays 0). Only when τ itself takes a gradient.
        t = temperature.to(device=z.device, dtype=z.dtype).unsqueeze(-1)
        neginf = torch.isneginf(z)
        z = torch.where(neginf, z, z.masked_fill(neginf, 0.0) / t)
    elif isinstance(temperature, Tensor):
        z = z / temperature.to(device=z.device, dtype=z.dtype).unsqueeze(-1)
    elif temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Numerically safe building blocks
# --------------------------------------------------------------------------------------------------------------


def _log_weight(w: float) -> float:
    return math.log(w) if w > 0 else -math.inf


def _kl(la: Tensor, lb: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ a (log a − log b) over the last dim, from log-probabilities.

    Terms with a = 0 (``la`` = -inf) are exactly 0: masking the operands (not the product) keeps the backward
    free of ``0 · inf``.
    """
    zero = torch.isneginf(la)
    diff = la.masked_fill(zero, 0.0) - lb.masked_fill(zero, 0.0)
    return (la.exp() * diff).sum(-1)


def _log_mix(la: Tensor, lb: Tensor, wa: float) -> Tensor:
    """log(wa · a + (1 − wa) · b), computed in log space with logaddexp.

    Where both a and b are 0 the value is garbage (0) but finite: every caller reaches it only through
    :func:`_kl` with a first argument that is -inf there, which masks it. Replacing the -inf pair first keeps
    logaddexp's backward (exp(-inf − -inf)) from producing NaN.
    """
    both = torch.isneginf(la) & torch.isneginf(lb)
    la = la.masked_fill(both, 0.0)
    lb = lb.masked_fill(both, 0.0)
    return torch.logaddexp(la + _log_weight(wa), lb + _log_weight(1.0 - wa))


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with a zero (not infinite) gradient at 0."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


# --------------------------------------------------------------------------------------------------------------
# The divergences: f(lq = student log-probs, lp = teacher log-probs, **params) -> [...]
# --------------------------------------------------------------------------------------------------------------


def _fkl(lq: Tensor, lp: Tensor) -> Tensor:
    return _kl(lp, lq)


def _rkl(lq: Tensor, lp: Tensor) -> Tensor:
    return _kl(lq, lp)


def _jsd(lq: Tensor, lp: Tensor, lam: float) -> Tensor:
    # m = (1 − λ) p + λ q;  λ·KL(q‖m) + (1 − λ)·KL(p‖m). Zero-weighted terms are skipped, not multiplied by 0,
    # so that an infinite KL at λ ∈ {0, 1} cannot turn into NaN.
    lm = _log_mix(lp, lq, 1.0 - lam)
    out = torch.zeros_like(lq[..., 0])
    if lam > 0:
        out = out + lam * _kl(lq, lm)
    if lam < 1:
        out = out + (1.0 - lam) * _kl(lp, lm)
    return out


def _tvd(lq: Tensor, lp: Tensor) -> Tensor:
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


def _sfkl(lq: Tensor, lp: Tensor, lam: float) -> Tensor:
    return _kl(lp, _log_mix(lp, lq, lam))  # KL(p ‖ λ p + (1 − λ) q)


def _srkl(lq: Tensor, lp: Tensor, lam: float) -> Tensor:
    return _kl(lq, _log_mix(lp, lq, 1.0 - lam))  # KL(q ‖ (1 − λ) p + λ q)


def _skl(lq: Tensor, lp: Tensor, lam: float) -> Tensor:
    out = torch.zeros_like(lq[..., 0])
    if lam < 1:
        out = out + (1.0 - lam) * _kl(lp, lq)
    if lam > 0:
        out = out + lam * _kl(lq, lp)
    return out


def _akl(lq: Tensor, lp: Tensor, mu: float) -> Tensor:
    # Adaptive KL (Wu et al. 2024). The head is the shortest prefix of the vocabulary, sorted by teacher
    # probability, whose teacher mass exceeds μ: token k is in it iff the mass strictly before it is ≤ μ, so the
    # first token always is. The mixing weights use the detached student (the gate is not trained).
    p = lp.exp()
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
    q_sorted = lq.detach().exp().gather(-1, order)
    err = (p_sorted - q_sorted).abs()
    head = (torch.cumsum(p_sorted, dim=-1) - p_sorted) <= mu
    e_head = (err * head).sum(-1)
    e_tail = (err * ~head).sum(-1)
    denom = e_head + e_tail
    # denom = 0 only when p = q, where FKL = RKL = 0: any weights give 0.
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    g_head = torch.where(denom > 0, e_head / safe, torch.full_like(denom, 0.5))
    g_tail = torch.where(denom > 0, e_tail / safe, torch.full_like(denom, 0.5))
    return g_head * _kl(lp, lq) + g_tail * _kl(lq, lp)


def _weighted_log_ratio(w: Tensor, la: Tensor, lb: Tensor) -> Tensor:
    """w · (la − lb), 0 where w = 0 (masking the operands keeps the backward finite)."""
    zero = w == 0
    return w * (la - lb).masked_fill(zero, 0.0)


def _abkd(lq: Tensor, lp: Tensor, alpha: float, beta: float) -> Tensor:
    # α-β divergence (Cichocki et al. 2011; ABKD, Wang et al. 2025) with its four limits. Tokens with p = q = 0
    # contribute 0: the terms below are not all probability-weighted (the α+β = 0 and α = β = 0 branches are
    # sums of functions of the log ratio), so those positions are replaced by log 1 and masked at the end.
    both = torch.isneginf(lp) & torch.isneginf(lq)
    lp = lp.masked_fill(both, 0.0)
    lq = lq.masked_fill(both, 0.0)
    a, b = alpha, beta
    if a == 0 and b == 0:
        terms = 0.5 * (lp - lq) ** 2
    elif a == 0:
        # 1/β² Σ (q^β log(q^β / p^β) − q^β + p^β)
        qb, pb = (b * lq).exp(), (b * lp).exp()
        terms = (b * _weighted_log_ratio(qb, lq, lp) - qb + pb) / (b * b)
    elif b == 0:
        # 1/α² Σ (p^α log(p^α / q^α) − p^α + q^α)
        pa, qa = (a * lp).exp(), (a * lq).exp()
        terms = (a * _weighted_log_ratio(pa, lp, lq) - pa + qa) / (a * a)
    elif a + b == 0:
        # 1/α² Σ (log(q^α / p^α) + p^α / q^α − 1) = 1/α² Σ (expm1(u) − u), u = α (log p − log q)
        u = a * (lp - lq)
        terms = (torch.expm1(u) - u) / (a * a)
    else:
        # p^α q^β − (α/s) p^s − (β/s) q^s with s = α + β, factored around m = max(log p, log q):
        # e^{s·m}·[expm1(α·dp + β·dq) − (α/s)·expm1(s·dp) − (β/s)·expm1(s·dq)], dp = log p − m ≤ 0,
        # dq = log q − m ≤ 0. The −1s cancel exactly (α/s + β/s = 1), so p = q gives exactly 0 and the three
        # terms no longer cancel at first order in float32; for α, β > 0 no exponent is positive, so nothing
        # overflows, and a one-sided zero (dp or dq = -inf) gives the exact limit through expm1(-inf) = −1.
        s = a + b
        m = torch.maximum(lp, lq)
        dp, dq = lp - m, lq - m
        bracket = torch.expm1(a * dp + b * dq) - (a / s) * torch.expm1(s * dp) - (b / s) * torch.expm1(s * dq)
        terms = -(s * m).exp() * bracket / (a * b)
    return terms.masked_fill(both, 0.0).sum(-1)


def _hellinger(lq: Tensor, lp: Tensor) -> Tensor:
    # H = (1/√2)‖√p − √q‖₂. The sum of squares has no cancellation, unlike sqrt(1 − Σ√(pq)), whose float32
    # rounding error of ~1e-7 becomes ~3e-4 after the square root for nearly equal distributions.
    d = (0.5 * lp).exp() - (0.5 * lq).exp()
    return _safe_sqrt((0.5 * (d * d).sum(-1)).clamp(max=1.0))


def _unit_interval(name: str) -> Callable[[float], str | None]:
    return lambda v: None if 0.0 <= v <= 1.0 else f"{name} must be in [0, 1], got {v}"


def _jsd_lam(v: float) -> str | None:
    # At λ = 0 the mixture is p and at λ = 1 it is q: the divergence is 0 everywhere, and training would silently
    # do nothing. A TRL user's GKD beta (= 1 − λ) of 0 or 1 means forward or reverse KL, which have their names.
    if 0.0 < v < 1.0:
        return None
    return (
        f"lam must be in (0, 1) for jsd, got {v} (at 0 or 1 the divergence is 0 everywhere); TRL's GKD beta is "
        "1 - lam: for beta 0 (forward KL) use 'fkl', for beta 1 (reverse KL) use 'rkl'"
    )


def _finite(name: str) -> Callable[[float], str | None]:
    return lambda v: None if math.isfinite(v) else f"{name} must be finite, got {v}"


@dataclass(frozen=True)
class _Divergence:
    fn: Callable[..., Tensor]
    params: dict[str, float]
    checks: dict[str, Callable[[float], str | None]]
    formula: str


DIVERGENCES: dict[str, _Divergence] = {
    "fkl": _Divergence(_fkl, {}, {}, "Σ p (log p − log q)"),
    "rkl": _Divergence(_rkl, {}, {}, "Σ q (log q − log p)"),
    "jsd": _Divergence(_jsd, {"lam": 0.9}, {"lam": _jsd_lam}, "m = (1−λ)p + λq; λ·KL(q‖m) + (1−λ)·KL(p‖m)"),
    "tvd": _Divergence(_tvd, {}, {}, "½ Σ |p − q|"),
    "sfkl": _Divergence(_sfkl, {"lam": 0.1}, {"lam": _unit_interval("lam")}, "KL(p ‖ λp + (1−λ)q)"),
    "srkl": _Divergence(_srkl, {"lam": 0.1}, {"lam": _unit_interval("lam")}, "KL(q ‖ (1−λ)p + λq)"),
    "abkd": _Divergence(
        _abkd,
        {"alpha": 0.2, "beta": 0.7},
        {"alpha": _finite("alpha"), "beta": _finite("beta")},
        "−1/(αβ) Σ (p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)), with limits",
    ),
    "akl": _Divergence(
        _akl,
        {"mu": 0.5},
        {"mu": _unit_interval("mu")},
        "g_head·FKL + g_tail·RKL, gates from |p − q| on the teacher's head (mass > μ) and tail",
    ),
    "skl": _Divergence(_skl, {"lam": 0.9}, {"lam": _unit_interval("lam")}, "(1−λ)·FKL + λ·RKL"),
    "hellinger": _Divergence(_hellinger, {}, {}, "sqrt(1 − Σ sqrt(p q)) ∈ [0, 1]"),
}


def divergence_fn(name: str, **params: float) -> DivergenceFn:
    """Resolve a divergence name and its parameters into ``f(student_log_probs, teacher_log_probs) -> [...]``.

    Validates the name, the parameter names and their values once, so that hot loops (chunked losses) can call
    the returned function without re-checking.

    Raises:
        ValueError: unknown name or parameter (the message lists the valid ones), or a value out of range.
    """
    spec = DIVERGENCES.get(name)
    if spec is None:
        message = f"unknown divergence {name!r}; valid: {', '.join(DIVERGENCES)}"
        raise OptionError("base", message, message)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        valid = ", ".join(spec.params) or "none"
        message = f"divergence {name!r} got unknown parameter(s) {', '.join(unknown)}; valid: {valid}"
        raise OptionError(
            "base_params", f"unknown parameter(s) {', '.join(unknown)} for {name!r}; valid: {valid}", message
        )
    merged = {**spec.params, **{k: float(v) for k, v in params.items()}}
    for key, check in spec.checks.items():
        err = check(merged[key])
        if err:
            raise OptionError(f"base_params.{key}", err.removeprefix(f"{key} "), f"divergence {name!r}: {err}")
    fn = spec.fn

    def bound(lq: Tensor, lp: Tensor) -> Tensor:
        return fn(lq, lp, **merged)

    bound.__name__ = f"{name}({', '.join(f'{k}={v:g}' for k, v in merged.items())})"
    return bound


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape (crop the teacher with adakd.align_vocab first)"
        )
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise ValueError("logits must be floating point tensors")


def _check_temperature(temperature: float | Tensor, batch_shape: torch.Size) -> None:
    if isinstance(temperature, Tensor):
        try:
            torch.broadcast_shapes(temperature.shape, batch_shape)
        except RuntimeError:
            raise ValueError(
                f"temperature of shape {tuple(temperature.shape)} does not broadcast to the positions "
                f"{tuple(batch_shape)} (logits.shape[:-1])"
            ) from None
    elif not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise OptionError("temperature", f"must be a positive finite float, got {temperature!r}")


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    **params: float,
) -> Tensor:
    """Per-position divergence D(p^τ, q^τ) between teacher p and student q (spec: "Base divergences").

    Args:
        name: one of ``fkl, rkl, jsd, tvd, sfkl, srkl, abkd, akl, skl, hellinger``.
        student_logits: ``[..., V]`` (any float dtype).
        teacher_logits: ``[..., V]``, same shape (crop a padded teacher with :func:`adakd.align_vocab`).
        temperature: τ > 0, a float or a tensor of shape ``logits.shape[:-1]`` (one τ per position). Both
            distributions are taken at τ; no τ² factor is applied.
        **params: the divergence's parameters: ``jsd``/``sfkl``/``srkl``/``skl``: ``lam``; ``abkd``: ``alpha``,
            ``beta``; ``akl``: ``mu``.

    Returns:
        ``[...]`` = ``logits.shape[:-1]``, float32 (float64 for float64 inputs), no reduction.

    Raises:
        ValueError: unknown name or parameter, mismatched shapes, or a non-positive temperature.
    """
    fn = divergence_fn(name, **params)
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature, student_logits.shape[:-1])
    dtype = compute_dtype(student_logits, teacher_logits)
    lq = log_probs(student_logits, temperature, dtype)
    lp = log_probs(teacher_logits, temperature, dtype)
    return fn(lq, lp)


def hellinger_distance(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Hellinger distance H(p, q) = sqrt(1 − Σ sqrt(p q)) at τ = 1, per position, in [0, 1] (Eq. 3).

    Args:
        student_logits: ``[..., V]``.
        teacher_logits: ``[..., V]``, same shape.

    Returns:
        ``[...]`` float32 (float64 for float64 inputs). Differentiable, with a zero gradient where H = 0.
    """
    return divergence("hellinger", student_logits, teacher_logits)
