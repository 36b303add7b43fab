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
- ``manifest.json``: written last, once every shard is there; a cache without it is unfinished;
- ``build.lock``: only while ``adakd cache`` writes to the folder (it holds an exclusive ``flock`` on it, and its
  process id in it).

Each shard's safetensors header carries, under the metadata key ``adakd``, the plan it was computed for, its place
(index, first example, examples, positions) and a sha256 of its tensors: a resumed run keeps a shard only when these
are its own, and a shard's bytes can be checked without the manifest (:mod:`.shard_file` reads and checks that
header; its names are importable from here too).

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

from ..labels import IGNORE_INDEX
from .shard_file import READ_BYTES, SHARD_META, ShardHeader, read_shard_header, shard_problem, tensors_sha256

__all__ = [
    "DATA_FIELDS",
    "FORMAT",
    "LOCK",
    "MANIFEST",
    "PLAN",
    "SHARD_META",
    "ExampleDigest",
    "ShardHeader",
    "data_info",
    "digest_examples",
    "first_difference",
    "id_dtype",
    "is_cache_file",
    "manifest_problem",
    "read_shard_header",
    "sha256_file",
    "shard_index",
    "shard_problem",
    "shard_name",
    "show",
    "template_info",
    "tensors_sha256",
    "tokenizer_info",
]

FORMAT = {"name": "adakd-teacher-cache", "version": 1}
PLAN = "plan.json"
MANIFEST = "manifest.json"
LOCK = "build.lock"  # held (flock) by the adakd cache run writing the folder; not a cache file
# The data keys that name where the examples come from; synthetic data add synthetic_size and seed.
DATA_FIELDS = ("source", "path", "name", "config", "split", "revision", "format", "limit")


def shard_name(index: int) -> str:
    """The file name of shard ``index``: ``shard-00000.safetensors``."""
    return f"shard-{index:05d}.safetensors"


def shard_index(name: str) -> int | None:
    """The index of a shard file name (``shard-00012.safetensors``: 12), None for another name."""
    if name.startswith("shard-") and name.endswith(".safetensors"):
        digits = name[len("shard-") : -len(".safetensors")]
        if digits.isdigit():
            return int(digits)
    return None


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
        while block := f.read(READ_BYTES):
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
    template they were rendered with (after :func:`adakd.train.examples.training_examples`, the tokenizer's own)."""
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


def _typed(value: Any) -> str:
    """A manifest value as JSON, so that its type shows (``"8"`` is a string), shortened."""
    text = "(nothing)" if value is _MISSING else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def manifest_problem(manifest: dict[str, Any]) -> tuple[str, str] | None:
    """``(key, reason)`` of the first field of a manifest that has the wrong type or disagrees with the others (the
    shard list against the counts), None when it is consistent. Keys are dotted (``shards[1].first_example``)."""
    for key, low in (("top_k", 1), ("vocab_size", 1), ("examples", 0), ("positions", 0), ("shard_examples", 1)):
        if key in manifest and not _count(manifest[key], low):
            return key, f"expected an integer of at least {low}, got {_typed(manifest[key])}"
    for key, kind, name in (
        ("tokenizer", dict, "an object"),
        ("data", dict, "an object"),
        ("template", dict, "an object"),
        ("examples_sha256", str, "a string"),
        ("tail_mass", dict, "an object"),
        ("shards", list, "a list"),
    ):
        if key in manifest and not isinstance(manifest[key], kind):
            return key, f"expected {name}, got {_typed(manifest[key])}"
    for key, valid in (("id_dtype", ("uint16", "int32")), ("logprob_dtype", ("float16", "float32"))):
        if key in manifest and manifest[key] not in valid:
            return key, f"expected {' or '.join(valid)}, got {_typed(manifest[key])}"
    first = rows = 0
    for s, shard in enumerate(manifest.get("shards", [])):
        where = f"shards[{s}]"
        if not isinstance(shard, dict):
            return where, f"expected an object, got {_typed(shard)}"
        for key, low in (("first_example", 0), ("examples", 1), ("positions", 0), ("bytes", 0)):
            if not _count(shard.get(key), low):
                found = _typed(shard.get(key, _MISSING))
                return f"{where}.{key}", f"expected an integer of at least {low}, got {found}"
        if not isinstance(shard.get("sha256"), str):
            return f"{where}.sha256", f"expected a string, got {_typed(shard.get('sha256', _MISSING))}"
        if shard.get("file") != shard_name(s):
            return f"{where}.file", (
                f"{_typed(shard.get('file', _MISSING))} where {shard_name(s)} belongs (a dropped or reordered entry?)"
            )
        if shard["first_example"] != first:
            return f"{where}.first_example", (
                f"{shard['first_example']}, but the shards before it end at example {first} (a dropped or edited "
                "entry?)"
            )
        first += shard["examples"]
        rows += shard["positions"]
    if "shards" in manifest:
        if "examples" in manifest and first != manifest["examples"]:
            return "shards", f"they hold {first} examples, the manifest's examples {manifest['examples']}"
        if "positions" in manifest and rows != manifest["positions"]:
            return "shards", f"they hold {rows} positions, the manifest's positions {manifest['positions']}"
    return None
