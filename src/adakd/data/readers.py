"""Record sources: MiniLLM eval JSONL, raw dolly-style JSONL, MiniLLM token shards, Hugging Face datasets (the
synthetic tasks are :mod:`.synthetic`'s).

Text readers return :class:`Record` (a formatted prompt plus references); the token-shard reader returns
:class:`TokenRecord` (already tokenized ids). :func:`adakd.data.build_examples` turns either into training examples.
Every text source goes through :func:`record_from_row`, so a JSONL line and a ``datasets`` row with the same fields
give the same record.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..files import input_file, iter_jsonl
from .templates import format_prompt

if TYPE_CHECKING:  # numpy comes with the train extra; `pip install adakd` (the losses) has torch only
    import numpy as np

__all__ = [
    "Record",
    "TokenRecord",
    "instruction_record",
    "minillm_record",
    "read_instruction_jsonl",
    "read_minillm_jsonl",
    "read_token_shards",
    "record_from_row",
]


@dataclass(frozen=True)
class Record:
    """One text example: ``prompt`` (already formatted), ``response`` (the first reference), all ``references``."""

    prompt: str
    response: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class TokenRecord:
    """One pre-tokenized example: prompt ids and response ids, the response WITHOUT a trailing eos."""

    prompt_ids: list[int]
    response_ids: list[int]


# ---------------------------------------------------------------------------------------------- row mapping


def _check_limit(limit: int | None) -> None:
    """A reader's ``limit`` argument: None (every record) or a count."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise InputError(f"limit must be None or a non-negative int, got {limit!r}")


def _str_field(row: Mapping[str, Any], keys: tuple[str, ...], where: str, required: bool = True) -> str | None:
    """The first of ``keys`` present in ``row``, checked to be a str (``None`` counts as absent)."""
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InputError(f"{where}: key {key!r} must be a str, got {type(value).__name__}")
        return value
    if required:
        raise InputError(f"{where}: missing key {_names(keys)}")
    return None


def _references(row: Mapping[str, Any], keys: tuple[str, ...], where: str) -> tuple[str, ...]:
    """The first of ``keys`` present in ``row`` as a tuple of references: a str, or a non-empty list of str."""
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            # Policy: an empty response is an error, not a silent skip; it would train on an eos alone.
            if not value[0].strip():
                raise InputError(f"{where}: key {key!r}: empty response")
            return tuple(value)
        raise InputError(f"{where}: key {key!r} must be a str or a non-empty list of str, got {_describe(value)}")
    raise InputError(f"{where}: missing key {_names(keys)}")


def _names(keys: tuple[str, ...]) -> str:
    """``'a' or 'b'``, for a message about alternative keys."""
    return " or ".join(repr(k) for k in keys)


def _describe(value: Any) -> str:
    """What a value that should have been references is, for a message."""
    if isinstance(value, list):
        return "an empty list" if not value else "a list with non-str items"
    return type(value).__name__


def minillm_record(row: Mapping[str, Any], where: str) -> Record:
    """A MiniLLM-format row (``prompt``: formatted str; ``output``: str or list of str) as a :class:`Record`.

    ``where`` (e.g. ``"path:lineno"``) starts every error message.
    """
    prompt = _str_field(row, ("prompt",), where)
    refs = _references(row, ("output",), where)
    return Record(prompt=prompt, response=refs[0], references=refs)


def instruction_record(row: Mapping[str, Any], template: str, where: str) -> Record:
    """A raw dolly-style row as a :class:`Record`, its prompt built by :func:`format_prompt`.

    Keys: ``instruction``; optional context ``context`` or ``input`` (str or null); response ``response`` or
    ``output`` (str, or a non-empty list of str as in MiniLLM's sinst).
    """
    instruction = _str_field(row, ("instruction",), where)
    context = _str_field(row, ("context", "input"), where, required=False)
    refs = _references(row, ("response", "output"), where)
    try:
        prompt = format_prompt(instruction, context, template)
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    return Record(prompt=prompt, response=refs[0], references=refs)


def record_from_row(row: Mapping[str, Any], template: str, where: str) -> Record:
    """Map a row of either style: raw fields (``instruction``) are formatted with ``template``; a row with only a
    preformatted ``prompt`` is taken as is, which is valid only for the ``"minillm"`` template it was made with.
    """
    if "instruction" in row:
        return instruction_record(row, template, where)
    if "prompt" in row:
        if template != "minillm":
            raise InputError(f"{where}: only a preformatted 'prompt' (minillm), cannot apply template {template!r}")
        return minillm_record(row, where)
    raise InputError(f"{where}: missing key 'instruction' or 'prompt'")


# ---------------------------------------------------------------------------------------------- JSONL


def read_minillm_jsonl(path: str | Path, limit: int | None = None) -> list[Record]:
    """Read a MiniLLM eval file (one JSON object a line with ``prompt`` and ``output``); blank lines are skipped.

    Returns at most ``limit`` records, in file order.
    """
    _check_limit(limit)
    return [minillm_record(row, where) for where, row in iter_jsonl(path, limit=limit)]


def read_instruction_jsonl(path: str | Path, template: str = "minillm", limit: int | None = None) -> list[Record]:
    """Read raw dolly-style JSONL (``instruction``, ``context``/``input``, ``response``/``output``) and format it.

    Returns at most ``limit`` records, in file order.
    """
    _check_limit(limit)
    return [instruction_record(row, template, where) for where, row in iter_jsonl(path, limit=limit)]


# ---------------------------------------------------------------------------------------------- token shards

_MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
# magic, version (u64), dtype code (u8), item count (u64), doc count (u64): 34 bytes, little-endian, unpadded.
_MMIDIDX_HEADER = struct.Struct("<9sQBQQ")
# Megatron dtype code -> (dtype, separator). MiniLLM writes the prompt/response separator as -1, which the uint16
# shards of small-vocabulary tokenizers (GPT-2) store as 65535; int32 shards are used for larger vocabularies.
_SHARD_DTYPES: dict[int, tuple[str, int]] = {4: ("<i4", -1), 8: ("<u2", 65535)}


def _read_mmidx_index(idx_path: Path) -> tuple[np.dtype, int, np.ndarray, np.ndarray]:
    """Parse an MMIDIDX ``.idx``: (token dtype, separator, sizes int32 [count], byte pointers int64 [count])."""
    raw = input_file(idx_path).read_bytes()
    if len(raw) < _MMIDIDX_HEADER.size:
        raise InputError(f"{idx_path}: {len(raw)} bytes, too short for the {_MMIDIDX_HEADER.size}-byte MMIDIDX header")
    magic, version, code, count, _doc_count = _MMIDIDX_HEADER.unpack_from(raw)
    if magic != _MMIDIDX_MAGIC:
        raise InputError(f"{idx_path}: bad magic {magic!r}, expected {_MMIDIDX_MAGIC!r} (not an MMIDIDX index)")
    if version != 1:
        raise InputError(f"{idx_path}: unsupported MMIDIDX version {version}, expected 1")
    if code not in _SHARD_DTYPES:
        raise InputError(f"{idx_path}: unsupported dtype code {code}, expected one of {sorted(_SHARD_DTYPES)}")
    need = _MMIDIDX_HEADER.size + 12 * count
    if len(raw) < need:
        raise InputError(f"{idx_path}: {len(raw)} bytes, but {count} items need at least {need}")
    import numpy as np

    dtype, sep = np.dtype(_SHARD_DTYPES[code][0]), _SHARD_DTYPES[code][1]
    sizes = np.frombuffer(raw, dtype="<i4", count=count, offset=_MMIDIDX_HEADER.size)
    pointers = np.frombuffer(raw, dtype="<i8", count=count, offset=_MMIDIDX_HEADER.size + 4 * count)
    # doc_idx (document boundaries) is not needed: every item is one prompt/response pair.
    return dtype, sep, sizes, pointers


def read_token_shards(prefix: str | Path, limit: int | None = None, vocab_size: int | None = None) -> list[TokenRecord]:
    """Read a MiniLLM/Megatron MMIDIDX token shard pair ``prefix + ".idx"`` / ``prefix + ".bin"``.

    Each item is ``prompt ids, separator, response ids, eos``. The separator is 65535 in uint16 shards and -1 in
    int32 shards. The final token (the writer's eos) is dropped from ``response_ids``;
    :func:`adakd.data.build_examples` appends the tokenizer's eos instead.

    The shards hold ids of the tokenizer that wrote them, and carry no trace of it. Given ``vocab_size`` (the length
    of the tokenizer that will train on them), every prompt and response id must be one of its ids,
    ``0 .. vocab_size - 1``: an id beyond is a sure sign of another tokenizer (an embedding lookup would fail at the
    first step, or a larger vocabulary would train on ids that mean other tokens);
    :func:`adakd.data.check_shard_tokenizer` compares the writer's tokenizer itself, when it is known.

    Returns at most ``limit`` :class:`TokenRecord`, in shard order. Only the ``.bin`` bytes those items need are read.

    Raises:
        InputError: a file that is missing or not an MMIDIDX pair, an item without a separator, or an id outside
            ``vocab_size``; the message names the file (and the item, counted from 0).
    """
    _check_limit(limit)
    prefix = str(prefix)
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    dtype, sep, sizes, pointers = _read_mmidx_index(idx_path)
    n = len(sizes) if limit is None else min(limit, len(sizes))
    if n == 0:
        return []
    import numpy as np

    sizes, pointers = sizes[:n].astype(np.int64), pointers[:n]
    if (pointers % dtype.itemsize).any() or (sizes < 0).any() or (pointers < 0).any():
        raise InputError(f"{idx_path}: negative or misaligned sizes/pointers for {dtype} tokens")
    end = int((pointers + sizes * dtype.itemsize).max())
    available = input_file(bin_path).stat().st_size
    if end > available:
        raise InputError(f"{bin_path}: {available} bytes, but the index points up to byte {end}")
    tokens = np.fromfile(bin_path, dtype=dtype, count=end // dtype.itemsize)
    starts, stops = (pointers // dtype.itemsize).tolist(), (pointers // dtype.itemsize + sizes).tolist()
    return [_split_item(tokens[starts[i] : stops[i]], sep, bin_path, i, vocab_size) for i in range(n)]


def _split_item(item: np.ndarray, sep: int, bin_path: Path, i: int, vocab_size: int | None = None) -> TokenRecord:
    """Item ``i`` of the shard (``prompt, sep, response, eos``) as a :class:`TokenRecord` without the eos, its ids
    checked to be below ``vocab_size`` when given."""
    import numpy as np

    hits = np.flatnonzero(item == sep)
    if hits.size == 0:
        raise InputError(f"{bin_path}: item {i} has no separator {sep}")
    k = int(hits[0])
    if k + 1 >= len(item):
        raise InputError(f"{bin_path}: item {i} ends at the separator (expected response tokens and an eos)")
    prompt, response = item[:k], item[k + 1 : -1]
    if vocab_size is not None:
        for part in (prompt, response):
            if part.size and (int(part.min()) < 0 or int(part.max()) >= vocab_size):
                bad = int(part[(part < 0) | (part >= vocab_size)][0])
                raise InputError(
                    f"{bin_path}: item {i} holds the token id {bad}, which the tokenizer's {vocab_size} tokens do "
                    f"not have (ids 0 to {vocab_size - 1}): these shards were written by another tokenizer"
                )
    return TokenRecord(prompt_ids=prompt.tolist(), response_ids=response.tolist())
