"""``adakd cache``: run the teacher once over the training data and store its top-k at every supervised position.

The examples are built exactly as ``adakd train`` builds them (same tokenizer, template, masking and length policy),
so that a training run reading the cache (``teacher.cache``) finds one row per supervised position.

Resumable: ``plan.json`` (what the cache is made of) is written before any shard, and shards are written atomically;
the same command run again keeps the shards already there whose header names this plan and whose bytes check out,
computes the damaged ones again, and refuses a shard of another cache; another command is refused. One run at a time:
the run holds an exclusive ``flock`` on ``DIR/build.lock`` from start to end. Several processes (``torchrun``):
shard s is computed by rank s % world, rank 0 (the one holding the lock) writes ``manifest.json`` once all are there.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..files import write_json
from ..shapes import check_vocab_sizes
from .format import (
    FORMAT,
    LOCK,
    MANIFEST,
    PLAN,
    data_info,
    digest_examples,
    first_difference,
    id_dtype,
    is_cache_file,
    manifest_problem,
    read_shard_header,
    sha256_file,
    shard_index,
    shard_name,
    shard_problem,
    show,
    template_info,
    tokenizer_info,
)
from .writer import compute_shard, linear_head, student_vocab_rows, vocab_rows, write_shard

__all__ = ["LOGPROB_DTYPES", "build_cache", "check_cache_config"]

LOGPROB_DTYPES = ("float16", "float32")
# A process that finished its shards waits at the final barrier for the others' (a shard of a large teacher can
# take longer than the process group's default 30 minutes).
_FINAL_WAIT = datetime.timedelta(days=7)


def check_cache_config(config: Any) -> None:
    """Refuse a config whose run ``adakd cache`` cannot serve; raises :class:`ConfigError` naming the key."""
    if config.teacher is None:
        raise config.error("teacher", "adakd cache runs the teacher, and the config has none")
    cached = getattr(config.teacher, "cache", None)
    if cached:
        raise config.error(
            "teacher.cache", f"is set ({cached}): adakd cache computes a cache from the live teacher; drop the key"
        )
    if config.loss.kd_ratio == 0:
        raise config.error("loss.kd_ratio", "is 0: the run trains without the teacher, so there is nothing to cache")
    if config.onpolicy.mode != "off":
        raise config.error(
            "onpolicy.mode",
            f"{config.onpolicy.mode} distils on text generated during training, which needs the live teacher: a cache "
            "holds the teacher on the training data only",
        )
    if config.data.streaming:
        raise config.error(
            "data.streaming", "a cache is indexed by example, and a stream has no index: set data.streaming: false"
        )


def _check_options(top_k: int, dtype: str, batch_size: int, shard_examples: int) -> None:
    from ..errors import InputError

    for flag, value in (("--top-k", top_k), ("--batch-size", batch_size), ("--shard-examples", shard_examples)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{flag}: must be a positive integer, got {value}")
    if dtype not in LOGPROB_DTYPES:
        raise InputError(f"--dtype: {dtype!r} is not one of {', '.join(LOGPROB_DTYPES)}")


def _plan(config: Any, tokenizer: Any, digest: Any, conversations: bool, **fields: Any) -> dict[str, Any]:
    """What the cache is made of, in the order a difference is reported (the manifest less ``created`` and
    ``shards``). ``fields``: ``top_k``, ``logprob_dtype``, ``shard_examples``, and once the teacher is loaded
    ``vocab_size`` and ``id_dtype``."""
    t, d = config.teacher, config.data
    teacher = {
        "name_or_path": t.name_or_path,
        "revision": t.model_kwargs.get("revision"),
        "dtype": t.dtype,
        "adapter": t.adapter,
        "quantization": t.quantization,
        "config": t.config,
    }
    if t.gguf_file is not None:  # only then: a manifest written before the key existed keeps its plan
        teacher["gguf_file"] = t.gguf_file
    if t.config is not None:
        teacher["seed"] = t.seed  # an inline teacher's weights are drawn from it
    plan = {"format": FORMAT, "teacher": teacher}
    keys = ("vocab_size", "teacher_vocab_size", "top_k", "logprob_dtype", "id_dtype")
    plan.update({key: fields[key] for key in keys if key in fields})
    from ..train.models import tokenizer_source

    plan["tokenizer"] = tokenizer_info(tokenizer_source(config.student), tokenizer)
    plan.update(data=data_info(d), template=template_info(d.template, tokenizer, conversations))
    plan.update(max_length=d.max_length, max_prompt_length=d.max_prompt_length, shard_examples=fields["shard_examples"])
    plan.update(examples=digest.count, positions=digest.total, examples_sha256=digest.sha256)
    return plan


def _conversations(config: Any) -> bool:
    """Whether the training examples are conversations rendered with a chat template (as
    :func:`adakd.data.tokenize_rows` decides: from ``data.format``, else the first row)."""
    if config.data.source != "hf":
        return False
    from ..data import detect_format
    from ..train.examples import load_records

    first = next(iter(load_records(config.data)), None)
    if first is None:
        return False
    data_format = config.data.format or detect_format(first, "data row 0")
    return data_format == "messages" or (data_format == "prompt_completion" and isinstance(first.get("prompt"), list))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# What to do about a file-system error, by errno (the message says what happened: os.strerror).
_ADVICE = {
    errno.ENOSPC: "free some space and run the same command again (the shards written so far are kept)",
    errno.EDQUOT: "free some space and run the same command again (the shards written so far are kept)",
    errno.EROFS: "give --output a folder on a writable file system",
    errno.EACCES: "give --output a folder this user can write",
    errno.EPERM: "give --output a folder this user can write",
}


@contextlib.contextmanager
def _fs(output: str, path: Path, verb: str = "write") -> Iterator[None]:
    """Turn an ``OSError`` met while ``verb``-ing ``path`` into one :class:`InputError` line naming the path (the file
    written, not its temporary name) and the reason (``no space left on device``, ``read-only file system``, ...)."""
    from ..errors import InputError

    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        reason = reason[:1].lower() + reason[1:]  # "No space left on device" → "no space left on device"
        advice = _ADVICE.get(e.errno or 0)
        raise InputError(
            f"--output {output}: cannot {verb} {path}: {reason}{'; ' + advice if advice else ''}"
        ) from None


def _note(message: str) -> None:
    """One line on stderr (rank 0's notes: what a run found and does about it)."""
    print(f"[adakd] {message}", file=sys.stderr, flush=True)


class _OutputLock:
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
            _note(f"cache: {self.output}: cannot lock the folder here (no fcntl): run one adakd cache on it at a time")
            return
        for _ in range(20):  # a holder that deletes the file as we open it: take the new one
            with _fs(self.output, folder):
                if not folder.is_dir():
                    folder.mkdir(parents=True, exist_ok=True)
                    self.created = True
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the folder was removed meanwhile
            except OSError as e:
                with _fs(self.output, self.path):
                    raise e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    _note(f"cache: {self.output}: cannot lock {self.path} ({e.strerror or e}): run one adakd cache on "
                          "it at a time")  # fmt: skip
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
                with _fs(self.output, self.path):
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


class _Folder:
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
        with _fs(output, self.path, "read"):
            names = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
        self.plan, manifest = _read_json(self.path / PLAN), _read_json(self.path / MANIFEST)
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
        with _fs(self.output, self.path, "read"):
            files = sorted(p for p in self.path.iterdir() if shard_index(p.name) is not None and p.is_file())
        for path in files:
            s = shard_index(path.name)
            if s >= len(shards):
                raise InputError(
                    f"--output {self.output}: {path.name} is not a shard of this cache, which has {len(shards)} shards "
                    "(a file of another cache?): delete it, or use --overwrite"
                )
            with _fs(self.output, path, "read"):
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
            if entry is not None and self._bytes(path, lambda: (header.size, sha256_file(path)[1]) ==
                                                 (entry["bytes"], entry["sha256"])):  # fmt: skip
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
        wrong = shard_problem(header, top_k=ref.get("top_k"), id_dtype=ref.get("id_dtype"),
                              logprob_dtype=ref.get("logprob_dtype"), examples=count, positions=positions)  # fmt: skip
        if wrong is not None:
            field, want, found = wrong
            return f"its tensors do not match its header ({field}: {show(want)} expected, {show(found)} found)"
        if entry is not None:
            if not self._bytes(path, lambda: (header.size, sha256_file(path)[1]) == (entry["bytes"], entry["sha256"])):
                return "its size or sha256 is not the manifest's (corrupt)"
        elif not self._bytes(path, lambda: header.tensors_sha256() == meta.get("tensors_sha256")):
            return "its tensors' sha256 is not the one its header records (corrupt)"
        return None

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


class _Ranks:
    """The processes of a ``torchrun`` launch (one process: no-ops)."""

    def __init__(self, args: Any) -> None:
        import torch.distributed as dist

        self.rank, self.world = args.process_index, max(1, args.world_size)
        self.group = None
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=_FINAL_WAIT)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def _log(ranks: _Ranks, message: str) -> None:
    if ranks.main:
        print(f"[adakd] {message}", flush=True)


def _prepare(folder: _Folder, plan: dict[str, Any], overwrite: bool, ranks: _Ranks) -> None:
    """Rank 0, while the others wait: delete the old cache (``--overwrite``), or an outdated manifest, the shards
    :meth:`_Folder.verify` found damaged (one line each on stderr) and the temporary files an interrupted run left;
    then write ``plan.json``."""
    if ranks.main:
        output = folder.output
        with _fs(output, folder.path):
            folder.path.mkdir(parents=True, exist_ok=True)
        if folder.manifest_note and not overwrite:
            _note(f"cache: {output}: {folder.manifest_note}; the manifest is written anew")
        for name, why in sorted(folder.redo.items()):
            _note(f"cache: {output}: {name}: {why}; computing it again")
        with _fs(output, folder.path, "read"):
            paths = sorted(folder.path.iterdir())
        for path in paths:
            stale = overwrite or ".tmp" in path.name or path.name == MANIFEST or path.name in folder.redo
            if stale and is_cache_file(path.name):
                with _fs(output, path, "delete"):
                    path.unlink()
        with _fs(output, folder.path / PLAN):
            write_json(folder.path / PLAN, plan)
    ranks.barrier()


def _teacher(config: Any, args: Any) -> Any:
    """The teacher alone, on the run's device, in eval mode, without gradients."""
    from ..train.models import check_quantization_backend, load_model

    check_quantization_backend(config.teacher, "teacher", args.device)
    model = load_model(config.teacher, "teacher", device=args.device)
    if not getattr(model, "is_quantized", False):  # a quantised model was loaded onto its device
        model = model.to(args.device)
    return model.eval().requires_grad_(False)


def _shards(digest: Any, shard_examples: int) -> list[tuple[int, int, int]]:
    """``(first example, examples, positions)`` of each shard."""
    out = []
    for first in range(0, digest.count, shard_examples):
        count = min(shard_examples, digest.count - first)
        out.append((first, count, int(digest.positions[first : first + count].sum())))
    return out


def _compute(
    model: Any, examples: Any, shards: list, folder: _Folder, plan: dict, ranks: _Ranks, **options: Any
) -> int:
    """Compute and write this process's missing shards (shard s belongs to rank s % world); returns their count.
    ``options``: :func:`~adakd.cache.writer.compute_shard`'s keywords. Each shard's header records ``plan`` and its
    place (:func:`~adakd.cache.writer.write_shard`)."""
    from tqdm.auto import tqdm

    mine = [s for s in range(len(shards)) if s % ranks.world == ranks.rank]
    todo = [s for s in mine if not (folder.path / shard_name(s)).is_file()]
    if len(todo) < len(mine):
        _log(ranks, f"cache: {len(mine) - len(todo)} of this process's {len(mine)} shards already written, kept")
    total = sum(shards[s][1] for s in todo)
    with tqdm(total=total, desc="adakd cache", unit="ex", disable=not ranks.main) as progress:
        for s in todo:
            first, count, positions = shards[s]
            tensors = compute_shard(model, examples, first, count, progress=progress, **options)
            if int(tensors["offsets"][-1]) != positions:  # the collator masks as the digest counts: a bug otherwise
                raise RuntimeError(f"shard {s}: {int(tensors['offsets'][-1])} rows for {positions} positions")
            place = {"index": s, "first_example": first, "examples": count, "positions": positions}
            meta = {"plan": plan, "shard": place}
            path = folder.path / shard_name(s)
            with _fs(folder.output, path):
                write_shard(path, tensors, meta)
    return len(todo)


def _write_manifest(folder: _Folder, plan: dict[str, Any], shards: list) -> dict[str, Any]:
    """Read every shard back (its size, sha256 and row count) and write ``manifest.json`` atomically."""
    import numpy as np
    from safetensors import safe_open

    from ..errors import InputError

    entries = []
    tail_mass, tail_max = 0.0, 0.0
    for s, (first, count, positions) in enumerate(shards):
        path = folder.path / shard_name(s)
        with _fs(folder.output, path, "read"), safe_open(str(path), framework="numpy") as f:
            rows = int(f.get_tensor("offsets")[-1])
            mass = np.exp(f.get_tensor("tail").astype(np.float64))
        tail_mass += float(mass.sum())
        tail_max = max(tail_max, float(mass.max(initial=0.0)))
        if rows != positions:
            raise InputError(
                f"--output {folder.output}: {path.name} holds {rows} rows where this cache has {positions} "
                "positions (a file from another run?): delete it and run the command again"
            )
        with _fs(folder.output, path, "read"):
            size, sha = sha256_file(path)
        entries.append(
            {"file": path.name, "first_example": first, "examples": count, "positions": positions, "bytes": size,
             "sha256": sha}
        )  # fmt: skip
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # The teacher's mass outside the top-k, over every position: how much of its distribution the cache lumps into
    # the tail bucket (docs/cache.md: above about 1%, raise --top-k or train with the live teacher).
    tail = {"mean": tail_mass / max(1, plan["positions"]), "max": tail_max}
    manifest = {"format": plan["format"], "created": created, **plan, "tail_mass": tail, "shards": entries}
    with _fs(folder.output, folder.path / MANIFEST):
        write_json(folder.path / MANIFEST, manifest)
    return manifest


def _summary(manifest: dict[str, Any], output: str, computed: int, rank: int) -> dict[str, Any]:
    size = sum(s["bytes"] for s in manifest["shards"])
    mean = manifest.get("tail_mass", {}).get("mean")
    return {
        "output": output,
        "examples": manifest["examples"],
        "positions": manifest["positions"],
        "shards": len(manifest["shards"]),
        "bytes": size,
        "bytes_per_position": size / max(1, manifest["positions"]),
        "tail_mass": mean if isinstance(mean, (int, float)) else float("nan"),
        "top_k": manifest["top_k"],  # effective: a --top-k above the vocabulary keeps the whole vocabulary
        "computed_shards": computed,
        "rank": rank,
    }


def build_cache(
    config: Any,
    output: str,
    *,
    top_k: int = 32,
    dtype: str = "float16",
    batch_size: int = 8,
    shard_examples: int = 1024,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Compute the teacher cache of ``config``'s training data into the folder ``output`` (see the module).

    Args:
        config: a :class:`adakd.train.DistillConfig` with a teacher (not itself a cache), off-policy, not streamed.
        output: the cache folder; a folder holding this same plan is continued, another plan is refused.
        top_k: tokens kept per position (at most the teacher's vocabulary).
        dtype: the log-probabilities' storage dtype, ``float16`` or ``float32`` (the tail is always float32).
        batch_size: examples per teacher forward pass.
        shard_examples: examples per shard file.
        overwrite: delete the cache files ``output`` holds first.

    Returns:
        ``output``, ``examples``, ``positions``, ``shards``, ``bytes`` (the shards'), ``bytes_per_position``,
        ``computed_shards`` (0 for a cache found complete), ``rank``; a process other than rank 0 returns its own
        ``computed_shards`` and ``rank`` only.

    Raises:
        ConfigError: a config ``adakd cache`` refuses (:func:`check_cache_config`), or what training would refuse.
        InputError: a bad option; an ``output`` that holds something else, a shard of another cache, or that another
            ``adakd cache`` run is writing (it holds ``output/build.lock``); a file-system error (a full disk, a
            read-only file system), naming the path.
    """
    _check_options(top_k, dtype, batch_size, shard_examples)
    check_cache_config(config)
    from ..train.inputs import training_arguments

    # Each process runs a whole teacher: DeepSpeed would build it partitioned (zero.Init) for training.
    plain = {key: value for key, value in config.training.items() if key != "deepspeed"}
    args = training_arguments(plain, origin=config.origin)
    ranks = _Ranks(args)
    lock = _OutputLock(output) if ranks.main else None
    if lock is not None:
        lock.acquire()  # before the folder is read, until the command returns: one run at a time
    try:
        ranks.barrier()  # the others read the folder once rank 0 holds it
        return _build(config, args, ranks, output, top_k, dtype, batch_size, shard_examples, overwrite)
    finally:
        if lock is not None:
            lock.release()


def _build(
    config: Any, args: Any, ranks: _Ranks, output: str, top_k: int, dtype: str, batch_size: int, shard_examples: int,
    overwrite: bool,
) -> dict[str, Any]:  # fmt: skip
    """:func:`build_cache` once the folder is locked."""
    from ..data import DistillCollator
    from ..errors import ConfigError
    from ..train.examples import training_examples
    from ..train.inputs import check_tokenizers, load_tokenizer
    from ..train.models import tokenizer_source

    tokenizer = load_tokenizer(config.student)
    check_tokenizers(config.teacher, config.loss, tokenizer)
    # check_cache_config refused on-policy modes: nothing is held out
    examples, _ = training_examples(config.data, args, tokenizer, tokenizer_name=tokenizer_source(config.student))
    digest = digest_examples(examples)
    shards = _shards(digest, shard_examples)
    conversations = _conversations(config)
    fields: dict[str, Any] = {"top_k": top_k, "logprob_dtype": dtype, "shard_examples": shard_examples}
    folder = _Folder(output, overwrite)
    plan = folder.check(_plan(config, tokenizer, digest, conversations, **fields))
    folder.verify(plan, shards)
    if folder.complete(plan, len(shards)):
        _log(ranks, f"cache: {output} is complete already; nothing to compute")
        return _summary(folder.manifest, output, 0, ranks.rank)
    vocab = student_vocab_rows(config)  # the rows training compares over: the teacher is cropped to them
    model = _teacher(config, args)
    teacher_vocab = vocab_rows(model)
    try:
        check_vocab_sizes(vocab, teacher_vocab, len(tokenizer))
    except ValueError as e:
        raise ConfigError(f"teacher: {e}") from e
    fields.update(top_k=min(top_k, vocab), vocab_size=vocab, teacher_vocab_size=teacher_vocab, id_dtype=id_dtype(vocab))
    plan = folder.check(_plan(config, tokenizer, digest, conversations, **fields))
    folder.verify(plan, shards)  # the headers against the whole plan (the bytes were read once, above)
    ranks.barrier()  # every process has read the folder before rank 0 changes it
    _prepare(folder, plan, overwrite, ranks)
    head = linear_head(model)
    computed = _compute(
        model, examples, shards, folder, plan, ranks, k=fields["top_k"], batch_size=batch_size, head=head,
        collate=DistillCollator(tokenizer.pad_token_id), id_dtype=fields["id_dtype"], logprob_dtype=dtype, width=vocab,
    )  # fmt: skip
    ranks.barrier()
    summary = {"computed_shards": computed, "rank": ranks.rank}
    if ranks.main:
        summary = _summary(_write_manifest(folder, plan, shards), output, computed, ranks.rank)
    ranks.barrier()  # the command returns on every process once the cache is complete
    return summary
