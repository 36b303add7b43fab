"""Files in and out: every writer goes through :func:`atomic_write`, so that a crash never leaves half a file, and
every JSONL reader through :func:`iter_jsonl`, so that a bad line is reported one way everywhere
(``[flag ]path:line: reason``, as an :class:`~adakd.errors.InputError`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["atomic_write", "input_file", "iter_jsonl", "read_jsonl", "write_json", "write_jsonl", "write_text",
           "torch_save"]  # fmt: skip


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path`` in one step: a reader
    (or a resumed run) sees the old file or the new one, never a partial one. The folder is created; the temporary
    name carries the process id, so that processes writing side by side never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` as UTF-8, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, payload: Any, indent: int = 2) -> Path:
    """``payload`` as indented JSON (non-ASCII kept as is), atomically."""
    return write_text(path, json.dumps(payload, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line, atomically."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)``, atomically (checkpoint state files)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def input_file(path: str | os.PathLike, label: str | None = None) -> Path:
    """``path`` as a :class:`Path` if it is a readable file; otherwise an :class:`InputError` that names it (and the
    flag or key ``label`` it came from)."""
    path = Path(path)
    where = f"{label} {path}" if label else str(path)
    if not path.exists():
        raise InputError(f"{where}: no such file")
    if not path.is_file():
        raise InputError(f"{where}: not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{where}: permission denied")
    return path


def iter_jsonl(
    path: str | os.PathLike, label: str | None = None, limit: int | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, object)`` for each non-blank line of a JSONL file, at most ``limit`` of them; ``where`` is
    ``"[label ]path:line"``, for the caller's own messages about a record.

    Raises :class:`InputError` naming the file and line for a missing file, bytes that are not UTF-8, invalid JSON
    or a line that is not a JSON object.
    """
    path = input_file(path, label)
    prefix = f"{label} {path}" if label else str(path)
    count = 0
    # Bytes, decoded line by line: a bad UTF-8 sequence is then reported with its line, not as a bare
    # UnicodeDecodeError. Only "\n" ends a line (JSON escapes every control character inside strings).
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and count >= limit:
                return
            where = f"{prefix}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{where}: not UTF-8 (byte {err.start + 1}: {err.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise InputError(f"{where}: invalid JSON (nested too deeply)") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
            count += 1
            yield where, row


def read_jsonl(path: str | os.PathLike, label: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """The objects of a JSONL file, in order (see :func:`iter_jsonl`); an empty file is an :class:`InputError`."""
    rows = [row for _, row in iter_jsonl(path, label, limit)]
    if not rows and limit != 0:
        raise InputError(f"{label + ' ' if label else ''}{path}: no records")
    return rows
