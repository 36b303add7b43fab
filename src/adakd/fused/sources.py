"""Where a chunk's logits come from, and the one chunk loop of the fused machinery.

A *source* gives the logits of some rows: a linear head on hidden states (``hidden [N, H] @ Wᵀ (+ b)``, with an
optional 1/τ fold onto the hidden states), materialised logits ``[N, V]``, or a sparse teacher's rows
(:class:`adakd.sparse.SparseTeacher`). The dense/sparse distinction lives here and nowhere else in the package.

:func:`chunks` is the one loop over row chunks; every pass of every plan runs it.

This module imports only torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..sparse import SparseTeacher

__all__ = [
    "Chunk",
    "DenseLogits",
    "LinearHead",
    "SparseRows",
    "chunks",
    "default_chunk_size",
    "linear",
    "teacher_source",
]


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


@dataclass(frozen=True)
class LinearHead:
    """Logits ``hidden [N, H] @ weight [V, H]ᵀ (+ bias [V])``, computed for a chunk of rows at a time."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @property
    def foldable(self) -> bool:
        """Whether 1/τ_i may scale the hidden states before the product instead of the logits after it: no bias
        (z/τ = (h/τ) @ Wᵀ then holds exactly up to rounding) and float32/float64 hidden states (scaling bf16 hidden
        states would add a rounding the logits path does not have)."""
        return self.bias is None and self.hidden.dtype in (torch.float32, torch.float64)

    @property
    def dtype_ref(self) -> Tensor:
        """The tensor whose dtype sets the computation dtype."""
        return self.hidden

    def hidden_and_logits(self, rows: Tensor, inv: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(hidden [c, H], logits [c, V])`` of ``rows``; with ``inv [c, 1]`` the hidden states are scaled by it
        first (the fold: the logits are then z/τ)."""
        h = self.hidden.index_select(0, rows)
        if inv is not None:
            h = h * inv.to(self.hidden.dtype)
        return h, linear(h, self.weight, self.bias)

    def rows(self, rows: Tensor, inv: Tensor | None = None) -> Tensor:
        """``[c, V]`` logits of ``rows`` (scaled by ``inv`` as :meth:`hidden_and_logits`)."""
        return self.hidden_and_logits(rows, inv)[1]

    def take(self, logits: Tensor, keep: Tensor) -> Tensor:
        """The ``keep`` rows of a chunk's logits."""
        return logits.index_select(0, keep)


@dataclass(frozen=True)
class DenseLogits:
    """Materialised logits ``[N, V]``."""

    logits: Tensor
    foldable = False

    @property
    def dtype_ref(self) -> Tensor:
        return self.logits

    @property
    def whole(self) -> Tensor:
        """Every row's logits ``[N, V]``."""
        return self.logits

    def hidden_and_logits(self, rows: Tensor, inv: Tensor | None = None) -> tuple[None, Tensor]:
        """``(None, logits [c, V])``: no hidden states behind these logits."""
        return None, self.rows(rows)

    def rows(self, rows: Tensor, inv: Tensor | None = None) -> Tensor:
        return self.logits.index_select(0, rows)

    def take(self, logits: Tensor, keep: Tensor) -> Tensor:
        return logits.index_select(0, keep)


@dataclass(frozen=True)
class SparseRows:
    """A sparse teacher over N rows: each chunk's logits are its rows, a :class:`SparseTeacher` ``[c]``."""

    teacher: SparseTeacher
    foldable = False

    @property
    def dtype_ref(self) -> Tensor:
        return self.teacher.logprobs

    @property
    def whole(self) -> SparseTeacher:
        """Every row, ``[N]``."""
        return self.teacher

    def rows(self, rows: Tensor, inv: Tensor | None = None) -> SparseTeacher:
        return self.teacher.index_select(rows)

    def take(self, logits: SparseTeacher, keep: Tensor) -> SparseTeacher:
        return logits.index_select(keep)


TeacherSource = LinearHead | DenseLogits | SparseRows


def teacher_source(
    teacher: Tensor | SparseTeacher, weight: Tensor | None = None, bias: Tensor | None = None
) -> TeacherSource:
    """The flat, detached teacher of a loss call: hidden states ``[..., H]`` with ``weight``/``bias`` (a
    :class:`LinearHead`), materialised logits ``[..., V]`` (``weight`` None: :class:`DenseLogits`), or a
    :class:`SparseTeacher` ``[...]`` (:class:`SparseRows`)."""
    if isinstance(teacher, SparseTeacher):
        return SparseRows(SparseTeacher(*(t.detach() for t in teacher)).reshape(-1))
    flat = teacher.detach().reshape(-1, teacher.shape[-1])
    if weight is None:
        return DenseLogits(flat)
    return LinearHead(flat, weight.detach(), None if bias is None else bias.detach())


@dataclass(frozen=True)
class Chunk:
    """One chunk of rows: ``rows [c]`` (positions in the flat inputs) at ``start`` of the row list, the student's
    hidden states ``[c, H]`` (scaled by ``inv`` under the fold) and logits ``[c, V]``, the teacher's logits (or
    sparse rows), and ``inv [c, 1]`` (1/τ under the fold, else None)."""

    start: int
    rows: Tensor
    hidden: Tensor | None
    student: Tensor | None
    teacher: Tensor | SparseTeacher | None
    inv: Tensor | None = None

    @property
    def stop(self) -> int:
        return self.start + self.rows.numel()

    def part(self, values: Tensor | float) -> Tensor | float:
        """This chunk's slice of a per-row vector aligned with the row list (a float passes through)."""
        return values[self.start : self.stop] if isinstance(values, Tensor) else values


def chunks(
    rows: Tensor,
    chunk_size: int,
    student: LinearHead | DenseLogits | None = None,
    teacher: TeacherSource | None = None,
    fold: Tensor | None = None,
) -> Iterator[Chunk]:
    """The chunks of ``rows`` with their logits: the one chunk loop every pass of the fused machinery runs.

    Args:
        rows: ``[n]`` row indices into the sources.
        chunk_size: rows per chunk.
        student: a :class:`LinearHead` (its hidden states come along, for the gradients) or :class:`DenseLogits`.
        teacher: any source, or None.
        fold: ``[n]`` τ per row: scale the hidden states by 1/τ before the products (both sources must be
            foldable), so that the logits come out divided by τ without a ``[c, V]`` division.
    """
    for start in range(0, rows.numel(), chunk_size):
        r = rows[start : start + chunk_size]
        inv = None if fold is None else (1.0 / fold[start : start + chunk_size]).unsqueeze(1)
        h, z_s = (None, None) if student is None else student.hidden_and_logits(r, inv)
        z_t = None if teacher is None else teacher.rows(r, inv)
        yield Chunk(start, r, h, z_s, z_t, inv)
