"""Chunked measurements without gradient, on the fused machinery's sources and chunk loop.

- :func:`evaluation_sums` / :func:`evaluation_sums_hidden`: per-sequence float64 sums of tokens, CE, KD at τ = 1 and
  Hellinger (what evaluation during training logs);
- :func:`teacher_top_k`: the teacher's top-k rows (:func:`adakd.sparse.sparse_from_logits`, what a teacher cache
  stores);
- :func:`entropy_sum`: the sum of the softmax entropies of rows of logits.

Each computes one chunk of ``[c, V]`` logits at a time, never ``[N, V]`` beyond what the caller already holds.

This module imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..divergences import DivergenceFn
from ..labels import IGNORE_INDEX
from ..sparse import SparseTeacher, sparse_from_logits
from .sources import DenseLogits, LinearHead, chunks, default_chunk_size
from .terms import entropy_chunk, eval_terms

__all__ = ["ENTROPY_CHUNK", "TOP_K_LOGITS", "entropy_sum", "evaluation_sums", "evaluation_sums_hidden", "teacher_top_k"]

TOP_K_LOGITS = 1 << 26  # logits per chunk of teacher_top_k (as the cache writer takes them)
ENTROPY_CHUNK = 1024  # rows per chunk of entropy_sum, to bound its [rows, V] temporaries


def _sums(labels: Tensor, student, teacher, divergence: DivergenceFn, vocab_size: int | None, chunk_size: int):
    """``[B, 4]`` per-sequence sums over the valid positions of ``labels [B, T]``."""
    width = labels.shape[1]
    flat = labels.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    terms = torch.zeros(labels.shape[0], 3, dtype=torch.float64, device=labels.device)
    for ch in chunks(rows, chunk_size, student, teacher):
        terms.index_add_(0, ch.rows // width, eval_terms(ch.student, ch.teacher, flat[ch.rows], divergence, vocab_size))
    tokens = (labels != IGNORE_INDEX).sum(1).double()
    return torch.cat([tokens.unsqueeze(1), terms], 1)


@torch.no_grad()
def evaluation_sums(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    divergence: DivergenceFn,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-sequence sums of one eval batch on materialised logits, in float64.

    Args:
        student_logits: ``[B, T, V_s]``, shifted: position i predicts ``labels[:, i]``.
        teacher_logits: ``[B, T, V_t]`` (V_t ≥ V_s; cropped as the loss does) or None (plain SFT: CE only).
        labels: ``[B, T]``, -100 where there is no target.
        divergence: the run's base divergence (``AdaKDLoss.div``), applied at τ = 1 without selection or τ².
        vocab_size: the tokenizer's size (for the teacher's crop check).
        chunk_size: rows of logits per chunk; default half of :func:`default_chunk_size` (float64).

    Returns:
        ``[B, 4]`` float64: tokens, Σ CE, Σ KD, Σ Hellinger of each sequence.
    """
    v = student_logits.shape[-1]
    student = DenseLogits(student_logits.reshape(-1, v))
    teacher = None if teacher_logits is None else DenseLogits(teacher_logits.reshape(-1, teacher_logits.shape[-1]))
    chunk = chunk_size or max(1, default_chunk_size(v, student_logits.device) // 2)
    return _sums(labels, student, teacher, divergence, vocab_size, chunk)


@torch.no_grad()
def evaluation_sums_hidden(
    student: tuple[Tensor, Tensor, Tensor | None],
    teacher: tuple[Tensor, Tensor, Tensor | None] | None,
    labels: Tensor,
    divergence: DivergenceFn,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """:func:`evaluation_sums` from final hidden states and lm_head weights: each chunk's logits are
    ``hidden @ Wᵀ (+ b)``, never the whole batch's.

    Args:
        student: ``(hidden [B, T, H_s], weight [V_s, H_s], bias [V_s] | None)``.
        teacher: ``(hidden [B, T, H_t], weight [V_t, H_t], bias [V_t] | None)`` or None.
        labels: ``[B, T]``, -100 where there is no target.
        divergence: the run's base divergence, as in :func:`evaluation_sums`.
        vocab_size: the tokenizer's size (for the teacher's crop check).
        chunk_size: rows of logits per chunk; default half of :func:`default_chunk_size` (float64).

    Returns:
        ``[B, 4]`` float64, as :func:`evaluation_sums`.
    """
    hidden, weight, bias = student
    source = LinearHead(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    t_source = None
    if teacher is not None:
        t_hidden, t_weight, t_bias = teacher
        t_source = LinearHead(t_hidden.reshape(-1, t_hidden.shape[-1]), t_weight, t_bias)
    chunk = chunk_size or max(1, default_chunk_size(weight.shape[0], hidden.device) // 2)
    return _sums(labels, source, t_source, divergence, vocab_size, chunk)


@torch.no_grad()
def teacher_top_k(
    rows: Tensor,
    k: int,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    width: int | None = None,
    chunk_size: int | None = None,
) -> SparseTeacher:
    """The teacher's top-k view (:func:`adakd.sparse.sparse_from_logits`) of N rows, chunk by chunk.

    Args:
        rows: ``[N, H]`` final hidden states with the lm_head ``weight [V, H]`` (and ``bias [V]``), or ``[N, V]``
            logits (``weight`` None).
        k: the support size.
        width: keep the first ``width`` logits (the student's vocabulary; rows beyond are padding); default all.
        chunk_size: rows per chunk; default ``TOP_K_LOGITS // width``.

    Returns:
        A :class:`SparseTeacher` with ``ids [N, k']``, ``logprobs [N, k']`` and ``tail [N]``, k' = min(k, width)
        (float32 log-probabilities, float64 for float64 inputs).
    """
    source = DenseLogits(rows) if weight is None else LinearHead(rows, weight, bias)
    width = width or (rows.shape[-1] if weight is None else weight.shape[0])
    parts = []
    every = torch.arange(rows.shape[0], device=rows.device)
    for ch in chunks(every, chunk_size or max(1, TOP_K_LOGITS // width), source):
        parts.append(sparse_from_logits(ch.student[..., :width], k))
    if not parts:
        empty = torch.empty(0, min(k, width), device=rows.device)
        return SparseTeacher(empty.long(), empty, torch.empty(0, device=rows.device))
    return SparseTeacher(*(torch.cat(field) for field in zip(*parts, strict=True)))


@torch.no_grad()
def entropy_sum(logits: Tensor, chunk_size: int = ENTROPY_CHUNK) -> Tensor:
    """Σ over the rows of ``logits [N, V]`` of the softmax entropy (nats), float32, chunk by chunk."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for ch in chunks(torch.arange(logits.shape[0], device=logits.device), chunk_size, DenseLogits(logits)):
        total += entropy_chunk(ch.student)
    return total
