"""Where a dataset's rows come from (:func:`load_rows`): a hub id or a local dataset folder (``load_dataset(name,
config, split=..., revision=...)``), a folder written by ``Dataset.save_to_disk``, or local data files whose extension
picks the loader (``.json``/``.jsonl``, ``.parquet``, ``.arrow``, ``.csv``); streamed (``streaming=True``) or not.

A load that fails is one line naming the file (and its line, for a text file adakd reads through first) or the
dataset and split; :mod:`.hf` turns the rows into training examples.
"""

from __future__ import annotations

import codecs
import glob
import json
import re
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import iter_jsonl
from .readers import _check_limit

__all__ = ["FILE_BUILDERS", "dataset_builder", "load_rows"]

# A local data file's extension -> the packaged ``datasets`` builder that reads it (no hub access).
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
# "json:<files>" names (the form adakd has always accepted) pick the builder explicitly, whatever the extension.
_NAMED_BUILDERS = ("json", "csv", "parquet", "arrow")
_GLOB = ("*", "?", "[")


def dataset_builder(spec: str) -> tuple[str, str] | None:
    """``(builder, data files)`` when ``spec`` names local data files (``"json:<files>"``, or a name ending in one of
    :data:`FILE_BUILDERS`' extensions that is not a folder); ``None`` for a dataset name or folder."""
    builder, colon, files = spec.partition(":")
    if colon and builder in _NAMED_BUILDERS:
        return builder, files
    suffix = Path(spec).suffix.lower()
    if suffix in FILE_BUILDERS and not Path(spec).is_dir():
        return FILE_BUILDERS[suffix], spec
    return None


def _saved_to_disk(spec: str) -> bool:
    """Whether ``spec`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, which
    ``load_dataset`` refuses."""
    folder = Path(spec)
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def load_rows(
    spec: str,
    *,
    config: str | None = None,
    split: str = "train",
    revision: str | None = None,
    streaming: bool = False,
    limit: int | None = None,
    label: str | None = None,
) -> Any:
    """Load a dataset's rows as ``datasets`` does, at most ``limit`` of them.

    Args:
        spec: a hub id or local dataset folder (``load_dataset(spec, config, split=..., revision=...)``), a folder
            written by ``save_to_disk``, or local data files: a path (or glob) ending in ``.json``, ``.jsonl``,
            ``.parquet``, ``.arrow`` or ``.csv``, or ``"<builder>:<files>"``. Data files are one split, ``"train"``.
        config: the dataset's configuration (subset), for a dataset name (not for a ``save_to_disk`` folder).
        split: the split to read (``datasets`` split syntax, e.g. ``"train[:1000]"``, works; also for a
            ``save_to_disk`` folder, whose one saved ``Dataset`` is the split ``"train"``).
        revision: a hub branch, tag or commit, for a hub dataset.
        streaming: return an ``IterableDataset`` that reads rows as they are iterated.
        limit: read only the first ``limit`` rows.
        label: the key or flag ``spec`` came from, named first in load errors.

    Returns:
        A ``datasets.Dataset``, or a ``datasets.IterableDataset`` when streaming.

    Raises:
        InputError: a data file that does not exist, or a dataset or split that cannot be loaded (an unknown hub id,
            no network, bad file contents); ``datasets``' error is chained. A text data file (JSON, JSON Lines, CSV)
            is read through first: one that is empty or not UTF-8 is named with its line (``file:line``, from 1),
            and so is a JSON or JSON Lines file that ``datasets`` cannot parse.
    """
    _check_limit(limit)
    import datasets  # heavy (about a second); only this reader needs it

    where = f"{label}: {spec}" if label else spec
    local = dataset_builder(spec)
    files: list[Path] = []
    try:
        if local is not None:
            builder, pattern = local
            explicit = spec.startswith(f"{builder}:")
            if not explicit and not any(c in pattern for c in _GLOB) and not Path(pattern).exists():
                raise InputError(f"{where}: no such file")
            files = _data_files(pattern)
            if builder in _TEXT_BUILDERS:
                for path in files:
                    _check_text_file(path, label)
            ds = datasets.load_dataset(builder, data_files=pattern, split=split, streaming=streaming)
        elif _saved_to_disk(spec):
            for key, value in (("data.config", config), ("data.revision", revision)):
                if value is not None:
                    raise InputError(
                        f"{key}: {value!r} does not apply to {spec}, a folder written by save_to_disk (it holds "
                        "no configurations or revisions); leave it out"
                    )
            ds = _saved_split(datasets, datasets.load_from_disk(spec), split)
            if streaming:
                ds = ds.to_iterable_dataset()
        else:
            if Path(spec).is_dir():
                files = sorted(p for suffix in ("json", "jsonl") for p in Path(spec).rglob(f"*.{suffix}"))
            ds = datasets.load_dataset(spec, config, split=split, revision=revision, streaming=streaming)
    except (OSError, ValueError, StopIteration, datasets.exceptions.DatasetsError) as e:
        if isinstance(e, InputError):
            raise
        raise _load_failure(e, where, split, files, label) from e
    if limit is not None:
        ds = ds.take(limit) if streaming else ds.select(range(min(limit, len(ds))))
    return ds


# The data-file builders whose files are text that adakd reads through before datasets parses them.
_TEXT_BUILDERS = ("json", "csv")
_CHUNK = 1 << 24


def _data_files(pattern: str) -> list[Path]:
    """The local files a data-file spec names (a path or a glob), in order; none when it names nothing here."""
    if any(c in pattern for c in _GLOB):
        return [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
    return [Path(pattern)] if Path(pattern).is_file() else []


def _check_text_file(path: Path, label: str | None) -> None:
    """A text data file must hold something and be UTF-8: ``datasets`` reads an empty JSON file as an internal error
    and lets bytes that are not UTF-8 through into the table, where they fail only when the row is read.

    Raises:
        InputError: ``[label: ]path: no records (an empty file)``, or ``[label: ]path:line: not UTF-8 (byte N:
            ...)`` as the JSONL readers say it.
    """
    prefix = f"{label}: {path}" if label else str(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    filled = False
    with path.open("rb") as f:
        try:
            while chunk := f.read(_CHUNK):
                decoder.decode(chunk)
                filled = filled or bool(chunk.strip())
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            f.seek(0)
            for lineno, raw in enumerate(f, start=1):  # only now, line by line, to name the line
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise InputError(f"{prefix}:{lineno}: not UTF-8 (byte {err.start + 1}: {err.reason})") from None
            raise InputError(f"{prefix}: not UTF-8 (it ends inside a character)") from None
    if not filled:
        raise InputError(f"{prefix}: no records (an empty file)")


def _load_failure(e: BaseException, where: str, split: str, files: list[Path], label: str | None) -> InputError:
    """adakd's own line for a dataset ``datasets`` could not load: the first bad line of a local JSON file when there
    is one, else what went wrong in words (``datasets``' outer messages say only that something did)."""
    for path in files:
        if path.suffix.lower() in (".json", ".jsonl"):
            found = _json_file_problem(path, label)
            if found is not None:
                return found
    message = str(e).strip()  # datasets' own errors say what they are in their text only
    if isinstance(e, (StopIteration, _NoRows)) or re.match(r'Instruction ".*" corresponds to no data', message):
        what = "the split selects no record" if "[" in split else "no records"
        return InputError(f"{where} ({split}): {what}")
    if type(e).__name__ == "EmptyDatasetError":  # a folder without a data file datasets reads
        return InputError(f"{where}: no data files in the folder (.jsonl, .json, .parquet, .arrow, .csv)")
    if "No task.toml or instruction.md files found" in message:
        return InputError(
            f"{where}: datasets reads a folder that holds an instruction.md as a Harbor task set, which needs "
            "task.toml files: give the data files instead (data.path: the folder's *.jsonl, *.parquet, ...)"
        )
    return InputError(f"{where} ({split}): cannot load ({_reason(e)})")


def _reason(e: BaseException) -> str:
    """The first line of what went wrong: ``datasets``' generation error wraps the reader's own error, which says it."""
    import datasets

    seen = 0
    while isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ is not None and seen < 8:
        e, seen = e.__cause__, seen + 1
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _json_file_problem(path: Path, label: str | None) -> InputError | None:
    """The first problem of a JSON or JSON Lines file, named by its line as the JSONL readers name it, or None."""
    prefix = f"{label}: {path}" if label else str(path)
    try:
        with path.open("rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):  # one JSON array of records
            try:
                records = json.loads(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError:
                return None  # _check_text_file names the line
            except json.JSONDecodeError as err:
                return InputError(f"{prefix}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})")
            if not records:
                return InputError(f"{prefix}: no records (an empty JSON array)")
            return None
        count = sum(1 for _ in iter_jsonl(path))
    except InputError as err:
        return InputError(f"{label}: {err}") if label else err
    except (OSError, RecursionError):
        return None
    return None if count else InputError(f"{prefix}: no records (an empty file)")


class _NoRows(ValueError):
    """A split of a ``save_to_disk`` folder that selects no row (as ``datasets`` says of the splits it reads)."""


def _saved_split(datasets: Any, saved: Any, split: str) -> Any:
    """The rows of ``split`` (``datasets`` split syntax: ``train``, ``train[:100]``, ``train[10%:]+test``) of a
    folder written by ``save_to_disk``: a ``DatasetDict``'s splits, or one saved ``Dataset`` as the split ``train``."""
    parts = dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in parts.items()})
    except (ValueError, AssertionError) as e:
        held = ", ".join(parts)
        what = "holds the splits" if isinstance(saved, datasets.DatasetDict) else "holds one saved dataset, read as"
        name = re.sub(r"\[.*$", "", split).strip()
        if name and name not in parts and "+" not in split:
            raise ValueError(f"Unknown split {name!r}; the folder {what} {held}") from e
        raise ValueError(f"not a split ({e}); the folder {what} {held}") from e
    # (datasets' select refuses an empty range that starts at the end)
    pieces = [parts[i.splitname].select(range(i.from_, i.to) if i.to > i.from_ else []) for i in instructions]
    rows = pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
    if not len(rows) and any(len(v) for v in parts.values()):
        raise _NoRows(f'Instruction "{split}" corresponds to no data!')
    return rows
