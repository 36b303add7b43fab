"""A cache shard's file: the sha256 of its tensors, and its safetensors header read and checked without loading the
tensors (a truncated or foreign file is refused before anything trusts it). The folder's layout and the manifest are
:mod:`.format`'s, which re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SHARD_META", "ShardHeader", "read_shard_header", "shard_problem", "tensors_sha256"]

SHARD_META = "adakd"  # the safetensors metadata key of a shard's own description (JSON)
READ_BYTES = 1 << 22  # how much of a file one read takes (for its sha256)

# safetensors' dtype codes of the dtypes a shard stores.
_CODES = {"uint16": "U16", "int32": "I32", "int64": "I64", "float16": "F16", "float32": "F32"}
_ITEMSIZE = {"U16": 2, "I32": 4, "I64": 8, "F16": 2, "F32": 4}
_MAX_HEADER = 1 << 27


def _digest_entry(h: Any, name: str, code: str, shape: list[int]) -> None:
    h.update(json.dumps([name, code, list(shape)]).encode())


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """The sha256 of a shard's tensors (names in order, each with its dtype, shape and little-endian bytes): computed
    from the arrays when the shard is written, and from the file by :meth:`ShardHeader.tensors_sha256`."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], dtype=tensors[name].dtype.newbyteorder("<"))
        _digest_entry(h, name, _CODES[array.dtype.name], list(array.shape))
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()


class ShardHeader:
    """A shard file's safetensors header, read and checked against the file's size (:func:`read_shard_header`).

    ``tensors``: name → ``(dtype code, shape, (start, end))``, offsets in the data section; ``meta``: the shard's own
    description (the ``adakd`` metadata, a dict) or None for a shard written without one; ``data_start``: where the
    data section begins; ``size``: the file's size in bytes.
    """

    def __init__(self, path: Path, tensors: dict[str, tuple], meta: dict[str, Any] | None, data_start: int, size: int):
        self.path, self.tensors, self.meta, self.data_start, self.size = path, tensors, meta, data_start, size

    def tensors_sha256(self) -> str:
        """:func:`tensors_sha256` of the tensors as the file holds them (one read of the data section)."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for name in sorted(self.tensors):
                code, shape, (start, end) = self.tensors[name]
                _digest_entry(h, name, code, shape)
                f.seek(self.data_start + start)
                left = end - start
                while left > 0:
                    block = f.read(min(left, READ_BYTES))
                    if not block:
                        break
                    h.update(block)
                    left -= len(block)
        return h.hexdigest()


def read_shard_header(path: str | os.PathLike) -> ShardHeader:
    """The header of the shard file ``path``, without reading its tensors.

    Raises:
        OSError: the file cannot be read.
        ValueError: what is wrong, as a phrase (``truncated: ...``, ``not a safetensors file ...``): the file is not
            a whole safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER):
            raise ValueError(f"not a whole safetensors file ({size} bytes; truncated?)")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (its header is not a JSON object)")
    meta_raw = header.pop("__metadata__", None)
    meta = None
    if isinstance(meta_raw, dict) and SHARD_META in meta_raw:
        try:
            meta = json.loads(meta_raw[SHARD_META])
        except (TypeError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            raise ValueError(f"its {SHARD_META!r} header is not a JSON object")
    tensors, end = {}, 0
    for name, info in header.items():
        ok = isinstance(info, dict) and info.get("dtype") in _ITEMSIZE
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
        nbytes = _ITEMSIZE[info["dtype"]] * int(np.prod(shape, dtype=np.int64)) if ok else -1
        if not ok or not 0 <= offsets[0] <= offsets[1] or offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"not a safetensors file (the header entry of {name!r} is malformed)")
        tensors[name] = (info["dtype"], shape, (offsets[0], offsets[1]))
        end = max(end, offsets[1])
    if size != 8 + length + end:
        raise ValueError(f"{size} bytes where its header describes {8 + length + end} (truncated?)")
    return ShardHeader(path, tensors, meta, 8 + length, size)


def shard_problem(
    header: ShardHeader,
    *,
    top_k: int,
    id_dtype: str | None,
    logprob_dtype: str | None,
    examples: int,
    positions: int,
) -> tuple[str, Any, Any] | None:
    """``(field, expected, found)`` of the first way a shard's tensors differ from what a cache says it holds, None
    when they agree. Fields: ``tensors`` (their names and shapes), ``top_k`` (tokens per row), ``positions`` (rows),
    ``examples`` (from the offsets), ``id_dtype``, ``logprob_dtype`` (not checked when None)."""
    t = header.tensors
    want = ["ids", "logprobs", "offsets", "tail"]
    if sorted(t) != want:
        return "tensors", want, sorted(t)
    ids, lp, tail, offsets = t["ids"], t["logprobs"], t["tail"], t["offsets"]
    if len(ids[1]) != 2 or len(lp[1]) != 2 or len(tail[1]) != 1 or len(offsets[1]) != 1:
        return "tensors", "ids [P, k], logprobs [P, k], tail [P], offsets [E + 1]", "other shapes"
    if ids[1][1] != top_k or lp[1][1] != top_k:
        return "top_k", top_k, ids[1][1] if ids[1][1] != top_k else lp[1][1]
    rows = [n for n in (ids[1][0], lp[1][0], tail[1][0]) if n != positions]
    if rows:
        return "positions", positions, rows[0]
    if offsets[1][0] != examples + 1:
        return "examples", examples, offsets[1][0] - 1
    if id_dtype is not None and ids[0] != _CODES.get(id_dtype):
        return "id_dtype", id_dtype, _name(ids[0])
    if logprob_dtype is not None and lp[0] != _CODES.get(logprob_dtype):
        return "logprob_dtype", logprob_dtype, _name(lp[0])
    if tail[0] != "F32" or offsets[0] != "I64":
        return "tensors", "tail float32, offsets int64", f"tail {_name(tail[0])}, offsets {_name(offsets[0])}"
    return None


def _name(code: str) -> str:
    return {v: k for k, v in _CODES.items()}.get(code, code)
