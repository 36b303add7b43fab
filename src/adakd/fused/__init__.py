"""The AdaKD loss from hidden states and lm_head weights, in chunks: never the tokens × vocabulary logits.

Exact AdaKD must know every token's difficulty before it can pick tokens and temperatures, so the loss is two
passes over row chunks (``docs/method.md``; the same semantics as :meth:`adakd.AdaKDLoss.forward`): pass 1 scores
every valid row without gradient, the global top-k, median and temperatures follow, pass 2 computes the loss and
the gradients of the kept rows. Like Liger-Kernel's chunked losses the gradients are computed inside the forward,
so the backward only scales them. Peak extra memory is O(chunk × V), plus the float32 weight-gradient accumulator.

The package is four small parts:

- :mod:`~adakd.fused.sources`: where a chunk's logits come from (a linear head on hidden states, with the 1/τ
  fold as an option; materialised logits; a sparse teacher's rows) and :func:`chunks`, the one chunk loop;
- :mod:`~adakd.fused.terms`: per-chunk values and gradients (KD for any divergence, CE, the scores' gradient,
  the evaluation terms, the entropy);
- :mod:`~adakd.fused.function`: the one ``torch.autograd.Function`` and the gradient accumulators;
- :mod:`~adakd.fused.plans` (exact, τ-gradient, one-pass, CE only) and :mod:`~adakd.fused.measures` (evaluation
  sums, teacher top-k, entropy): the pass schedules.

Cross-entropy rides along (``AdaKDLoss.forward_hidden(ce_weight=...)`` or ``mix=...``): pass 1 already computes
every valid token's student logits, so the CE value and its gradient are taken there, into the same gradient
buffers pass 2 then adds the kept tokens' KD gradients to; mixing CE in costs no extra logit product.

``impl="torch"`` runs the chunk math eagerly (always available, the reference); ``impl="compile"`` runs the
logit-level part of a chunk (softmaxes, divergence, its gradient) through ``torch.compile``.

This package imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..labels import IGNORE_INDEX
from .measures import entropy_sum, evaluation_sums, evaluation_sums_hidden, teacher_top_k
from .outcome import Outcome
from .plans import KDPlan, cross_entropy, exact, one_pass
from .sources import DenseLogits, LinearHead, SparseRows, chunks, default_chunk_size, linear, teacher_source
from .terms import IMPLS, KDTerm, ce_chunk, chunk_loss_fn

__all__ = [
    "IMPLS",
    "DenseLogits",
    "KDPlan",
    "KDTerm",
    "LinearHead",
    "Outcome",
    "SparseRows",
    "ce_chunk",
    "chunk_loss_fn",
    "chunks",
    "cross_entropy",
    "default_chunk_size",
    "entropy_sum",
    "evaluation_sums",
    "evaluation_sums_hidden",
    "exact",
    "fused_cross_entropy",
    "linear",
    "one_pass",
    "teacher_source",
    "teacher_top_k",
]


def fused_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    chunk_size: int,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Σ cross-entropy over the rows of ``hidden [N, H]`` whose ``labels [N]`` are not ``ignore_index``, without
    keeping ``[N, V]`` logits (:func:`~adakd.fused.plans.cross_entropy`); float32 (float64 for float64 inputs); 0
    with a zero gradient when every label is masked."""
    rows = (labels != ignore_index).nonzero().squeeze(1)
    dtype = torch.promote_types(torch.float32, hidden.dtype)
    if rows.numel() == 0:
        zero = hidden[:0].sum().to(dtype) + weight[:0].sum().to(dtype)
        return zero if bias is None else zero + bias[:0].sum().to(dtype)
    return cross_entropy(LinearHead(hidden, weight, bias), rows, labels.index_select(0, rows), chunk_size, dtype)
