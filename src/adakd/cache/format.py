"""The offline teacher cache on disk: its file names, the manifest's fields, and the fingerprints that tie a cache to
the run that reads it.

A cache folder holds

- ``shard-00000.safetensors``, ...: example i lives in shard i // shard_examples; each shard has the tensors
  ``ids`` ``[P, k]`` (uint16 when the teacher has at most 65536 rows, else int32), ``logprobs`` ``[P, k]`` (float16
  or float32), ``tail`` ``[P]`` float32 and ``offsets`` ``[E + 1]`` int64 (example j of the shard owns rows
  ``offsets[j]:offsets[j + 1]``; P = offsets[-1]). A row is one supervised position t of an example, in order:
  t < len − 1 with ``labels[t + 1] != -100`` (position t predicts token t + 1);
- ``plan.json``: what the cache is made of (the manifest without ``created`` and ``shards``), written first, so that
  an interrupted run can be continued by the same command and refused by another;
- ``manifest.json``: written last, once every shard is there; a cache without it is unfinished.

The fingerprints are plain SHA-256 digests: of the tokenizer (vocabulary, special tokens, chat template), of the
tokenised examples (ids and labels, with their lengths so that boundaries count), and of each shard file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATA_FIELDS",
    "FORMAT",
    "MANIFEST",
    "PLAN",
    "ExampleDigest",
    "data_info",
    "digest_examples",
    "first_difference",
    "id_dtype",
    "is_cache_file",
    "sha256_file",
    "shard_name",
    "show",
    "template_info",
    "tokenizer_info",
]

FORMAT = {"name": "adakd-teacher-cache", "version": 1}
PLAN = "plan.json"
MANIFEST = "manifest.json"
IGNORE_INDEX = -100  # adakd.data.examples.IGNORE_INDEX (not imported: that module imports torch and the readers)
# The data keys that name where the examples come from; synthetic data add synthetic_size and seed.
DATA_FIELDS = ("source", "path", "name", "config", "split", "revision", "format", "limit")
_READ_BYTES = 1 << 22


def shard_name(index: int) -> str:
    """The file name of shard ``index``: ``shard-00000.safetensors``."""
    return f"shard-{index:05d}.safetensors"


def is_cache_file(name: str) -> bool:
    """Whether ``name`` is a file ``adakd cache`` writes (or a temporary one it left): what ``--overwrite`` deletes."""
    base = name.split(".tmp", 1)[0]
    return base in (PLAN, MANIFEST) or (base.startswith("shard-") and base.endswith(".safetensors"))


def id_dtype(vocab_size: int) -> str:
    """The storage dtype of token ids: uint16 when every id fits (V ≤ 65536), else int32."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def sha256_file(path: str | os.PathLike) -> tuple[int, str]:
    """``(size in bytes, sha256 hex digest)`` of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def _chat_template(tokenizer: Any) -> str | dict | None:
    """The tokenizer's chat template: a Jinja string, several named ones (a dict), or None."""
    return getattr(tokenizer, "chat_template", None) or None


def tokenizer_info(name: str | None, tokenizer: Any) -> dict[str, Any]:
    """Where the tokenizer came from and its fingerprint.

    ``fingerprint`` is the sha256 over its sorted vocabulary items, its special tokens and its chat template; the
    three parts are also kept apart (``vocab_sha256``, ...), so that a reader can say which one differs.
    """
    parts = {
        "vocab_sha256": _sha256_json(sorted(tokenizer.get_vocab().items())),
        "special_tokens_sha256": _sha256_json(tokenizer.special_tokens_map),
        "chat_template_sha256": _sha256_json(_chat_template(tokenizer)),
    }
    return {"name": name, "size": len(tokenizer), "fingerprint": _sha256_json(parts), **parts}


def template_info(template: str | None, tokenizer: Any, conversations: bool) -> dict[str, Any]:
    """``data.template``, whether the examples are conversations, and for conversations the sha256 of the chat
    template they were rendered with (after :func:`adakd.train.run.training_examples`, the tokenizer's own)."""
    from ..data.templates import TEMPLATES

    used = _chat_template(tokenizer)
    if isinstance(used, dict):  # several named templates: the default one formats conversations
        used = used.get("default")
    return {
        "name": template if template in TEMPLATES else _local(template),  # else a Jinja file
        "conversations": conversations,
        "chat_template_sha256": _sha256_json(used) if conversations else None,
    }


def _local(path: str | None) -> str | None:
    """A data path that names a local file or folder (or a token shard prefix), made absolute: the cache is found
    the same from another working directory. Anything else (a hub id, ``json:<files>``) is kept as given."""
    if not path:
        return path
    if Path(path).exists() or Path(path + ".idx").exists():
        return str(Path(path).resolve())
    return path


def data_info(data: Any) -> dict[str, Any]:
    """The ``data`` keys that name where the examples come from (:data:`DATA_FIELDS`, plus ``synthetic_size`` and
    ``seed`` for synthetic data)."""
    out = {key: getattr(data, key) for key in DATA_FIELDS}
    out["path"] = _local(out["path"])
    if data.source == "synthetic":
        out.update(synthetic_size=data.synthetic_size, seed=data.seed)
    return out


class ExampleDigest:
    """What the tokenised examples are, in a few numbers.

    ``count`` examples; ``positions`` ``[count]`` int64, each example's supervised positions (rows of the cache);
    ``sha256`` over every example's ``input_ids`` and ``labels`` in order, each preceded by its length (int64,
    little-endian).
    """

    def __init__(self, positions: np.ndarray, sha256: str) -> None:
        self.positions = positions
        self.count = len(positions)
        self.total = int(positions.sum())
        self.sha256 = sha256


def _pairs(examples: Any) -> Iterator[tuple[Any, Any]]:
    """``(input_ids, labels)`` of each example: a list of dicts, or a ``datasets.Dataset`` read in batches."""
    if hasattr(examples, "iter") and hasattr(examples, "column_names"):
        for batch in examples.iter(batch_size=1024):
            yield from zip(batch["input_ids"], batch["labels"], strict=True)
        return
    for example in examples:
        yield example["input_ids"], example["labels"]


def digest_examples(examples: Iterable[dict[str, Any]] | Any) -> ExampleDigest:
    """The :class:`ExampleDigest` of tokenised examples (one pass over them)."""
    h = hashlib.sha256()
    positions = []
    for input_ids, labels in _pairs(examples):
        ids = np.asarray(input_ids, dtype="<i8")
        lab = np.asarray(labels, dtype="<i8")
        for part in (ids, lab):
            h.update(np.int64(len(part)).astype("<i8").tobytes())
            h.update(part.tobytes())
        positions.append(int((lab[1:] != IGNORE_INDEX).sum()))
    return ExampleDigest(np.asarray(positions, dtype=np.int64), h.hexdigest())


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": leaf}``; lists and empty dicts are leaves."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_leaves(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


_MISSING = object()


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """``(dotted key, old value, new value)`` of the first leaf where two plans differ, in ``new``'s order, over
    ``new``'s top-level keys only (a plan made before the teacher is loaded lacks the teacher's vocabulary); None
    when they agree. A key one side lacks has the value ``_MISSING``."""
    new = json.loads(json.dumps(new))  # tuples as lists, as they come back from a file
    a = _leaves({key: old.get(key, _MISSING) for key in new})
    b = _leaves(new)
    for key in [*b, *(k for k in a if k not in b)]:
        if a.get(key, _MISSING) != b.get(key, _MISSING):
            return key, a.get(key, _MISSING), b.get(key, _MISSING)
    return None


def show(value: Any) -> str:
    """A manifest value for a message: strings as they are (long ones shortened), None as ``none``."""
    if value is _MISSING:
        return "(nothing)"
    text = value if isinstance(value, str) else "none" if value is None else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
