"""The fused machinery's one ``torch.autograd.Function`` and its float32 gradient accumulators.

Like Liger-Kernel's chunked losses, a plan computes the loss *and* its gradients with respect to the student's
hidden states, lm_head weight and bias inside the forward, chunk by chunk, into :class:`GradBuffers`; the backward
only scales them by the incoming gradient.

This module imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["FusedFunction", "GradBuffers", "Job", "run_job"]


class GradBuffers:
    """Float32 (or float64) gradient accumulators for the student's hidden states, weight and bias."""

    def __init__(self, needs: tuple[bool, bool, bool], hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype):
        need_h, need_w, need_b = needs
        self.h = torch.zeros_like(hidden) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        self.b = torch.zeros(bias.shape, dtype=dtype, device=weight.device) if need_b else None
        self.weight = weight

    @property
    def any(self) -> bool:
        """Whether any input takes a gradient."""
        return self.h is not None or self.w is not None or self.b is not None

    def like(self) -> GradBuffers:
        """Empty buffers of the same shapes (a second accumulator, e.g. for a term whose weight comes later)."""
        other = GradBuffers.__new__(GradBuffers)
        other.h, other.w, other.b = (None if t is None else torch.zeros_like(t) for t in (self.h, self.w, self.b))
        other.weight = self.weight
        return other

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
        """Multiply every buffer by ``factor`` in place."""
        for t in (self.h, self.w, self.b):
            if t is not None:
                t.mul_(factor)

    def add_scaled_(self, other: GradBuffers, factor: float) -> None:
        """``self += factor · other``, buffer by buffer."""
        for mine, theirs in ((self.h, other.h), (self.w, other.w), (self.b, other.b)):
            if mine is not None and theirs is not None:
                mine.add_(theirs, alpha=factor)


@dataclass(frozen=True)
class Job:
    """What :class:`FusedFunction` runs: ``run(grads) -> (loss, outcome)`` fills the gradient buffers of the
    student's (hidden, weight, bias) and returns the scalar loss and the plan's result (any value, passed through
    untouched); ``dtype`` is the accumulators' dtype."""

    run: Callable[[GradBuffers], tuple[Tensor, Any]]
    dtype: torch.dtype


class FusedFunction(torch.autograd.Function):
    """The loss of a plan with its gradients computed in the forward (the only autograd Function of the package).

    Inputs: the student's ``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None`` (these may require grad) and a
    :class:`Job`. Outputs: the scalar loss and the job's outcome (no gradient). The backward multiplies the stored
    gradients by the incoming one, in the parameters' dtypes.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, job: Job) -> tuple[Tensor, Any]:
        # Gradients accumulate in float32 (or float64): summing many bf16 chunk products would lose precision.
        grads = GradBuffers(ctx.needs_input_grad[:3], hidden, weight, bias, job.dtype)
        loss, outcome = job.run(grads)
        ctx.save_for_backward(grads.h, grads.w, grads.b)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss, outcome

    @staticmethod
    def backward(ctx, grad_out: Tensor, *unused: Any):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.param_dtypes
        out_h = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        out_w = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        out_b = None if grad_b is None else (grad_b * grad_out).to(b_dtype)
        return out_h, out_w, out_b, None


def run_job(hidden: Tensor, weight: Tensor, bias: Tensor | None, job: Job) -> tuple[Tensor, Any]:
    """``(loss, outcome)`` of ``job`` with gradients into the student's ``hidden``, ``weight`` and ``bias``."""
    return FusedFunction.apply(hidden, weight, bias, job)
