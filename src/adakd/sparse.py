"""A sparse teacher: its top-k tokens and their log-probabilities, plus one tail bucket for the rest of its mass.

This is what an offline teacher cache stores (``adakd cache``; ``docs/cache.md``). The divergences, the difficulty
indicators and IDTS then work on two distributions over k + 1 outcomes (see ``docs/method.md``, "Sparse teacher"):

- the teacher's coarse distribution p̃ = (p_{i_1}, …, p_{i_k}, T), T = 1 − Σ_j p_{i_j} its tail mass;
- the student's coarse distribution q̃ = (q_{i_1}, …, q_{i_k}, 1 − Σ_j q_{i_j}), over the same k token ids, taken
  from the student's full softmax (its tail is the exact log-sum-exp of every token outside the support).

Both are projections at τ = 1. A temperature then acts on the coarse distribution as on any categorical one, the
bucket being one outcome: p̃^τ ∝ p̃^{1/τ} (and likewise q̃). So p = q gives 0 at every τ, and with k = V (an
empty tail) every value equals the dense one. For the f-divergences (KL, JSD, TVD, Hellinger, ...) the coarse
value is never above the dense one at τ = 1 (data processing).

This module imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .adaptive import LOGIT_INDICATORS, score_fn
from .divergences import compute_dtype, divergence_fn, log_probs
from .errors import OptionError

__all__ = [
    "FULL_STUDENT_INDICATORS",
    "SparseTeacher",
    "check_sparse",
    "coarse_student",
    "logit_scorer",
    "pair_log_probs",
    "sparse_difficulty_scores",
    "sparse_divergence",
    "sparse_from_logits",
]

# Indicators that read only the student's own distribution (the label's probability): on a sparse teacher they use
# the student's full softmax, not its coarse view.
FULL_STUDENT_INDICATORS = frozenset({"ce"})


class SparseTeacher(NamedTuple):
    """The teacher's distribution at each position, reduced to its top-k tokens and a tail bucket (τ = 1).

    Fields (one leading shape ``[...]``, e.g. the labels' ``[B, T]`` or ``[N]``):
        ids: ``[..., k]`` int64 token ids, distinct within a position (the top-k, most probable first).
        logprobs: ``[..., k]`` the teacher's log-probabilities of those tokens at τ = 1 (any float dtype).
        tail: ``[...]`` log of the remaining mass, log(1 − Σ exp(logprobs)); -inf when the support holds it all.
    """

    ids: Tensor
    logprobs: Tensor
    tail: Tensor

    @property
    def k(self) -> int:
        """The support size."""
        return self.ids.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The leading shape (positions)."""
        return self.tail.shape

    def reshape(self, *shape: int) -> SparseTeacher:
        """The same teacher with the positions reshaped (``reshape(-1)`` flattens them)."""
        return SparseTeacher(
            self.ids.reshape(*shape, self.k), self.logprobs.reshape(*shape, self.k), self.tail.reshape(*shape)
        )

    def index_select(self, rows: Tensor) -> SparseTeacher:
        """The positions ``rows`` of a flat ``[N, k]`` teacher."""
        return SparseTeacher(self.ids.index_select(0, rows), self.logprobs.index_select(0, rows), self.tail[rows])

    def to(self, device: torch.device | str) -> SparseTeacher:
        """The same teacher on ``device``."""
        return SparseTeacher(self.ids.to(device), self.logprobs.to(device), self.tail.to(device))

    def coarse(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[..., k + 1]`` log p̃: the support's log-probabilities, then the tail bucket's, in ``dtype``."""
        return torch.cat([self.logprobs.to(dtype), self.tail.to(dtype).unsqueeze(-1)], dim=-1)


def sparse_from_logits(logits: Tensor, k: int) -> SparseTeacher:
    """The top-k view of full teacher logits: what ``adakd cache`` stores for each position.

    Args:
        logits: ``[..., V]`` teacher logits (any float dtype); -inf entries have probability 0.
        k: the support size; k ≥ V keeps the whole vocabulary (an empty tail).

    Returns:
        A :class:`SparseTeacher` with ``ids`` ``[..., min(k, V)]`` (most probable first), float32 ``logprobs`` (float64
        for float64 logits) and ``tail``, the exact log-sum-exp of every other token's log-probability.
    """
    if k < 1:
        raise OptionError("k", f"must be a positive int, got {k}")
    lp = log_probs(logits, 1.0)
    k = min(k, lp.shape[-1])
    top = lp.topk(k, dim=-1)
    return SparseTeacher(top.indices, top.values, _rest_logsumexp(lp, top.indices))


def _rest_logsumexp(log_values: Tensor, ids: Tensor) -> Tensor:
    """log Σ exp over the entries not in ``ids`` (last dim), -inf where there are none, with a finite gradient.

    The support is masked with -inf; a row left with no finite entry is replaced by zeros before the log-sum-exp
    (whose backward would otherwise compute exp(-inf − -inf) = NaN) and set to -inf after it.
    """
    rest = log_values.scatter(-1, ids, float("-inf"))
    empty = torch.isneginf(rest).all(-1, keepdim=True)
    out = torch.logsumexp(rest.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    return out.masked_fill(empty, float("-inf")).squeeze(-1)


def coarse_student(student_logits: Tensor, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``[..., k + 1]`` log q̃ at τ = 1: the student's log-probabilities of the teacher's support ``ids``, then of
    everything else (its tail bucket). Differentiable in ``student_logits`` (the gradient of the bucket reaches
    every token outside the support).

    Args:
        student_logits: ``[..., V]``.
        ids: ``[..., k]`` int64 token ids < V, distinct within a position.
        dtype: the computation dtype; defaults to :func:`adakd.divergences.compute_dtype`.
    """
    z = student_logits.to(dtype or compute_dtype(student_logits))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    top = z.gather(-1, ids) - lse
    tail = _rest_logsumexp(z, ids).unsqueeze(-1) - lse
    return torch.cat([top, tail], dim=-1)


def pair_log_probs(
    student_logits: Tensor, teacher: Tensor | SparseTeacher, temperature: float | Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(log q^τ, log p^τ)`` over the last dimension: the full vocabulary for dense teacher logits, the k + 1
    coarse outcomes for a :class:`SparseTeacher` (the bucket tempered as one outcome).

    Args:
        student_logits: ``[..., V]``.
        teacher: dense logits ``[..., V]`` or a sparse teacher with leading shape ``[...]``.
        temperature: τ, a float or one per position ``[...]``.
        dtype: the computation dtype.

    Returns:
        Two ``[..., V]`` or two ``[..., k + 1]`` log-probability tensors.
    """
    if isinstance(teacher, SparseTeacher):
        lq = log_probs(coarse_student(student_logits, teacher.ids, dtype), temperature, dtype)
        return lq, log_probs(teacher.coarse(dtype), temperature, dtype)
    return log_probs(student_logits, temperature, dtype), log_probs(teacher, temperature, dtype)


# (student_logits [c, V], teacher [c, V] | SparseTeacher [c], labels [c]) -> scores [c], at τ = 1.
LogitScore = Callable[[Tensor, "Tensor | SparseTeacher", "Tensor | None"], Tensor]


def logit_scorer(
    score: Callable, dtype: torch.dtype, full_student: bool = False, indicator: str | None = None
) -> LogitScore:
    """Wrap an indicator ``f(log q, log p, labels)`` into ``g(student_logits, teacher, labels)`` at τ = 1, for dense
    or sparse teachers. ``full_student`` (the ``ce`` indicator) hands it the student's full log-probabilities.
    ``indicator``: its name, when a faster implementation on dense logits may stand in for it
    (:data:`adakd.adaptive.LOGIT_INDICATORS`, without gradient)."""
    direct = LOGIT_INDICATORS.get(indicator) if indicator is not None else None

    def scorer(student_logits: Tensor, teacher: Tensor | SparseTeacher, labels: Tensor | None) -> Tensor:
        if isinstance(teacher, SparseTeacher):
            if full_student:
                return score(log_probs(student_logits, 1.0, dtype), teacher.coarse(dtype), labels)
        elif direct is not None:
            return direct(student_logits, teacher, dtype)
        return score(*pair_log_probs(student_logits, teacher, 1.0, dtype), labels)

    return scorer


# How far the teacher's total mass (support + tail) may be from 1: float16 log-probabilities (the cache's storage)
# round each term by ~5e-4 relative; a distribution off by more was not made by sparse_from_logits.
MASS_TOLERANCE = 1e-2


def check_sparse(teacher: SparseTeacher, lead: torch.Size, vocab: int, valid: Tensor | None = None) -> None:
    """Raise ``ValueError`` unless ``teacher`` has the leading shape ``lead``, a support of k ≥ 1 ids below ``vocab``,
    distinct within each position, and a total mass exp(logsumexp(logprobs, tail)) within ``MASS_TOLERANCE`` of 1
    (repeated ids or mass above 1 would give a wrong loss without any other sign). ``valid`` (``lead``, bool): the
    positions that take a loss; the others (a collator's filler rows) are not checked for distinctness and mass."""
    if not isinstance(teacher, SparseTeacher):
        raise ValueError(f"expected a SparseTeacher, got {type(teacher).__name__}")
    ids, lp, tail = teacher
    if tail.shape != lead or ids.shape != (*lead, ids.shape[-1]) or lp.shape != ids.shape:
        raise ValueError(
            f"sparse teacher ids {tuple(ids.shape)}, logprobs {tuple(lp.shape)} and tail {tuple(tail.shape)} must be "
            f"[..., k], [..., k] and [...] with [...] = {tuple(lead)}"
        )
    if ids.dtype not in (torch.int64, torch.int32) or not lp.is_floating_point():
        raise ValueError("sparse teacher ids must be int64 (or int32) and its logprobs floating point")
    if ids.shape[-1] > vocab:
        raise ValueError(f"sparse teacher support k = {ids.shape[-1]} exceeds the student's vocabulary {vocab}")
    if ids.shape[-1] < 1:
        raise ValueError("sparse teacher support k = 0: it needs at least one token id per position")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"sparse teacher ids must lie in [0, {vocab}) (the student's vocabulary)")
    if valid is not None and valid.shape == lead:
        ids, lp, tail = ids[valid], lp[valid], tail[valid]
    if ids.shape[-1] > 1 and bool((ids.sort(dim=-1).values.diff(dim=-1) == 0).any()):
        raise ValueError("sparse teacher ids must be distinct within a position (a repeated id counts its mass twice)")
    if tail.numel():
        mass = torch.cat([lp.float(), tail.float().unsqueeze(-1)], dim=-1).logsumexp(dim=-1).exp()
        worst = float((mass - 1).abs().max())
        if not worst <= MASS_TOLERANCE:  # NaN fails too
            raise ValueError(
                f"sparse teacher probabilities (top-k plus tail) must sum to 1; they are off by up to {worst:.3g} "
                "(logprobs at τ = 1 and tail = log(1 − Σ p), as sparse_from_logits makes them)"
            )


def sparse_divergence(
    name: str,
    student_logits: Tensor,
    teacher: SparseTeacher,
    *,
    temperature: float | Tensor = 1.0,
    **params: float,
) -> Tensor:
    """Per-position divergence D(p̃^τ, q̃^τ) between a sparse teacher and the student's coarse view of itself.

    Args:
        name: the base divergence, as :func:`adakd.divergence`.
        student_logits: ``[..., V]``.
        teacher: a :class:`SparseTeacher` with leading shape ``[...]``.
        temperature: τ, a float or one per position ``[...]``; applied to the k + 1 outcomes.
        **params: the divergence's parameters, as :func:`adakd.divergence`.

    Returns:
        ``[...]`` float32 (float64 for float64 logits), no reduction.
    """
    fn = divergence_fn(name, **params)
    check_sparse(teacher, student_logits.shape[:-1], student_logits.shape[-1])
    dtype = compute_dtype(student_logits, teacher.logprobs)
    return fn(*pair_log_probs(student_logits, teacher, temperature, dtype))


@torch.no_grad()
def sparse_difficulty_scores(
    indicator: str, student_logits: Tensor, teacher: SparseTeacher, labels: Tensor | None = None
) -> Tensor:
    """:func:`adakd.difficulty_scores` against a sparse teacher (coarse distributions at τ = 1; ``ce`` reads the
    student's full softmax).

    Returns:
        ``[...]`` scores, float32 (float64 for float64 logits); higher means harder.
    """
    check_sparse(teacher, student_logits.shape[:-1], student_logits.shape[-1])
    dtype = compute_dtype(student_logits, teacher.logprobs)
    scorer = logit_scorer(score_fn(indicator), dtype, indicator in FULL_STUDENT_INDICATORS)
    return scorer(student_logits, teacher, labels)
