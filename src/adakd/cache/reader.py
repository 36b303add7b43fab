"""Reading a teacher cache at training time: :func:`open_cache` checks that it belongs to the run, :class:`TeacherCache`
reads an example's rows, :class:`CachedTeacherCollator` puts them into a batch next to the student's inputs.

Opening a cache checks the manifest against itself (types, the shard list against the counts) and against every
shard's header (k, rows, examples, dtypes), then reads every shard once (its sha256): a hand-edited manifest, a corrupt
or a truncated cache stops the run at start, not at the step that reads the bad rows. That costs one read of the cache
(about a second per GB from a local disk), on every process.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .format import (
    FORMAT,
    IGNORE_INDEX,
    MANIFEST,
    data_info,
    digest_examples,
    manifest_problem,
    read_shard_header,
    sha256_file,
    shard_problem,
    show,
    template_info,
    tokenizer_info,
)

__all__ = ["CachedTeacherCollator", "IndexedExamples", "TeacherCache", "open_cache"]

_REQUIRED = ("top_k", "vocab_size", "tokenizer", "data", "template", "max_length", "max_prompt_length", "examples",
             "examples_sha256", "shards")  # fmt: skip


class TeacherCache:
    """A verified cache (:func:`open_cache`): the teacher's top-k rows of each training example.

    Shards are opened once per process, when first read (``safetensors.safe_open``, memory-mapped), and their
    handles kept; a copy sent to a data-loader worker opens its own.
    """

    def __init__(self, folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.top_k: int = manifest["top_k"]
        self.vocab_size: int = manifest["vocab_size"]
        self._firsts = [s["first_example"] for s in manifest["shards"]]
        self._open: dict[int, tuple[Any, np.ndarray]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.manifest["examples"])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # file handles do not pickle; the copy opens its own
        return state

    def _shard(self, s: int) -> tuple[Any, np.ndarray]:
        if self._pid != os.getpid():  # a forked worker: handles are not shared across processes
            self._open, self._pid = {}, os.getpid()
        if s not in self._open:
            from safetensors import safe_open

            handle = safe_open(str(self.folder / self.manifest["shards"][s]["file"]), framework="numpy")
            self._open[s] = handle, handle.get_tensor("offsets")
        return self._open[s]

    def rows(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Example ``i``'s rows, one per supervised position in order: ``ids`` int64 ``[n, k]``, ``logprobs`` float32
        ``[n, k]`` (the teacher's at τ = 1) and ``tail`` float32 ``[n]`` (log of the rest of its mass)."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} is not in the cache ({len(self)} examples)")
        s = bisect.bisect_right(self._firsts, i) - 1
        handle, offsets = self._shard(s)
        j = i - self._firsts[s]
        a, b = int(offsets[j]), int(offsets[j + 1])
        ids = handle.get_slice("ids")[a:b].astype(np.int64)
        logprobs = handle.get_slice("logprobs")[a:b].astype(np.float32)
        return ids, logprobs, handle.get_slice("tail")[a:b].astype(np.float32)


def _read_manifest(path: str, folder: Path) -> dict[str, Any]:
    from ..errors import ConfigError

    if not folder.is_dir():
        raise ConfigError(f"teacher.cache: {path}: no such folder")
    file = folder / MANIFEST
    if not file.is_file():
        raise ConfigError(
            f"teacher.cache: {path}: no manifest.json (an unfinished adakd cache run: run the same command again to "
            "finish it)"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"teacher.cache: {path}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), dict):
        raise ConfigError(f"teacher.cache: {path}: manifest.json is not an adakd teacher cache's manifest")
    found = manifest["format"]
    if found.get("name") != FORMAT["name"] or found.get("version") != FORMAT["version"]:
        raise ConfigError(
            f"teacher.cache: {path}: manifest.json has format {found.get('name')} version {found.get('version')}; "
            f"this adakd reads {FORMAT['name']} version {FORMAT['version']}: compute the cache again with adakd cache"
        )
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise ConfigError(f"teacher.cache: {path}: manifest.json lacks {', '.join(missing)}")
    problem = manifest_problem(manifest)
    if problem is not None:
        key, reason = problem
        raise ConfigError(
            f"teacher.cache: {path}: manifest.json: {key}: {reason} (a hand-edited manifest?): compute the cache again "
            "with adakd cache"
        )
    return manifest


def _check_files(path: str, folder: Path, manifest: dict[str, Any]) -> None:
    """Every shard is there with the size the manifest gives."""
    from ..errors import ConfigError

    for shard in manifest["shards"]:
        file = folder / shard["file"]
        if not file.is_file():
            raise ConfigError(
                f"teacher.cache: {path}: {shard['file']} is missing: run the adakd cache command again to compute it"
            )
        size = file.stat().st_size
        if size != shard["bytes"]:
            raise ConfigError(
                f"teacher.cache: {path}: {shard['file']} has {size} bytes, the manifest {shard['bytes']} (truncated?): "
                "run the adakd cache command again to compute it anew"
            )


# What a shard holds, by the manifest key a header contradicts.
_HOLDS = {"top_k": "tokens per row", "positions": "rows", "examples": "examples (offsets)", "id_dtype": "token ids",
          "logprob_dtype": "log-probabilities"}  # fmt: skip


def _check_headers(path: str, folder: Path, manifest: dict[str, Any]) -> None:
    """Every shard's header holds what the manifest says: ``top_k`` tokens per row, the shard's ``positions`` rows and
    ``examples`` offsets, the manifest's dtypes (only the headers are read)."""
    from ..errors import ConfigError

    for s, shard in enumerate(manifest["shards"]):
        file = folder / shard["file"]
        try:
            header = read_shard_header(file)
        except ValueError as e:
            raise ConfigError(
                f"teacher.cache: {path}: {shard['file']} is corrupt ({e}): run the adakd cache command again to "
                "compute it anew"
            ) from None
        except OSError as e:
            raise ConfigError(f"teacher.cache: {path}: {shard['file']}: cannot read ({e.strerror or e})") from None
        wrong = shard_problem(
            header,
            top_k=manifest["top_k"],
            id_dtype=manifest.get("id_dtype"),
            logprob_dtype=manifest.get("logprob_dtype"),
            examples=shard["examples"],
            positions=shard["positions"],
        )
        if wrong is None:
            continue
        field, claimed, found = wrong
        if field == "tensors":
            raise ConfigError(
                f"teacher.cache: {path}: {shard['file']} is not a teacher cache shard (it holds {show(found)}, not "
                f"{show(claimed)})"
            )
        key = field if field in ("top_k", "id_dtype", "logprob_dtype") else f"shards[{s}].{field}"
        raise ConfigError(
            f"teacher.cache: {path}: manifest.json: {key}: {show(claimed)}, but {shard['file']} holds {show(found)} "
            f"{_HOLDS[field]} (a hand-edited manifest?): compute the cache again with adakd cache"
        )


def _check_tokenizer(path: str, manifest: dict[str, Any], mine: dict[str, Any], chat_template: bool) -> None:
    """The vocabulary and special tokens (``chat_template`` False), or the chat template (True), are the cache's."""
    from ..errors import ConfigError

    theirs = manifest["tokenizer"]
    parts = ("chat_template_sha256",) if chat_template else ("vocab_sha256", "special_tokens_sha256")
    differ = [part.removesuffix("_sha256").replace("_", " ") for part in parts if theirs.get(part) != mine[part]]
    if differ:
        raise ConfigError(
            f"teacher.cache: {path}: made with another tokenizer ({theirs.get('name')}, {theirs.get('size')} tokens; "
            f"this run's {mine['name']}, {mine['size']} tokens: its {' and '.join(differ)} "
            f"{'differs' if len(differ) == 1 else 'differ'})"
        )


def _check_data(path: str, manifest: dict[str, Any], data: Any, tokenizer: Any) -> None:
    """The data source, the template and the lengths are the cache's."""
    from ..errors import ConfigError

    theirs, mine = manifest["data"], data_info(data)
    for key in (*mine, *(k for k in theirs if k not in mine)):
        if theirs.get(key) != mine.get(key):
            raise ConfigError(
                f"teacher.cache: {path}: data.{key}: the cache was made from {show(theirs.get(key))}, this run reads "
                f"{show(mine.get(key))}"
            )
    template = manifest["template"]
    used = template_info(data.template, tokenizer, bool(template.get("conversations")))
    if template.get("name") != used["name"]:
        raise ConfigError(
            f"teacher.cache: {path}: data.template: the cache was made with {show(template.get('name'))}, this run "
            f"uses {show(used['name'])}"
        )
    if template.get("conversations"):
        if used["chat_template_sha256"] != template.get("chat_template_sha256"):
            raise ConfigError(
                f"teacher.cache: {path}: data.template: the cache's conversations were rendered with another chat "
                "template than this run's"
            )
    for key in ("max_length", "max_prompt_length"):
        if manifest[key] != getattr(data, key):
            raise ConfigError(
                f"teacher.cache: {path}: data.{key}: the cache was made with {manifest[key]}, this run uses "
                f"{getattr(data, key)}"
            )


def _check_digests(path: str, folder: Path, manifest: dict[str, Any]) -> None:
    from ..errors import ConfigError

    for shard in manifest["shards"]:
        if sha256_file(folder / shard["file"])[1] != shard["sha256"]:
            raise ConfigError(
                f"teacher.cache: {path}: {shard['file']} is corrupt (its sha256 is not the manifest's): delete it and "
                "run the adakd cache command again"
            )


def open_cache(
    path: str | os.PathLike,
    *,
    student: Any,
    data: Any,
    tokenizer: Any,
    examples: Any,
    onpolicy_mode: str = "off",
) -> TeacherCache:
    """Open the teacher cache ``path`` for a training run, after checking it was made for this run.

    Args:
        path: the folder ``adakd cache`` wrote.
        student: the run's ``student`` section (``config.student`` of an :class:`adakd.train.DistillConfig`): where
            its tokenizer comes from.
        data: the run's ``data`` section (``config.data``): the source, template and lengths the cache must match.
        tokenizer: the student tokenizer, as :func:`adakd.train.examples.training_examples` left it (for
            conversations it holds the chat template the examples were rendered with).
        examples: the tokenised training examples (a list of ``input_ids``/``labels`` dicts or a ``datasets.Dataset``).
        onpolicy_mode: the run's ``onpolicy.mode``; a cache serves ``off`` only.

    Raises:
        ConfigError: one line, ``teacher.cache: <path>: ...``: an on-policy run; a missing folder, manifest or shard;
            a manifest that is not JSON, of another format version, or inconsistent (a field of the wrong type, a
            shard list that does not add up, a ``top_k``, row count or dtype that a shard's header contradicts:
            ``manifest.json: <key>: ...``); then, the first that applies, another tokenizer, data source
            (``data.path`` ...), template, ``data.max_length`` / ``max_prompt_length``, or other tokenised examples
            (count, then content); last a shard whose sha256 differs (corrupt).
    """
    from ..errors import ConfigError

    where, folder = str(path), Path(path)
    if onpolicy_mode != "off":
        raise ConfigError(
            f"teacher.cache: {where}: onpolicy.mode {onpolicy_mode} distils on generated text, which a cache "
            "does not cover: give the live teacher, or set onpolicy.mode: off"
        )
    manifest = _read_manifest(where, folder)
    _check_files(where, folder, manifest)
    _check_headers(where, folder, manifest)
    from ..train.models import tokenizer_source

    mine = tokenizer_info(tokenizer_source(student), tokenizer)
    _check_tokenizer(where, manifest, mine, chat_template=False)
    _check_data(where, manifest, data, tokenizer)
    _check_tokenizer(where, manifest, mine, chat_template=True)
    digest = digest_examples(examples)
    if digest.count != manifest["examples"]:
        raise ConfigError(
            f"teacher.cache: {where}: the tokenised training data differ from the cache's ({digest.count} examples, "
            f"the cache has {manifest['examples']})"
        )
    if digest.sha256 != manifest["examples_sha256"]:
        raise ConfigError(
            f"teacher.cache: {where}: the tokenised training data differ from the cache's (the same {digest.count} "
            "examples in number, not in token ids or labels)"
        )
    _check_digests(where, folder, manifest)
    return TeacherCache(folder, manifest)


class IndexedExamples(torch.utils.data.Dataset):
    """The training examples, each with its index (``example_index``), which :class:`CachedTeacherCollator` reads.

    A ``transformers.Trainer`` drops dataset columns its model does not take unless ``remove_unused_columns=False``.
    """

    def __init__(self, examples: Any) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        return {**dict(self.examples[i]), "example_index": i}


class CachedTeacherCollator:
    """A collator (:class:`adakd.data.DistillCollator`) whose batches also hold the cached teacher.

    Each feature carries ``example_index``. Added to the batch (T the padded length, k the cache's ``top_k``):
    ``teacher_ids`` int64 ``[B, T − 1, k]``, ``teacher_logprobs`` float32 ``[B, T − 1, k]``, ``teacher_tail``
    float32 ``[B, T − 1]``. Example b's rows fill, in order, the positions t with ``labels[b, t + 1] != -100``
    (aligned with the shifted labels ``labels[:, 1:]``); other positions hold 0 and are never read.
    """

    def __init__(self, collator: Any, cache: TeacherCache) -> None:
        from ..train.teacher import CachedTeacher  # the reader of these keys owns their names

        self.collator, self.cache, self.keys = collator, cache, CachedTeacher.KEYS

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from ..errors import ConfigError

        batch = self.collator(features)
        supervised = batch["labels"][:, 1:] != IGNORE_INDEX  # [B, T − 1]
        b_size, width = supervised.shape
        k = self.cache.top_k
        ids = torch.zeros(b_size, width, k, dtype=torch.int64)
        logprobs = torch.zeros(b_size, width, k, dtype=torch.float32)
        tail = torch.zeros(b_size, width, dtype=torch.float32)
        for b, feature in enumerate(features):
            if "example_index" not in feature:
                raise ValueError(f"feature {b}: no example_index (wrap the dataset in IndexedExamples)")
            i = int(feature["example_index"])
            rows = self.cache.rows(i)
            where = supervised[b].nonzero().squeeze(1)
            if len(where) != len(rows[2]):
                raise ConfigError(
                    f"teacher.cache: example {i}: {len(where)} supervised positions but the cache holds {len(rows[2])}"
                )
            ids[b, where] = torch.from_numpy(rows[0])
            logprobs[b, where] = torch.from_numpy(rows[1])
            tail[b, where] = torch.from_numpy(rows[2])
        return {**batch, **dict(zip(self.keys, (ids, logprobs, tail), strict=True))}
