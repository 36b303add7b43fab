"""Markdown tables: one writer for every table adakd prints or writes (eval, compare, reports, the demo, the study)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["cell", "table"]


def cell(value: Any) -> str:
    """One cell's text: ``|`` escaped (a label or folder name holding one would split the cell)."""
    return str(value).replace("|", "\\|")


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table: ``| a | b |`` lines under a separator of ``---`` (or the given ``align`` markers,
    e.g. ``:---`` / ``---:``), every cell escaped by :func:`cell`."""
    separator = list(align) if align is not None else ["---"] * len(header)
    if len(separator) != len(header):
        raise ValueError(f"align has {len(separator)} markers for {len(header)} columns")
    lines = ["| " + " | ".join(cell(c) for c in header) + " |", "|" + "|".join(separator) + "|"]
    if align is not None:
        lines[1] = "| " + " | ".join(separator) + " |"
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
