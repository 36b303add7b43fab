"""The ``--output`` folder of ``adakd cache``: the lock that lets one run at a time write it (:class:`OutputLock`),
what a run finds there at start (:class:`CacheFolder`: plan, manifest, shards to compute again), and file-system
errors turned into one line naming the path (:func:`file_errors`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .format import (
    LOCK,
    MANIFEST,
    PLAN,
    first_difference,
    is_cache_file,
    manifest_problem,
    read_shard_header,
    sha256_file,
    shard_index,
    shard_problem,
    show,
)

__all__ = ["ADVICE", "CacheFolder", "OutputLock", "file_errors", "note", "read_json"]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# What to do about a file-system error, by errno (the message says what happened: os.strerror).
ADVICE = {
    errno.ENOSPC: "free some space and run the same command again (the shards written so far are kept)",
    errno.EDQUOT: "free some space and run the same command again (the shards written so far are kept)",
    errno.EROFS: "give --output a folder on a writable file system",
    errno.EACCES: "give --output a folder this user can write",
    errno.EPERM: "give --output a folder this user can write",
}


@contextlib.contextmanager
def file_errors(output: str, path: Path, verb: str = "write") -> Iterator[None]:
    """Turn an ``OSError`` met while ``verb``-ing ``path`` into one :class:`InputError` line naming the path (the file
    written, not its temporary name) and the reason (``no space left on device``, ``read-only file system``, ...)."""
    from ..errors import InputError

    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        reason = reason[:1].lower() + reason[1:]  # "No space left on device" → "no space left on device"
        advice = ADVICE.get(e.errno or 0)
        raise InputError(
            f"--output {output}: cannot {verb} {path}: {reason}{'; ' + advice if advice else ''}"
        ) from None


def note(message: str) -> None:
    """One line on stderr (rank 0's notes: what a run found and does about it)."""
    print(f"[adakd] {message}", file=sys.stderr, flush=True)


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``DIR/build.lock``, held by one ``adakd cache`` run (rank 0 under
    ``torchrun``) from before it reads the folder until it returns; the file holds the holder's process id and host.

    A second run is refused in one line naming the holder. The file is deleted when the lock is released (the lock
    is taken again when the file found is no longer the one in place), and a folder this run created is removed
    again when it is still empty (a refused run leaves nothing behind). Without ``fcntl`` (Windows) or on a file
    system without ``flock``, the run goes on unlocked and says so.
    """

    def __init__(self, output: str) -> None:
        self.output, self.path = output, Path(output) / LOCK
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> None:
        from ..errors import InputError

        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--output {self.output}: exists and is not a folder")
        try:
            import fcntl
        except ImportError:  # Windows
            note(f"cache: {self.output}: cannot lock the folder here (no fcntl): run one adakd cache on it at a time")
            return
        for _ in range(20):  # a holder that deletes the file as we open it: take the new one
            with file_errors(self.output, folder):
                if not folder.is_dir():
                    folder.mkdir(parents=True, exist_ok=True)
                    self.created = True
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the folder was removed meanwhile
            except OSError as e:
                with file_errors(self.output, self.path):
                    raise e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    reason = e.strerror or e
                    note(
                        f"cache: {self.output}: cannot lock {self.path} ({reason}): run one adakd cache on it at a time"
                    )
                    return
                holder = _holder(fd)
                os.close(fd)
                raise InputError(
                    f"--output {self.output}: another adakd cache run ({holder}) is writing to this folder (it holds "
                    f"{self.path}): wait for it to end, or use another folder"
                ) from None
            if not _same_file(fd, self.path):
                os.close(fd)
                continue
            self.fd = fd
            try:
                with file_errors(self.output, self.path):
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            except BaseException:
                self.release()
                raise
            return
        raise InputError(f"--output {self.output}: cannot take the lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        """Delete the file and unlock; remove the folder when this run created it and it is empty."""
        if self.fd is not None:
            if _same_file(self.fd, self.path):
                with contextlib.suppress(OSError):
                    self.path.unlink()
            os.close(self.fd)
            self.fd = None
        if self.created:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only when empty


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(fd: int) -> str:
    """``pid N on HOST`` from a lock file's content (``pid unknown`` while its holder has not written it yet)."""
    try:
        words = os.pread(fd, 512, 0).decode("utf-8", "replace").split()
    except OSError:
        words = []
    if not words or not words[0].isdigit():
        return "pid unknown"
    return f"pid {words[0]}" + (f" on {words[1]}" if len(words) > 1 else "")


class CacheFolder:
    """The ``--output`` folder as found at start: its plan and manifest (None when absent, unreadable or, for the
    manifest, inconsistent), and after :meth:`verify` the shards to compute again (``redo``: name → why)."""

    def __init__(self, output: str, overwrite: bool) -> None:
        from ..errors import InputError

        self.output, self.path = output, Path(output)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--output {output}: exists and is not a folder")
        self.plan = self.manifest = None
        self.manifest_note: str | None = None
        self.redo: dict[str, str] = {}
        self._bytes_ok: dict[str, bool] = {}  # shard name → whether its bytes checked out (read once)
        if overwrite or not self.path.is_dir():
            return
        with file_errors(output, self.path, "read"):
            names = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
        self.plan, manifest = read_json(self.path / PLAN), read_json(self.path / MANIFEST)
        others = [name for name in names if not is_cache_file(name)]
        if self.plan is None and names:
            shown = ", ".join(others[:3]) or "cache files without plan.json"
            raise InputError(f"--output {output}: not empty and holds no adakd cache ({shown}); use another folder")
        if manifest is not None:
            problem = manifest_problem(manifest)
            if problem is None:
                self.manifest = manifest
            else:
                self.manifest_note = f"{MANIFEST}: {problem[0]}: {problem[1]}"

    def check(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Refuse a folder that holds a cache made another way, naming the first field that differs; returns
        ``plan``, its ``top_k`` made effective (min(k, V_t)) from the old plan when the teacher is not loaded yet."""
        if self.plan is None:
            return plan
        from ..errors import InputError

        old = self.plan
        if "vocab_size" not in plan and isinstance(old.get("vocab_size"), int):
            plan = {**plan, "top_k": min(plan["top_k"], old["vocab_size"])}
        diff = first_difference(old, plan)
        if diff is not None:
            key, was, now = diff
            raise InputError(
                f"--output {self.output}: holds a cache made with {key} {show(was)}, not {show(now)}; use another "
                "folder or --overwrite"
            )
        return plan

    def verify(self, plan: dict[str, Any], shards: list[tuple[int, int, int]]) -> None:
        """Check every shard file the folder holds against ``plan``: its header (a whole safetensors file, written
        for this plan at this place, with the tensors the plan says) and its bytes (the manifest's sha256 when the
        manifest lists it, else the sha256 of the tensors its header records). A damaged shard, or one written
        without that header, is put in ``redo``; a shard of another cache is refused (it is not this run's to
        delete)."""
        from ..errors import InputError

        self.redo = {}
        if self.plan is None:  # a new folder, or --overwrite
            return
        matches = self.manifest is not None and first_difference(self.manifest, plan) is None
        listed = {entry["file"]: entry for entry in self.manifest["shards"]} if matches else {}
        with file_errors(self.output, self.path, "read"):
            files = sorted(p for p in self.path.iterdir() if shard_index(p.name) is not None and p.is_file())
        for path in files:
            s = shard_index(path.name)
            if s >= len(shards):
                raise InputError(
                    f"--output {self.output}: {path.name} is not a shard of this cache, which has {len(shards)} shards "
                    "(a file of another cache?): delete it, or use --overwrite"
                )
            with file_errors(self.output, path, "read"):
                problem = self._shard_problem(path, s, plan, shards[s], listed.get(path.name))
            if problem is not None:
                self.redo[path.name] = problem

    def _shard_problem(self, path: Path, s: int, plan: dict, place: tuple, entry: dict | None) -> str | None:
        from ..errors import InputError

        try:
            header = read_shard_header(path)
        except ValueError as e:
            return str(e)
        meta = header.meta
        if meta is None:  # an older adakd's shard: kept only when this plan's manifest vouches for its bytes
            if entry is not None and self._bytes(path, lambda: self._listed(path, header, entry)):
                return None
            return "written without the header that says which cache it belongs to (an older adakd?)"
        theirs = meta.get("plan") if isinstance(meta.get("plan"), dict) else {}
        diff = first_difference(theirs, plan)
        if diff is not None:
            key, was, now = diff
            raise InputError(
                f"--output {self.output}: {path.name} was computed for a cache made with {key} {show(was)}, not "
                f"{show(now)} (a shard of another cache): delete it, or use --overwrite"
            )
        first, count, positions = place
        where = {"index": s, "first_example": first, "examples": count, "positions": positions}
        if meta.get("shard") != where:
            index = meta["shard"].get("index") if isinstance(meta.get("shard"), dict) else None
            raise InputError(
                f"--output {self.output}: {path.name} holds shard {show(index)} of this cache, not shard {s} (a "
                "renamed file?): delete it, or use --overwrite"
            )
        ref = {**theirs, **plan}
        wrong = shard_problem(
            header,
            top_k=ref.get("top_k"),
            id_dtype=ref.get("id_dtype"),
            logprob_dtype=ref.get("logprob_dtype"),
            examples=count,
            positions=positions,
        )
        if wrong is not None:
            field, want, found = wrong
            return f"its tensors do not match its header ({field}: {show(want)} expected, {show(found)} found)"
        if entry is not None:
            if not self._bytes(path, lambda: self._listed(path, header, entry)):
                return "its size or sha256 is not the manifest's (corrupt)"
        elif not self._bytes(path, lambda: header.tensors_sha256() == meta.get("tensors_sha256")):
            return "its tensors' sha256 is not the one its header records (corrupt)"
        return None

    @staticmethod
    def _listed(path: Path, header: Any, entry: dict[str, Any]) -> bool:
        """Whether a shard's size and sha256 are the ones its manifest ``entry`` lists."""
        return (header.size, sha256_file(path)[1]) == (entry["bytes"], entry["sha256"])

    def _bytes(self, path: Path, check: Any) -> bool:
        """``check()`` of a shard's bytes, run once per shard (the folder does not change while the lock is held)."""
        if path.name not in self._bytes_ok:
            self._bytes_ok[path.name] = bool(check())
        return self._bytes_ok[path.name]

    def complete(self, plan: dict[str, Any], count: int) -> bool:
        """Whether the manifest is there, matches ``plan``, lists ``count`` shards, and every one is there and
        passed :meth:`verify`."""
        m = self.manifest
        diff = None if m is None else first_difference(m, plan)
        if diff is not None:
            self.manifest_note = f"{MANIFEST}: {diff[0]}: {show(diff[1])} where {PLAN} has {show(diff[2])}"
        if m is None or diff is not None or len(m["shards"]) != count:
            return False
        return not self.redo and all((self.path / entry["file"]).is_file() for entry in m["shards"])
