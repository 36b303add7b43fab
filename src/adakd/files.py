"""Writing files so that a crash never leaves half of one: every writer goes through :func:`atomic_write`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "write_json", "write_jsonl", "write_text", "torch_save"]


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
