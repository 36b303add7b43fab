"""Files in and out: every writer goes through :func:`atomic_write`, so that a crash never leaves half a file, and
every JSONL reader through :func:`iter_jsonl`, so that a bad line is reported one way everywhere
(``[flag ]path:line: reason``, as an :class:`~adakd.errors.InputError`)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["atomic_write", "fsync_tree", "input_file", "iter_jsonl", "publish_folder", "read_jsonl", "storage_reason",
           "write_json", "write_jsonl", "write_text", "torch_save"]  # fmt: skip

_STORAGE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system"}  # fmt: skip


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


def storage_reason(error: BaseException, path: str | os.PathLike) -> str | None:
    """Why a write under ``path`` failed, when the file system refused it ("no space left on device", "disk quota
    exceeded", "read-only file system"), else None (a bug, or another error to show as it is).

    The writers do not all say so plainly: Python raises an ``OSError`` with the errno, safetensors a
    ``SafetensorError`` naming "os error 28", and ``torch.save`` an internal assertion ("unexpected pos"), which is
    read as a full disk only when the file system of ``path`` has (almost) no space left.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _STORAGE:
            return _STORAGE[seen.errno]
        text = str(seen).lower()
        for code, reason in _STORAGE.items():
            if reason in text or f"os error {code})" in text:
                return reason
        seen = seen.__cause__ or seen.__context__
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return _STORAGE[errno.ENOSPC] if isinstance(error, RuntimeError) and free < 1 << 20 else None


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder`` and the folders themselves, so that a rename that publishes ``folder``
    never exposes files whose data is not yet on disk (a power cut after the rename)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_folder(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the complete folder ``staged`` to ``target`` (on the same file system), replacing an earlier
    ``target``: readers see the old folder or the new one, never a mix. The old one is moved aside first and deleted
    only once the new one is in place."""
    staged, target = Path(staged), Path(target)
    fsync_tree(staged)
    old = staged.with_name(f"{staged.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)
    return target


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
