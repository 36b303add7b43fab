"""The AdaKD loss from hidden states and lm_head weights, in chunks: never the tokens × vocabulary logits.

Exact AdaKD must know every token's difficulty before it can pick tokens and temperatures, so this is two passes
over row chunks (``docs/method.md``; the same semantics as :meth:`adakd.AdaKDLoss.forward`):

1. **scores** (no grad): for chunks of the valid rows, logits = hidden @ weightᵀ (+ bias) for both models, then
   the difficulty indicator; only the ``[N]`` scores are kept. The caller then takes the global top-k, the
   median and the temperatures.
2. **loss and gradients** (:class:`FusedKeptLoss`): for chunks of the kept rows, the logits again, the per-token
   τ²·D and its gradient with respect to the student logits (``torch.func.grad_and_value`` on the chunk), and at
   once the gradients of the student hidden states, weight and bias. Like Liger-Kernel's chunked losses the
   gradients are computed inside the forward, so the backward only scales them.

Peak extra memory is O(chunk × V) for the logits of one chunk, plus the float32 weight-gradient accumulator.

Cross-entropy rides along (``AdaKDLoss.forward_hidden(ce_weight=...)``): pass 1 already computes every valid
token's student logits, so the CE value and its gradient (softmax − one-hot) are taken there, into the same
gradient buffers pass 2 then adds the kept tokens' KD gradients to; mixing CE into the loss costs no extra logit
product. :class:`FusedCrossEntropy` is the same chunked CE alone (plain SFT on the fused path).

``impl="torch"`` runs the chunk math eagerly (always available, the reference); ``impl="compile"`` runs the
logit-level part of a chunk (softmaxes, divergence, its gradient) through ``torch.compile``.

:class:`FusedOnePassLoss` is the optional approximation: one pass that scores, selects and differentiates each
chunk at once, with the score threshold and the IDTS median taken from the previous micro-batch. It does each
logit product once instead of up to twice.

This module imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .adaptive import idts_from_median, idts_temperatures_with_grad
from .divergences import DivergenceFn
from .labels import IGNORE_INDEX
from .sparse import LogitScore, SparseTeacher, pair_log_probs

__all__ = [
    "IMPLS",
    "CrossEntropyPart",
    "FusedCrossEntropy",
    "FusedKeptLoss",
    "FusedKeptLossTauGrad",
    "FusedOnePassLoss",
    "ce_chunk",
    "chunk_loss_fn",
    "chunked_scores",
    "default_chunk_size",
    "fused_cross_entropy",
    "linear",
]

IMPLS = ("torch", "compile")

# (student_logits [c, V], teacher_logits [c, V] | SparseTeacher [c], tau [c] | float)
#   -> (Σ τ²·D over the chunk, d/d student_logits)
ChunkFn = Callable[[Tensor, "Tensor | SparseTeacher", "Tensor | float"], tuple[Tensor, Tensor]]


def default_chunk_size(vocab: int, device: torch.device) -> int:
    """Rows per chunk: about 2^23 logits per chunk on a CPU (cache-sized, ~32 MB in float32) and 2^25 on an
    accelerator (large enough for efficient matrix products, ~128 MB per float32 [chunk, V] buffer)."""
    budget = 2**25 if device.type == "cuda" else 2**23
    return max(1, budget // vocab)


def linear(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``hidden [c, H] @ weight[V, H]ᵀ (+ bias [V])`` → logits ``[c, V]`` in the inputs' dtype."""
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


def chunk_logits(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    rows: Tensor,
    chunk_size: int,
):
    """For each chunk of ``rows``: ``(start, rows [c], student hidden [c, H_s], student logits [c, V],
    teacher logits [c, V])``, the logits in the inputs' dtype; for a :class:`SparseTeacher` ``teacher_hidden`` (with
    weight and bias None) the teacher part is its ``[c]`` rows. The one loop every pass of the fused loss runs."""
    sparse = isinstance(teacher_hidden, SparseTeacher)
    for start in range(0, rows.numel(), chunk_size):
        r = rows[start : start + chunk_size]
        h = student_hidden.index_select(0, r)
        if sparse:
            z_t = teacher_hidden.index_select(r)
        else:
            z_t = linear(teacher_hidden.index_select(0, r), teacher_weight, teacher_bias)
        yield start, r, h, linear(h, student_weight, student_bias), z_t


@torch.no_grad()
def chunked_scores(
    score: LogitScore,
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    rows: Tensor,
    targets: Tensor,
    chunk_size: int,
    dtype: torch.dtype,
    ce: CrossEntropyPart | None = None,
) -> Tensor:
    """Pass 1: the difficulty score of each given row, one chunk of logits at a time.

    Args:
        score: an indicator on logits (:func:`adakd.sparse.logit_scorer` of :func:`adakd.adaptive.score_fn`).
        student_hidden: ``[N, H_s]``; student_weight ``[V, H_s]``; student_bias ``[V]`` or None.
        teacher_hidden: ``[N, H_t]``; teacher_weight ``[V, H_t]`` (already cropped to V); teacher_bias ``[V]``;
            or a :class:`SparseTeacher` over the N rows with teacher_weight and teacher_bias None.
        rows: ``[n]`` row indices to score (the valid positions).
        targets: ``[n]`` the rows' labels (for the ``ce`` indicator).
        chunk_size: rows per chunk.
        dtype: the computation dtype of the probabilities (float32 or float64).
        ce: when given, the rows' cross-entropy and its (unscaled) gradients are accumulated into it from the same
            logits (the rows must be every valid row).

    Returns:
        ``[n]`` scores in ``dtype``.
    """
    n = rows.numel()
    out = torch.empty(n, dtype=dtype, device=student_hidden.device)
    parts = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    for start, r, h, z_s, z_t in chunk_logits(*parts, rows, chunk_size):
        y = targets[start : start + chunk_size]
        out[start : start + r.numel()] = score(z_s, z_t, y)
        if ce is not None:
            ce.add(r, h, z_s, y)
    if ce is not None:
        ce.filled = True
    return out


def ce_chunk(student_logits: Tensor, targets: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(Σ −log q(y), softmax − one-hot)`` of a chunk of student logits ``[c, V]`` with targets ``[c]`` (all valid),
    in ``dtype``: the cross-entropy and its gradient with respect to the logits."""
    lq = torch.log_softmax(student_logits.to(dtype), dim=-1)
    index = targets.unsqueeze(-1)
    total = -lq.gather(-1, index).sum()
    grad = lq.exp_()
    grad.scatter_add_(-1, index, torch.full(index.shape, -1.0, dtype=grad.dtype, device=grad.device))
    return total, grad


class CrossEntropyPart:
    """The cross-entropy of every valid row, accumulated while another pass has the student's logits at hand: its
    sum (``total``) and its gradients with respect to the student's hidden states, weight and bias (``grads``,
    unscaled until :meth:`scaled`). ``filled`` says whether a pass has already gone over every valid row."""

    def __init__(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, needs: tuple | None = None
    ) -> None:
        if needs is None:  # outside an autograd Function: what will take a gradient
            grad = torch.is_grad_enabled()
            needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
                     grad and bias is not None and bias.requires_grad)  # fmt: skip
        self.grads = _GradBuffers(needs, hidden, weight, bias, dtype)
        self.total = torch.zeros((), dtype=dtype, device=hidden.device)
        self.dtype = dtype
        self.filled = False
        self.kd_value: Tensor | None = None  # the KD part of the loss it was mixed into, set by that pass

    def add(self, rows: Tensor, hidden: Tensor, student_logits: Tensor, targets: Tensor, coef: float = 1.0) -> None:
        """Add the chunk ``rows``' cross-entropy (times ``coef``) and its gradients."""
        total, grad = ce_chunk(student_logits, targets, self.dtype)
        self.total += total * coef
        if self.grads.any:
            self.grads.add(rows, hidden, grad * coef if coef != 1.0 else grad, accumulate=True)


def chunk_loss_fn(
    div: DivergenceFn, dtype: torch.dtype, impl: str = "torch", tau_weight: str = "squared", tau_grad: bool = False
) -> ChunkFn:
    """Build the per-chunk ``(Σ w(τ)·D, ∂/∂ student logits)`` function for a divergence; w(τ) = τ² (Eq. 2,
    ``tau_weight="squared"``) or 1 (``"none"``). With ``tau_grad`` it returns ``(Σ w·D, ∂/∂ logits, ∂/∂ τ [c])``.

    The gradient is taken with ``torch.func.grad_and_value`` on the logits of the chunk only, so every divergence
    of the library works here without a hand-written gradient; the matrix products stay outside.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    squared = tau_weight == "squared"

    def value(
        student_logits: Tensor, teacher_logits: Tensor | SparseTeacher, tau: Tensor | float, weight: Tensor | None
    ) -> Tensor:
        per_token = div(*pair_log_probs(student_logits, teacher_logits, tau, dtype))
        if weight is not None:  # logits already divided by τ (the fold below): the τ² weight comes apart
            return (per_token * weight).sum()
        return (per_token * (tau * tau)).sum() if squared else per_token.sum()

    grad_and_value = torch.func.grad_and_value(value, argnums=(0, 2) if tau_grad else 0)

    def chunk(
        student_logits: Tensor,
        teacher_logits: Tensor | SparseTeacher,
        tau: Tensor | float,
        weight: Tensor | None = None,
    ):
        grad, loss = grad_and_value(student_logits.to(dtype), teacher_logits, tau, weight)
        return (loss, *grad) if tau_grad else (loss, grad)

    chunk.squared = squared  # the fold in pass 2 passes the τ² weight itself
    if impl == "compile":
        compiled = torch.compile(chunk, dynamic=True)
        compiled.squared = squared
        return compiled
    return chunk


class FusedKeptLoss(torch.autograd.Function):
    """Pass 2: ``scale · Σ_kept τ_i²·D(p^τi, q^τi)`` with its gradients computed chunk by chunk in the forward.

    Inputs: ``student_hidden [N, H_s]``, ``student_weight [V, H_s]``, ``student_bias [V] | None`` (these may
    require grad), ``teacher_hidden [N, H_t]``, ``teacher_weight [V, H_t]``, ``teacher_bias [V] | None``
    (detached), ``rows [k]`` (kept row indices, unique), ``tau`` (``[k]`` aligned with ``rows``, or a float),
    ``scale`` (1/k for a mean), ``chunk`` (a :data:`ChunkFn`), ``chunk_size``, ``dtype``; optionally ``ce`` (a
    :class:`CrossEntropyPart`), ``ce_coef`` and ``ce_targets`` (``[k]``, aligned with ``rows``): the output then
    adds ``ce_coef`` × Σ CE. A ``ce`` already filled by pass 1 brings its gradients, scaled here by ``ce_coef``;
    otherwise (every row kept, no pass 1) the CE is computed here, from the same logits as the KD term.
    Output: the float scalar loss; the backward multiplies the stored gradients by its incoming gradient.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        rows: Tensor,
        tau: Tensor | float,
        scale: float,
        chunk: ChunkFn,
        chunk_size: int,
        dtype: torch.dtype,
        ce: CrossEntropyPart | None = None,
        ce_coef: float = 0.0,
        ce_targets: Tensor | None = None,
    ) -> Tensor:
        # Gradients accumulate in float32 (or float64): summing many bf16 chunk products would lose precision.
        grads, ce_total, prefilled = _start(ctx, ce, ce_coef, student_hidden, student_weight, student_bias, dtype)
        total = torch.zeros((), dtype=dtype, device=student_hidden.device)
        parts = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
        if _can_fold(tau, *parts):
            total = _folded_pass(parts, rows, tau, chunk, chunk_size, scale, grads, prefilled, dtype)
            chunks = iter(())  # done
        else:
            chunks = chunk_logits(*parts, rows, chunk_size)
        for start, r, h, z_s, z_t in chunks:
            tau_c = tau[start : start + chunk_size] if isinstance(tau, Tensor) else tau
            loss_c, g = chunk(z_s, z_t, tau_c)
            total += loss_c
            g = g * scale
            if ce is not None and not prefilled:  # every row is kept: the CE from the same logits
                ce_c, g_ce = ce_chunk(z_s, ce_targets[start : start + chunk_size], dtype)
                ce.total += ce_c
                ce_total += ce_c * ce_coef
                g = g + ce_coef * g_ce
            if grads.any:
                grads.add(r, h, g, accumulate=prefilled)
        ctx.save_for_backward(grads.h, grads.w, grads.b)
        ctx.param_dtypes = (student_weight.dtype, None if student_bias is None else student_bias.dtype)
        if ce is not None:
            ce.kd_value = (total * scale).detach()
        return total * scale + ce_total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _scaled_grads(ctx, grad_out) + (None,) * 12


class FusedKeptLossTauGrad(torch.autograd.Function):
    """Pass 2 of :class:`FusedKeptLoss` with the gradient also flowing through the IDTS temperatures
    (``AdaKDLoss(detach_tau=False)``, the authors' released gradients): τ_i depends on the kept token's score s_i
    and on the kept scores' median m, both functions of the student's logits at τ = 1.

    - pass 2: per chunk, the loss, ∂/∂ logits at fixed τ, and ∂/∂τ_i;
    - on the ``[k]`` vectors: ∂L/∂s_i = Σ_j ∂L/∂τ_j · ∂τ_j/∂s_i (the direct term, plus the median's term for the
      token that is the median), by autograd through :func:`adakd.adaptive.idts_temperatures_with_grad`;
    - pass 3: per chunk, the logits again and ∂(Σ ∂L/∂s_i · s_i)/∂ logits, added to the gradients.

    Inputs: as :class:`FusedKeptLoss`, with ``kept_scores [k]`` (detached, aligned with ``rows``) and
    ``targets [k]`` in place of ``tau``, then ``score`` (a differentiable indicator), ``c``, ``tau_base``,
    ``reverse``, ``scale``, ``chunk`` (built with ``tau_grad=True``), ``chunk_size``, ``dtype``.
    Outputs: the loss, and the ``[k]`` temperatures (no gradient).
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        rows: Tensor,
        kept_scores: Tensor,
        targets: Tensor,
        score: LogitScore,
        c: float,
        tau_base: float,
        reverse: bool,
        scale: float,
        chunk: Callable,
        chunk_size: int,
        dtype: torch.dtype,
        ce: CrossEntropyPart | None = None,
        ce_coef: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        grads, ce_total, prefilled = _start(ctx, ce, ce_coef, student_hidden, student_weight, student_bias, dtype)
        with torch.enable_grad():
            s_k = kept_scores.detach().to(dtype).requires_grad_(True)
            tau_graph = idts_temperatures_with_grad(s_k, c=c, tau_base=tau_base, reverse=reverse)
        tau = tau_graph.detach()
        grad_tau = torch.zeros_like(tau)
        total = torch.zeros((), dtype=dtype, device=student_hidden.device)
        parts = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
        for start, r, h, z_s, z_t in chunk_logits(*parts, rows, chunk_size):
            loss_c, g, g_tau = chunk(z_s, z_t, tau[start : start + chunk_size])
            total += loss_c
            grad_tau[start : start + r.numel()] = g_tau
            if grads.any:
                grads.add(r, h, g * scale, accumulate=prefilled)
        if grads.any:
            (grad_scores,) = torch.autograd.grad(tau_graph, s_k, grad_outputs=grad_tau * scale)
            for start, r, h, z_s, z_t in chunk_logits(*parts, rows, chunk_size):
                with torch.enable_grad():
                    z_s = z_s.detach().to(dtype).requires_grad_(True)
                    s = score(z_s, z_t, targets[start : start + chunk_size])
                    (g,) = torch.autograd.grad(s, z_s, grad_outputs=grad_scores[start : start + r.numel()])
                grads.add(r, h, g, accumulate=True)
        ctx.save_for_backward(grads.h, grads.w, grads.b)
        ctx.param_dtypes = (student_weight.dtype, None if student_bias is None else student_bias.dtype)
        ctx.mark_non_differentiable(tau)
        if ce is not None:
            ce.kd_value = (total * scale).detach()
        return total * scale + ce_total, tau

    @staticmethod
    def backward(ctx, grad_out: Tensor, *unused: Tensor):
        return _scaled_grads(ctx, grad_out) + (None,) * 16


def _can_fold(tau, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias) -> bool:
    """Whether pass 2 may divide by τ_i before the logit products instead of after: per-token τ, a dense teacher,
    no biases (z/τ = (h/τ) @ Wᵀ then holds exactly up to rounding) and float32/float64 hidden states (scaling bf16
    hidden states would add a rounding the logits path does not have). It saves two [c, V] divisions per chunk."""
    return (
        isinstance(tau, Tensor)
        and not isinstance(teacher_hidden, SparseTeacher)
        and student_bias is None
        and teacher_bias is None
        and student_hidden.dtype in (torch.float32, torch.float64)
        and teacher_hidden.dtype in (torch.float32, torch.float64)
    )


def _folded_pass(parts, rows, tau, chunk, chunk_size, scale, grads, prefilled, dtype) -> Tensor:
    """:class:`FusedKeptLoss`'s pass 2 with 1/τ_i applied to the hidden states (``[c, H]``) rather than to the
    logits (``[c, V]``); the τ_i² weight is passed apart. Returns Σ w(τ)·D (unscaled); the gradients go to ``grads``
    times ``scale``."""
    student_hidden, student_weight, _, teacher_hidden, teacher_weight, _ = parts
    total = torch.zeros((), dtype=dtype, device=student_hidden.device)
    weight_all = tau * tau if chunk.squared else torch.ones_like(tau)
    for start in range(0, rows.numel(), chunk_size):
        r = rows[start : start + chunk_size]
        inv = (1.0 / tau[start : start + chunk_size]).unsqueeze(1)
        h = student_hidden.index_select(0, r) * inv.to(student_hidden.dtype)
        z_t = (teacher_hidden.index_select(0, r) * inv.to(teacher_hidden.dtype)) @ teacher_weight.t()
        loss_c, g = chunk(h @ student_weight.t(), z_t, 1.0, weight_all[start : start + chunk_size])
        total += loss_c
        if grads.any:
            grads.add(r, h, g * scale, accumulate=prefilled, row_scale=inv)
    return total


def _start(ctx, ce, ce_coef, hidden, weight, bias, dtype) -> tuple[_GradBuffers, Tensor, bool]:
    """A pass-2 forward's gradient buffers, its CE total so far and whether the buffers already hold pass 1's CE
    gradients (then scaled by ``ce_coef`` here)."""
    if ce is not None and ce.filled:
        ce.grads.scale_(ce_coef)
        return ce.grads, ce.total * ce_coef, True
    grads = _GradBuffers(ctx.needs_input_grad[:3], hidden, weight, bias, dtype)
    return grads, torch.zeros((), dtype=dtype, device=hidden.device), False


def _scaled_grads(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients stored by a forward, times the incoming gradient, in the parameters' dtypes."""
    grad_h, grad_w, grad_b = ctx.saved_tensors
    w_dtype, b_dtype = ctx.param_dtypes
    out_h = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
    out_w = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
    out_b = None if grad_b is None else (grad_b * grad_out).to(b_dtype)
    return out_h, out_w, out_b


class _GradBuffers:
    """Float32 (or float64) gradient accumulators for the student's hidden states, weight and bias."""

    def __init__(self, needs: tuple[bool, bool, bool], hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype):
        need_h, need_w, need_b = needs
        self.h = torch.zeros_like(hidden) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        self.b = torch.zeros(bias.shape, dtype=dtype, device=weight.device) if need_b else None
        self.weight = weight

    @property
    def any(self) -> bool:
        return self.h is not None or self.w is not None or self.b is not None

    def add(
        self,
        rows: Tensor,
        hidden: Tensor,
        grad_logits: Tensor,
        accumulate: bool = False,
        row_scale: Tensor | None = None,
    ) -> None:
        """Accumulate ∂/∂(hidden, weight, bias) for ``rows`` (unique) from ∂loss/∂logits ``[c, V]``; the rows'
        hidden-state gradients are written, or added with ``accumulate`` (a second pass over the same rows).
        ``row_scale`` ``[c, 1]``: the logits were ``(hidden · row_scale) @ Wᵀ`` and ``hidden`` is already scaled, so
        only the hidden-state gradient takes the factor."""
        if self.b is not None:
            self.b += grad_logits.sum(0)
        g_in = grad_logits.to(self.weight.dtype)  # products in the model's dtype, like the naive path
        if self.h is not None:
            g_h = g_in @ self.weight
            g_h = (g_h if row_scale is None else g_h * row_scale).to(self.h.dtype)
            if accumulate:
                self.h.index_add_(0, rows, g_h)
            else:
                self.h.index_copy_(0, rows, g_h)
        if self.w is not None:
            if g_in.dtype == self.w.dtype:
                self.w.addmm_(g_in.t(), hidden.to(g_in.dtype))
            else:
                self.w += g_in.t() @ hidden

    def scale_(self, factor: float) -> None:
        for t in (self.h, self.w, self.b):
            if t is not None:
                t.mul_(factor)

    def add_scaled_(self, other: _GradBuffers, factor: float) -> None:
        """``self += factor · other``, buffer by buffer."""
        for mine, theirs in ((self.h, other.h), (self.w, other.w), (self.b, other.b)):
            if mine is not None and theirs is not None:
                mine.add_(theirs, alpha=factor)


class FusedOnePassLoss(torch.autograd.Function):
    """One pass: score, select by a given threshold, and differentiate each chunk of valid rows at once.

    An approximation of exact AdaKD: the kept set is ``score ≥ threshold`` and the IDTS median is ``median``,
    both from the previous micro-batch, instead of this micro-batch's top-k and its median. Each logit product is
    done once. The loss is ``Σ_kept τ²·D`` divided by the kept count (``mean``) or not (``sum``).

    Inputs: the student's ``hidden [N, H_s]``, ``weight [V, H_s]``, ``bias [V] | None`` (may require grad);
    the teacher's (detached, cropped to V); ``rows [n]`` (the valid rows), ``targets [n]``, ``threshold``
    (float; -inf keeps every row), ``median`` (float, or None for the fixed temperature ``tau_base``), ``c``,
    ``tau_base``, ``reverse``, ``mean`` (bool), ``score`` (an indicator), ``chunk`` (a :data:`ChunkFn`),
    ``chunk_size``, ``dtype``, and ``ce_weight`` w: the output adds w × the mean CE over the n valid rows (times the
    kept count with ``mean=False``), from the same logits; its gradients are kept in a second buffer until the kept
    count is known.
    Outputs: the loss; the ``[n]`` scores (no gradient); ``[6]`` = (kept count, Σ τ, min τ, max τ, the KD part of
    the loss, Σ CE).
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        rows: Tensor,
        targets: Tensor,
        threshold: float,
        median: float | None,
        c: float,
        tau_base: float,
        reverse: bool,
        mean: bool,
        score: LogitScore,
        chunk: ChunkFn,
        chunk_size: int,
        dtype: torch.dtype,
        ce_weight: float = 0.0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        device = student_hidden.device
        grads = _GradBuffers(ctx.needs_input_grad[:3], student_hidden, student_weight, student_bias, dtype)
        needs = ctx.needs_input_grad[:3]
        ce = CrossEntropyPart(student_hidden, student_weight, student_bias, dtype, needs) if ce_weight else None
        n = rows.numel()
        scores = torch.empty(n, dtype=dtype, device=device)
        total = torch.zeros((), dtype=dtype, device=device)
        tau_sum = torch.zeros((), dtype=dtype, device=device)
        tau_min = torch.full((), math.inf, dtype=dtype, device=device)
        tau_max = torch.full((), -math.inf, dtype=dtype, device=device)
        count = 0
        parts = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
        for start, r, h, z_s, z_t in chunk_logits(*parts, rows, chunk_size):
            s = score(z_s, z_t, targets[start : start + chunk_size])
            scores[start : start + r.numel()] = s
            if ce is not None:
                ce.add(r, h, z_s, targets[start : start + chunk_size])
            keep = (s >= threshold).nonzero().squeeze(1)
            if keep.numel() == 0:
                continue
            count += keep.numel()
            if keep.numel() < r.numel():
                r, h, s = r.index_select(0, keep), h.index_select(0, keep), s.index_select(0, keep)
                z_s = z_s.index_select(0, keep)
                z_t = z_t.index_select(keep) if isinstance(z_t, SparseTeacher) else z_t.index_select(0, keep)
            if median is None:
                tau: Tensor | float = tau_base
                tau_sum += tau_base * keep.numel()
                tau_min.clamp_(max=tau_base)
                tau_max.clamp_(min=tau_base)
            else:
                tau = idts_from_median(s, median, c=c, tau_base=tau_base, reverse=reverse)
                tau_sum += tau.sum()
                tau_min = torch.minimum(tau_min, tau.min())
                tau_max = torch.maximum(tau_max, tau.max())
            loss_c, g = chunk(z_s, z_t, tau)
            total += loss_c
            if grads.any:
                grads.add(r, h, g)
        scale = 1.0 / max(count, 1) if mean else 1.0
        grads.scale_(scale)
        ce_total = torch.zeros((), dtype=dtype, device=device)
        if ce is not None:
            ce_coef = ce_weight / n if mean else ce_weight * count / n
            grads.add_scaled_(ce.grads, ce_coef)
            ce_total = ce.total * ce_coef
        ctx.save_for_backward(grads.h, grads.w, grads.b)
        ctx.param_dtypes = (student_weight.dtype, None if student_bias is None else student_bias.dtype)
        ctx.mark_non_differentiable(scores)
        ce_sum = torch.zeros((), dtype=dtype, device=device) if ce is None else ce.total
        count_t = torch.tensor(float(count), dtype=dtype, device=device)
        info = torch.stack([count_t, tau_sum, tau_min, tau_max, total * scale, ce_sum])
        ctx.mark_non_differentiable(info)
        return total * scale + ce_total, scores, info

    @staticmethod
    def backward(ctx, grad_out: Tensor, *unused: Tensor):
        return _scaled_grads(ctx, grad_out) + (None,) * 16


class FusedCrossEntropy(torch.autograd.Function):
    """``Σ_rows −log softmax(hidden @ weightᵀ + bias)[target]`` chunk by chunk, its gradients computed in the forward
    (plain SFT on the fused path: one logit product per chunk, none recomputed in the backward).

    Inputs: ``student_hidden [N, H]``, ``student_weight [V, H]``, ``student_bias [V] | None`` (may require grad),
    ``rows [n]`` (the valid rows), ``targets [n]``, ``chunk_size``, ``dtype``. Output: the float scalar sum.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, rows, targets, chunk_size, dtype) -> Tensor:
        grads = _GradBuffers(ctx.needs_input_grad[:3], student_hidden, student_weight, student_bias, dtype)
        total = torch.zeros((), dtype=dtype, device=student_hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            r = rows[start : start + chunk_size]
            h = student_hidden.index_select(0, r)
            loss_c, g = ce_chunk(linear(h, student_weight, student_bias), targets[start : start + chunk_size], dtype)
            total += loss_c
            if grads.any:
                grads.add(r, h, g)
        ctx.save_for_backward(grads.h, grads.w, grads.b)
        ctx.param_dtypes = (student_weight.dtype, None if student_bias is None else student_bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _scaled_grads(ctx, grad_out) + (None,) * 4


def fused_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    chunk_size: int,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Σ cross-entropy over the rows of ``hidden [N, H]`` whose ``labels [N]`` are not ``ignore_index``, without
    keeping ``[N, V]`` logits (:class:`FusedCrossEntropy`); float32 (float64 for float64 inputs); 0 with a zero
    gradient when every label is masked."""
    rows = (labels != ignore_index).nonzero().squeeze(1)
    dtype = torch.promote_types(torch.float32, hidden.dtype)
    if rows.numel() == 0:
        zero = hidden[:0].sum().to(dtype) + weight[:0].sum().to(dtype)
        return zero if bias is None else zero + bias[:0].sum().to(dtype)
    return FusedCrossEntropy.apply(hidden, weight, bias, rows, labels.index_select(0, rows), chunk_size, dtype)
