"""The judge's reply cache: one JSON line per reply, appended as replies arrive, so that an interrupted or repeated
run never pays twice for the same judgement."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import IO

from ...errors import InputError

__all__ = ["JudgeCache"]


class JudgeCache:
    """Judge replies on disk, one ``{"key": ..., "reply": ...}`` JSON line per reply, keyed by
    :meth:`ChatClient.cache_key <adakd.eval.judge.ChatClient.cache_key>`.

    Appending a line per reply (under a lock, flushed at once) means an interrupted run keeps everything it paid for;
    a line cut short by a crash is skipped when the file is read back. That tolerance is why this file has its own
    reader instead of :func:`adakd.files.iter_jsonl`, which rejects a bad line.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        self._needs_newline = False
        self._file: IO[str] | None = None
        if self.path.exists():
            if self.path.is_dir():
                raise InputError(f"--cache {self.path}: is a directory, expected a .jsonl file")
            data = self.path.read_text(encoding="utf-8", errors="replace")
            for line in data.splitlines():
                try:
                    record = json.loads(line)
                    key, reply = record["key"], record["reply"]
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(key, str) and isinstance(reply, str):
                    self._entries[key] = reply
            self._needs_newline = bool(data) and not data.endswith("\n")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> str | None:
        """The cached reply for ``key``, or None."""
        return self._entries.get(key)

    def put(self, key: str, reply: str) -> None:
        """Store ``reply`` under ``key``, in memory and at once on disk (thread-safe)."""
        line = json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
                if self._needs_newline:
                    # The previous run died mid-line: start ours on a fresh one instead of gluing onto the fragment.
                    self._file.write("\n")
                    self._needs_newline = False
            self._file.write(line)
            self._file.flush()
            self._entries[key] = reply

    def close(self) -> None:
        """Close the file (the entries stay readable in memory)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
