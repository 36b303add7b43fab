"""The teacher a training step distils from, as one object the step asks for its part of each micro-batch.

Two sources today, each a class with one method that matters, :meth:`Teacher.part`:

- :class:`LiveTeacher`: a frozen model, placed for the run's engine (:func:`adakd.train.models.prepare_teacher`);
  its logits ``[B, T−1, V_t]``, or for the fused loss its final hidden states ``[B, T−1, H_t]`` and its lm_head,
  whose parameters the step gathers (:meth:`TeacherPart.head_parameters`) inside the student's lm_head forward;
- :class:`CachedTeacher`: the top-k distributions an ``adakd cache`` folder holds, which
  :class:`adakd.cache.CachedTeacherCollator` adds to every batch under :data:`CachedTeacher.KEYS`.

Any other source of a sparse teacher is one more subclass of :class:`SparseSource` implementing
:meth:`SparseSource.sparse`: the step, the trainer and the checks stay as they are. A teacher served by vLLM over
HTTP is one (:class:`adakd.train.server_teacher.ServerTeacher`), which also fetches the next micro-batches' rows
while the student trains (:meth:`Teacher.submit`, :mod:`adakd.train.prefetch`). What a source
cannot do (on-policy generation without a model, the fused path's head check) is refused once, here.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..sparse import SparseTeacher
from .engines import autocast, call_through, check_linear_head, full_parameters, unwrap

__all__ = ["CachedTeacher", "LiveTeacher", "SparseSource", "Teacher", "TeacherPart", "as_teacher"]


@dataclass
class TeacherPart:
    """The teacher's part of one micro-batch, aligned with the shifted labels ``[B, T−1]``.

    Attributes:
        values: logits ``[B, T−1, V_t]``, final hidden states ``[B, T−1, H_t]`` (with ``head``), or a
            :class:`adakd.sparse.SparseTeacher` ``[B, T−1, k]``.
        head: the teacher's lm_head module when ``values`` are hidden states, else None.
        what: what the nonfinite policy calls the values ("teacher logits"), or None when they are data read as
            given (a cache), which the step does not check.
    """

    values: Tensor | SparseTeacher
    head: torch.nn.Module | None = None
    what: str | None = None

    def finite(self) -> bool:
        """Whether the values are finite (data read as given count as finite)."""
        return self.what is None or bool(torch.isfinite(self.values).all())

    @contextlib.contextmanager
    def head_parameters(self) -> Iterator[tuple[Tensor | None, Tensor | None]]:
        """``(weight [V_t, H_t], bias [V_t] or None)`` of the teacher's lm_head, full and in the hidden states'
        dtype, for the block; ``(None, None)`` without a head. Every rank must enter it, also one that skips the
        micro-batch: the gathering is a collective under FSDP2 and ZeRO-3."""
        if self.head is None:
            yield None, None
            return
        with full_parameters(self.head.weight, self.head.bias) as (weight, bias):
            dtype = self.values.dtype
            yield weight.to(dtype), None if bias is None else bias.to(dtype)


class Teacher(ABC):
    """What a training step asks of its teacher. ``model`` is the live model (on-policy generation, evaluation),
    None for a source of data."""

    model: torch.nn.Module | None = None
    #: micro-batches asked for ahead of the step (:meth:`submit`; :mod:`.prefetch`); 0: none
    prefetch: int = 0

    def prepare(self, accelerator: Any) -> None:
        """Place the teacher for the run's engine, once the trainer's accelerator exists."""
        return None  # a source without a model has nothing to place

    def check_onpolicy(self) -> None:
        """Raise ``ValueError`` when the teacher cannot serve on-policy generation."""
        return None  # a model serves it

    def check_fused(self) -> None:
        """Raise :class:`adakd.errors.ConfigError` (``key="loss.fused"``) when the fused loss would not compute this
        teacher's distributions exactly."""
        return None  # a source that hands over distributions, not a head, has nothing to check

    def submit(self, inputs: dict[str, Tensor]) -> None:
        """Start computing the part of a micro-batch that a later step will ask for (``inputs`` as :meth:`part`
        gets them); a source with ``prefetch > 0`` overlaps it with the training of the batches before."""
        return None  # a model computes its part when asked

    def close(self) -> None:
        """Release what the teacher holds for the run (threads, connections); called when training ends or fails."""
        return None

    def log_metrics(self) -> dict[str, float]:
        """The teacher's own counters for the training logs (``teacher_server/...``); none by default."""
        return {}

    @abstractmethod
    def part(self, inputs: dict[str, Tensor], hidden: bool) -> TeacherPart:
        """The teacher's part of the micro-batch ``inputs`` (``input_ids``, ``attention_mask`` ``[B, T]``, and
        whatever the source's collator adds), without gradient; ``hidden``: for the fused loss."""


class LiveTeacher(Teacher):
    """A frozen teacher model, run on every micro-batch.

    Args:
        model: the teacher (a causal LM), not yet placed: :meth:`prepare` places it for the engine.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._accelerator: Any = None

    def prepare(self, accelerator: Any) -> None:
        from .models import prepare_teacher

        self.model = prepare_teacher(self.model, accelerator)
        self._accelerator = accelerator

    def check_fused(self) -> None:
        check_linear_head(self.model, "teacher")

    def part(self, inputs: dict[str, Tensor], hidden: bool) -> TeacherPart:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        if not hidden:
            with torch.no_grad():
                return TeacherPart(self.model(input_ids=ids, attention_mask=mask).logits[:, :-1], what="teacher logits")
        decoder = unwrap(self.model).get_decoder()

        def forward(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            with autocast(self._accelerator):
                return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]

        with torch.no_grad():  # through the engine's wrapper, which gathers the sharded teacher's blocks
            states = call_through(self.model, forward, input_ids=ids, attention_mask=mask)
        return TeacherPart(states, unwrap(self.model).get_output_embeddings(), "teacher hidden states")


class SparseSource(Teacher):
    """A teacher given as data: top-k distributions for the supervised positions of a batch, no model. It cannot
    sample (on-policy modes need a live teacher); the loss takes it on either path (no head to check)."""

    #: the setting that chose this source, named in its errors
    name = "teacher"

    def check_onpolicy(self) -> None:
        raise ValueError(f"{self.name} replaces the teacher model, and cannot serve on-policy generation")

    def part(self, inputs: dict[str, Tensor], hidden: bool) -> TeacherPart:
        return TeacherPart(self.sparse(inputs))

    @abstractmethod
    def sparse(self, inputs: dict[str, Tensor]) -> SparseTeacher:
        """The batch's sparse teacher ``[B, T−1, k]``, aligned with the shifted labels."""


class CachedTeacher(SparseSource):
    """The teacher read from an ``adakd cache`` folder: every batch carries it under :data:`KEYS`
    (``teacher_ids``, ``teacher_logprobs`` ``[B, T−1, k]``, ``teacher_tail`` ``[B, T−1]``), added by
    :class:`adakd.cache.CachedTeacherCollator`."""

    name = "teacher_cache"
    KEYS = ("teacher_ids", "teacher_logprobs", "teacher_tail")

    def sparse(self, inputs: dict[str, Tensor]) -> SparseTeacher:
        missing = [key for key in self.KEYS if key not in inputs]
        if missing:
            raise ValueError(f"teacher_cache: the batch has no {missing[0]!r} (use adakd.cache.CachedTeacherCollator)")
        return SparseTeacher(*(inputs[key] for key in self.KEYS))


def as_teacher(teacher: torch.nn.Module | Teacher | None, cache: bool = False) -> Teacher | None:
    """The trainer's teacher object from what it was given: a :class:`Teacher` as is, a model as a
    :class:`LiveTeacher`, ``cache=True`` (the ``teacher_cache`` alias) as a :class:`CachedTeacher`, else None."""
    if cache:
        if teacher is not None:
            raise ValueError("teacher_cache replaces the teacher model, and cannot serve on-policy generation")
        return CachedTeacher()
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    return LiveTeacher(teacher)
