"""One loss step: the student's forward, the teacher's part, the nonfinite policy and the window's terms.

:meth:`LossStep.__call__` is the whole training step of :class:`adakd.train.AdaKDTrainer` for one micro-batch:

1. the student forward: its logits, or (fused) its final hidden states, with the loss run inside its lm_head's
   forward through the engine's wrapper (:func:`head_call`: forward redirection, so that FSDP2 / ZeRO-3 hold the
   full head weight and attach their backward hooks to the loss);
2. the teacher's part (:meth:`adakd.train.teacher.Teacher.part`): logits, hidden states and head, or a sparse
   teacher;
3. the nonfinite policy (:class:`Nonfinite`): a non-finite student output, teacher output or loss raises, or
   skips the micro-batch with a zero loss whose gradient is exactly zero;
4. the loss itself mixes and normalises (:class:`adakd.loss.Mix`): (1 − α)·ΣCE/W + α·ΣKD_kept/(W·k/n), W the
   window's valid tokens, and reports both terms (``report.ce_term``, ``report.kd_term``).

The TRL trainer shares the head path (:func:`hidden_loss`) and the mix.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import NonFiniteLossError
from ..loss import AdaKDLoss, LossReport, Mix
from ..sparse import SparseTeacher
from .engines import autocast, call_through, unwrap
from .teacher import Teacher

__all__ = ["LossStep", "Nonfinite", "StepTerms", "Window", "head_call", "hidden_loss", "student_head"]


@dataclass
class StepTerms:
    """What one micro-batch's step returns: ``loss`` (the scalar to backpropagate, scaled like the window), its CE
    and KD terms (window-normalised floats, (1 − α)·ce + α·kd = loss / scale; None where the step has no such term),
    the loss's report (None when skipped) and whether the micro-batch was skipped (a zero loss, zero gradient)."""

    loss: Tensor
    ce: float | None = None
    kd: float | None = None
    report: LossReport | None = None
    skipped: bool = False


@dataclass
class Window:
    """The accumulation window a micro-batch belongs to: ``tokens``, its valid-token count over every micro-batch
    and rank (a scalar ≥ 1), and ``scale``, the factor that undoes the engine's averaging of gradients over ranks."""

    tokens: Tensor | float
    scale: float = 1.0


# ----------------------------------------------------------------------------------------------------------------
def student_head(head: torch.nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the student's lm_head, full and differentiable, in ``dtype``: a
    head FSDP2 left sharded is all-gathered; under autocast the hidden states may be half precision, and the cast
    is the one the model's own lm_head call would do."""
    from torch.distributed.tensor import DTensor

    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def hidden_loss(
    loss_fn: AdaKDLoss,
    hidden: Tensor,
    head: torch.nn.Module,
    teacher: Tensor | SparseTeacher | None,
    teacher_head: tuple[Tensor | None, Tensor | None],
    labels: Tensor,
    *,
    chunk_size: int | None = None,
    mix: Mix | None = None,
) -> tuple[Tensor, LossReport]:
    """The AdaKD loss (mixed and normalised by ``mix``, else summed) and its report from the student's final hidden
    states ``[B, T, H_s]`` and lm_head (``AdaKDLoss.forward_hidden``), called inside the student lm_head's forward
    (:func:`head_call`).

    Args:
        teacher: the teacher's hidden states ``[B, T, H_t]``, a sparse teacher ``[B, T, k]``, or None with a mix
            at α = 0 (the CE alone).
        teacher_head: its lm_head ``(weight [V_t, H_t], bias [V_t] or None)``, gathered by the caller
            (:meth:`adakd.train.teacher.TeacherPart.head_parameters`), or ``(None, None)`` for a sparse teacher.
        labels: ``[B, T]``, -100 where there is no target.
    """
    weight, bias = student_head(head, hidden.dtype)
    t_weight, t_bias = teacher_head
    return loss_fn.forward_hidden(
        hidden,
        weight,
        teacher,
        t_weight,
        labels,
        student_bias=bias,
        teacher_bias=t_bias,
        chunk_size=chunk_size,
        mix=mix,
        return_report=True,
    )


def head_call(model: torch.nn.Module, inputs: dict[str, Tensor], fn: Any, accelerator: Any = None) -> Any:
    """``fn(hidden [B, T−1, H])`` run inside the student's lm_head forward, itself inside the model's forward
    through the engine's wrapper (:func:`adakd.train.engines.call_through`); what ``fn`` returns."""
    base = unwrap(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()

    def forward(input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        with autocast(accelerator):
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
        return call_through(head, fn, hidden)

    return call_through(model, forward, input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Nonfinite:
    """The run's policy for non-finite outputs or losses: ``error`` (stop) or ``skip`` (drop the micro-batch with
    a zero loss), the engine (a sharded one cannot skip a non-finite student output) and the count of skips."""

    policy: str = "error"
    engine: str = "single"
    shards: bool = False
    device: Any = None  # where a replicated engine's zero lives
    skipped: int = 0

    def skip(self, what: str, step: int) -> None:
        """Raise under ``error``; count and warn under ``skip`` (the caller then returns a zero loss)."""
        if self.policy == "error":
            raise NonFiniteLossError(
                f"step {step}: non-finite {what} (NaN or inf); lower the learning rate, check the data and dtypes, "
                "or set loss.nonfinite: skip"
            )
        self.skipped += 1
        warnings.warn(f"adakd: step {step}: non-finite {what}; micro-batch skipped", RuntimeWarning, stacklevel=4)

    def zero(self, model: torch.nn.Module, output: Tensor | None, step: int, weights: tuple = ()) -> Tensor:
        """A zero loss whose gradient is exactly zero for every trainable parameter, for a skipped micro-batch.

        The backward must still pass through the engine (DDP all-reduces, FSDP2 / ZeRO-3 reduce-scatters every
        parameter on every rank), so when the student's ``output`` is finite the zero flows through it (and through
        ``weights``, the lm_head parameters the fused path read). A non-finite student output would turn 0 into NaN
        there: replicated engines then use 0·Σθ over the parameters; sharded ones cannot (each rank holds other
        shards), so the run stops with an error instead of corrupting the weights.
        """
        if output is not None and bool(torch.isfinite(output).all()):
            zero = (output * 0).sum().float()
            for w in weights:
                if w is not None and w.requires_grad:
                    zero = zero + (w * 0).sum().float()
            return zero
        if self.shards:
            raise NonFiniteLossError(
                f"step {step}: the student's own outputs are non-finite (NaN or inf); under {self.engine} a "
                "micro-batch cannot be skipped then (its parameters are sharded): lower the learning rate or check "
                "the data and dtypes"
            )
        # 0·θ for every trainable weight: a zero gradient for each (DDP expects each to get one) that bypasses the
        # non-finite output; nan_to_num keeps the value 0 even if a weight itself is inf.
        zero = torch.zeros((), device=self.device)
        for p in model.parameters():
            if p.requires_grad:
                zero = zero + (p * 0).nan_to_num(0.0, 0.0, 0.0).sum().float()
        return zero


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LossStep:
    """The loss step of :class:`adakd.train.AdaKDTrainer`: ``loss_fn`` an ``AdaKDLoss(reduction="sum")``,
    ``kd_ratio`` α, ``fused`` the hidden-state path, ``chunk_size`` its rows per chunk, ``nonfinite`` the policy,
    ``accelerator`` for its autocast (None: none)."""

    loss_fn: AdaKDLoss
    kd_ratio: float
    fused: bool = False
    chunk_size: int | None = None
    nonfinite: Nonfinite = field(default_factory=Nonfinite)
    accelerator: Any = None

    def __call__(
        self, model: torch.nn.Module, inputs: dict[str, Tensor], teacher: Teacher | None, window: Window, step: int
    ) -> StepTerms:
        """The micro-batch's loss and terms.

        Args:
            model: the student, as the engine wraps it.
            inputs: ``input_ids``, ``labels`` (unshifted, -100 on prompt and padding), ``attention_mask``, each
                ``[B, T]``, and what the teacher's source reads (a cache's ``teacher_*`` keys).
            teacher: the teacher object (asked only when ``kd_ratio > 0``), or None (plain SFT).
            window: the accumulation window (:class:`Window`).
            step: the optimizer step being computed (1-based), named in errors.

        Raises:
            NonFiniteLossError: a non-finite output or loss under ``nonfinite="error"``.
        """
        labels = inputs["labels"][:, 1:]
        teacher = teacher if self.kd_ratio > 0 else None
        mix = Mix(self.kd_ratio, window.tokens)
        out = (self._fused if self.fused else self._logits)(model, inputs, teacher, labels, mix, step)
        if isinstance(out, Tensor):  # skipped: a zero loss, not scaled
            return StepTerms(out, skipped=True)
        loss, report = out
        ce = report.ce_term if self.kd_ratio < 1 else None
        kd = report.kd_term if self.kd_ratio > 0 else None
        return StepTerms(loss * window.scale, ce, kd, report)

    def _logits(self, model, inputs, teacher: Teacher | None, labels: Tensor, mix: Mix, step: int):
        """(loss, report) on materialised logits ``[B, T−1, V]``; a zero loss when the micro-batch is skipped."""
        student = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits[:, :-1]
        part = None if teacher is None else teacher.part(inputs, hidden=False)
        if not bool(torch.isfinite(student).all()):
            self.nonfinite.skip("student logits", step)
            return self.nonfinite.zero(model, None, step)
        if part is not None and not part.finite():
            self.nonfinite.skip(part.what, step)
            return self.nonfinite.zero(model, student, step)
        try:
            return self.loss_fn(student, None if part is None else part.values, labels, mix=mix, return_report=True)
        except NonFiniteLossError:
            self.nonfinite.skip("loss", step)
            return self.nonfinite.zero(model, student, step)

    def _fused(self, model, inputs, teacher: Teacher | None, labels: Tensor, mix: Mix, step: int):
        """(loss, report) from hidden states and lm_head weights, the loss inside the student lm_head's forward
        (:func:`head_call`); a zero loss when the micro-batch is skipped."""
        part = None if teacher is None else teacher.part(inputs, hidden=True)
        bad_teacher = part is not None and not part.finite()
        if bad_teacher:
            self.nonfinite.skip(part.what, step)
        head = unwrap(model).get_output_embeddings()
        # The CE alone (α = 0) keeps the trainer's own chunk of 1024 rows, not the loss's default.
        chunk_size = self.chunk_size or (1024 if part is None else None)

        def head_forward(hidden: Tensor) -> tuple[Tensor, LossReport | None]:
            # The teacher's lm_head is gathered first, on every rank, also one that skips this micro-batch: the
            # gather is a collective under FSDP2 and ZeRO-3.
            with part.head_parameters() if part is not None else contextlib.nullcontext((None, None)) as t_head:
                if not bad_teacher and not bool(torch.isfinite(hidden).all()):
                    self.nonfinite.skip("student hidden states", step)
                    return self.nonfinite.zero(model, None, step), None
                if bad_teacher:
                    return self.nonfinite.zero(model, hidden, step, (head.weight, head.bias)), None
                values = None if part is None else part.values
                try:
                    loss, report = hidden_loss(
                        self.loss_fn, hidden, head, values, t_head, labels, chunk_size=chunk_size, mix=mix
                    )
                except NonFiniteLossError:  # e.g. an overflow inside the divergence: as on logits
                    self.nonfinite.skip("loss", step)
                    return self.nonfinite.zero(model, hidden, step, (head.weight, head.bias)), None
            return loss.float(), report

        # The loss as it left the engine's forward (its backward hooks are attached to it).
        loss, report = head_call(model, inputs, head_forward, self.accelerator)
        return loss if report is None else (loss, report)
