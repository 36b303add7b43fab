"""What the judge compares: ``adakd eval`` prediction files read and paired, A's answer against B's or the
reference."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import InputError
from ...files import iter_jsonl
from .prompts import one_line

__all__ = ["Pair", "load_predictions", "make_pairs"]


@dataclass(frozen=True)
class Pair:
    """One comparison: ``answer_a`` (the model under test) against ``answer_b`` for ``prompt``; ``reference`` is
    shown to the judge as the expert's answer, ``id`` is carried into the report."""

    prompt: str
    answer_a: str
    answer_b: str
    reference: str
    id: Any = None


def load_predictions(
    path: str | os.PathLike[str], flag: str = "--predictions", limit: int | None = None
) -> list[dict[str, Any]]:
    """The first ``limit`` (default all) records of an ``adakd eval`` predictions file: JSONL objects with a
    string ``prompt``, a string ``prediction`` and ``references``, a non-empty list of strings.

    Raises :class:`~adakd.errors.InputError` naming ``flag``, the file and the line (``--flag path:line: reason``)
    for a missing file, a bad line or a bad field, and for a file without records.
    """
    records = []
    for where, record in iter_jsonl(path, flag, limit):
        for field in ("prompt", "prediction"):
            if not isinstance(record.get(field), str):
                raise InputError(f"{where}: '{field}' must be a string")
        refs = record.get("references")
        if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
            raise InputError(f"{where}: 'references' must be a non-empty list of strings")
        records.append(record)
    if not records:
        raise InputError(f"{flag} {path}: no records")
    return records


def make_pairs(
    records_a: Sequence[dict[str, Any]], against: Sequence[dict[str, Any]] | None, *, against_name: str = "--against"
) -> list[Pair]:
    """Pairs of A's predictions with the reference answers (``against=None``) or with B's predictions.

    B's records are matched to A's by ``prompt``, in A's order; a prompt repeated in A takes B's occurrences in turn.
    The reference shown to the judge is always A's first reference. A prompt of A that B lacks is an
    :class:`~adakd.errors.InputError` naming ``against_name``.
    """
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    if against is not None:
        for record in against:
            by_prompt.setdefault(record["prompt"], []).append(record)
    pairs = []
    for i, record in enumerate(records_a):
        if against is None:
            other = record["references"][0]
        else:
            matches = by_prompt.get(record["prompt"])
            if not matches:
                raise InputError(f"{against_name}: no prediction for the prompt {one_line(record['prompt'], 80)!r}")
            other = matches.pop(0)["prediction"]
        rid = record.get("id", record.get("index", i))
        pairs.append(Pair(record["prompt"], record["prediction"], other, record["references"][0], rid))
    return pairs
