"""Reading a training run's ``metrics.jsonl``: the rows that the plots and the run report are drawn from.

``adakd train`` appends one JSON object per logging step to ``RUN_DIR/metrics.jsonl``: ``step`` and ``loss``, and
when distilling ``kd_loss``, ``ce_loss`` (kd_ratio < 1) and ``adakd/ratio``, ``adakd/kept_tokens``,
``adakd/valid_tokens``, ``adakd/tau_mean``, ``adakd/tau_min``, ``adakd/tau_max``. The run's last line holds
``train_runtime``, ``train_loss``, ... and no ``loss``. Unknown keys are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import iter_jsonl

__all__ = ["METRICS_FILE", "is_number", "read_metrics", "read_rows", "series", "training_rows"]

METRICS_FILE = "metrics.jsonl"


def is_number(value: Any) -> bool:
    """An int or a float, but not a bool: ``"loss": true`` is a broken line, not 1.0."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _metrics_path(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/metrics.jsonl``, or ``run_dir`` itself when it is a file: the metrics file is as good as its run."""
    path = Path(run_dir)
    return path if path.is_file() else path / METRICS_FILE


def read_rows(run_dir: str | os.PathLike) -> list[dict]:
    """Every JSON object of ``RUN_DIR/metrics.jsonl`` in file order (training rows and the run-end row).

    ``run_dir`` may also be the metrics file itself. Blank lines are skipped.

    Raises:
        InputError: the file is missing or empty (the message names it), or a line is not a JSON object with a
            numeric ``step`` (and a numeric ``loss`` where it has one); the message names ``path:line``.
    """
    path = _metrics_path(run_dir)
    if not path.exists():
        # The usual slip is a folder that is not a run: say what was expected there.
        raise InputError(f"{path}: no such file (is {path.parent} a run directory written by `adakd train`?)")
    rows = []
    for where, row in iter_jsonl(path):
        if not is_number(row.get("step")):
            raise InputError(f"{where}: missing or non-numeric 'step'")
        if "loss" in row and not is_number(row["loss"]):
            raise InputError(f"{where}: 'loss' must be a number, got {row['loss']!r}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: empty file (no metrics logged)")
    return rows


def training_rows(rows: Sequence[Mapping]) -> list[dict]:
    """The rows with a ``loss``, sorted by step; where a step appears twice, the later line wins.

    A resumed run re-logs the steps after its checkpoint, and a run restarted into the same ``output_dir``
    appends to the old file: in both cases the later line is the one that belongs to the run as it now stands.
    """
    by_step: dict[float, dict] = {}
    for row in rows:
        if "loss" in row:
            by_step[row["step"]] = dict(row)
    return [by_step[step] for step in sorted(by_step)]


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The training log of a run: the rows of ``RUN_DIR/metrics.jsonl`` that have a ``loss``, sorted by step.

    ``run_dir`` may also be the metrics file itself. See :func:`training_rows` for repeated steps.

    Raises:
        InputError: the file is missing or empty, or holds no training row (the message names it); a corrupt line
            (the message names ``path:line``).
    """
    rows = training_rows(read_rows(run_dir))
    if not rows:
        raise InputError(f"{_metrics_path(run_dir)}: no training rows (lines with 'loss') were logged")
    return rows


def series(rows: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the rows that have a numeric ``key``, in row order."""
    pairs = [(float(r["step"]), float(r[key])) for r in rows if is_number(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]
