"""Computing one shard of the teacher cache: the teacher over consecutive examples, its top-k at every supervised
position (:func:`adakd.sparse.sparse_from_logits`), written atomically.

Only the supervised rows of the last hidden state go through the lm_head, in chunks, when the teacher's logits are
``hidden @ lm_headᵀ (+ b)`` (:func:`adakd.train.engines.check_linear_head`): a [B, T, V] logits tensor is never made
for a large vocabulary. Other teachers (soft-capped logits, ...) run whole and their logits rows are selected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write
from ..fused import teacher_top_k
from ..sparse import SparseTeacher
from .format import IGNORE_INDEX, SHARD_META, tensors_sha256

__all__ = ["LinearHead", "compute_shard", "linear_head", "student_vocab_rows", "teacher_rows", "write_shard"]


class LinearHead:
    """A teacher whose logits are ``lm_head(decoder(...).last_hidden_state)``: the two parts, called apart."""

    def __init__(self, decoder: torch.nn.Module, head: torch.nn.Module) -> None:
        self.decoder, self.head = decoder, head


def linear_head(model: torch.nn.Module) -> LinearHead | None:
    """The teacher's decoder and lm_head when its logits are the plain product (checked on a probe sequence), else
    None (the whole model runs)."""
    from ..errors import ConfigError
    from ..train.engines import check_linear_head, unwrap

    try:
        check_linear_head(model, "teacher")
    except ConfigError:
        return None
    base = unwrap(model)
    return LinearHead(base.get_decoder(), base.get_output_embeddings())


def vocab_rows(model: torch.nn.Module) -> int:
    """V_t: the teacher's lm_head rows (its logits' width), padding rows included."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def student_vocab_rows(section: Any) -> int:
    """V_s: the student's lm_head rows, read from the config of the ``student`` section ``section`` (inline, or
    ``config.json`` of ``student.name_or_path``, or of the base model when that is a LoRA adapter) without loading its
    weights. The cache keeps the teacher's distribution over these rows, as training crops a live teacher to them
    (:func:`adakd.align_vocab`).

    Raises:
        ConfigError: under ``student.config`` / ``student.name_or_path``, a config that cannot be read.
    """
    from transformers import AutoConfig

    from ..errors import ConfigError
    from ..models import adapter_config

    if section.config is not None:
        cfg = dict(section.config)
        try:
            return int(AutoConfig.for_model(cfg.pop("model_type"), **cfg).vocab_size)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"student.config: {e}") from e
    if section.gguf_file is not None:  # the config stored in the GGUF file (its header, not its weights)
        from ..train.models import gguf_location

        path, gguf_file = gguf_location(section, "student")
        try:
            return int(AutoConfig.from_pretrained(path, gguf_file=gguf_file).vocab_size)
        except (OSError, ValueError) as e:
            raise ConfigError(f"student.gguf_file: cannot read the config of {gguf_file!r} ({e})") from e
    path = section.name_or_path
    adapter = adapter_config(path)
    if adapter is not None and adapter.get("base_model_name_or_path"):
        path = adapter["base_model_name_or_path"]
    keys = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only")
    kwargs = {key: section.model_kwargs[key] for key in keys if key in section.model_kwargs}
    try:
        return int(AutoConfig.from_pretrained(path, **kwargs).vocab_size)
    except (OSError, ValueError) as e:
        raise ConfigError(f"student.name_or_path: cannot read the config of {path!r} ({e})") from e


@torch.no_grad()
def teacher_rows(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], k: int, head: LinearHead | None, width: int | None = None
) -> SparseTeacher:
    """The teacher's top-k at every supervised position of a right-padded batch, flat ``[N]`` in row-major (example,
    position) order: position t of example b when ``labels[b, t + 1] != -100``.

    Args:
        model: the teacher, in eval mode.
        batch: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (a :class:`adakd.data.DistillCollator` batch).
        k: the support size.
        head: :func:`linear_head`'s parts, or None to run the whole model.
        width: keep the first ``width`` logits (the student's vocabulary; the teacher's rows beyond are padding,
            dropped as :func:`adakd.align_vocab` drops them); default all.

    Returns:
        A :class:`SparseTeacher` with ``ids`` ``[N, k]``, ``logprobs`` ``[N, k]`` and ``tail`` ``[N]`` (float32).
    """
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    supervised = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device)  # [B, T − 1]: position t predicts t + 1
    width = width or vocab_rows(model)
    if head is None:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][supervised]
        return teacher_top_k(logits, k, width=width)
    hidden = head.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    # [N, H] rows through the lm_head's own parameters, a chunk of logits at a time (the one chunk loop of adakd.fused)
    return teacher_top_k(hidden[:, :-1][supervised], k, weight=head.head.weight, bias=head.head.bias, width=width)


def compute_shard(
    rows: Callable[[dict[str, torch.Tensor]], SparseTeacher],
    examples: Any,
    first: int,
    count: int,
    *,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int,
    id_dtype: str,
    logprob_dtype: str,
    progress: Any = None,
) -> dict[str, np.ndarray]:
    """The tensors of the shard holding examples ``first .. first + count − 1``: ``ids``, ``logprobs``, ``tail`` and
    ``offsets`` (see :mod:`adakd.cache.format`). Batches are consecutive examples of the shard, right-padded by
    ``collate``, so that computing a shard again gives the same bytes.

    ``rows``: the teacher, as a function of a batch (``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``) to its
    top-k at the supervised positions, flat ``[N, k]`` in row-major order: :func:`teacher_rows` of a model, or a
    served teacher's :meth:`adakd.serving.TeacherServer.rows`.
    """
    ids, logprobs, tails = [], [], []
    offsets = np.zeros(count + 1, dtype=np.int64)
    for start in range(first, first + count, batch_size):
        stop = min(start + batch_size, first + count)
        batch = collate([examples[i] for i in range(start, stop)])
        sparse = rows(batch)
        per_example = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).numpy()
        offsets[start - first + 1 : stop - first + 1] = per_example
        ids.append(sparse.ids.cpu().numpy().astype(id_dtype))
        logprobs.append(sparse.logprobs.float().cpu().numpy().astype(logprob_dtype))
        tails.append(sparse.tail.float().cpu().numpy())
        if progress is not None:
            progress.update(stop - start)
    np.cumsum(offsets, out=offsets)
    return {
        "ids": np.ascontiguousarray(np.concatenate(ids)),
        "logprobs": np.ascontiguousarray(np.concatenate(logprobs)),
        "tail": np.ascontiguousarray(np.concatenate(tails).astype(np.float32)),
        "offsets": offsets,
    }


def write_shard(path: str | os.PathLike, tensors: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> int:
    """Write a shard atomically (a temporary file in the same folder, flushed to disk, then renamed over ``path``);
    returns its size in bytes. ``meta`` (the plan and the shard's place, see :mod:`adakd.cache.format`) goes into the
    safetensors header with the sha256 of the tensors (:func:`~adakd.cache.format.tensors_sha256`). Nothing in it
    varies between runs: the same tensors and ``meta`` give the same bytes.

    Raises:
        OSError: the file cannot be written (a full disk, a read-only file system, ...); the temporary file is
            deleted and ``path`` is left as it was.
    """
    from safetensors.numpy import save

    metadata = None
    if meta is not None:
        described = {**meta, "tensors_sha256": tensors_sha256(tensors)}
        metadata = {SHARD_META: json.dumps(described, sort_keys=True, separators=(",", ":"))}
    payload = save(tensors, metadata=metadata)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
    _fsync_folder(Path(path).parent)
    return len(payload)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
