"""Calibration text for pruning: a JSONL file's records, tokenised as training tokenises them, and cut into batches.

Every format training reads from a JSONL file works (:data:`adakd.data.FORMATS`, detected from the first record):
chat ``messages`` (through the tokenizer's chat template, the assistant turns labelled), MiniLLM ``prompt`` +
``output``, TRL ``prompt`` + ``completion``, dolly-style ``instruction`` + ``response``. The prompt and response go
in together, as training sees them; the scores weigh every token, the response-only CE the labelled ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..data.chat import chat_example, resolve_chat_template
from ..data.examples import DistillCollator, response_example
from ..data.hf import _prompt_completion, detect_format
from ..data.readers import instruction_record, minillm_record
from ..errors import InputError
from ..files import iter_jsonl

__all__ = ["batches", "read_calibration"]


def read_calibration(
    path: str,
    tokenizer: Any,
    *,
    limit: int,
    max_length: int,
    label: str = "--calibration",
    tokenizer_name: str | None = None,
) -> list[dict[str, list[int]]]:
    """The first ``limit`` records of the JSONL file ``path``, each ``{"input_ids", "labels"}`` (equal lengths,
    labels -100 off the trained tokens, unshifted) cut to its first ``max_length`` tokens.

    Raises:
        InputError: a missing file, a bad line (``--calibration FILE:LINE: ...``), a record that does not fit the
            first record's format, a tokenizer without the chat template a conversation needs; or no records.
    """
    rows = list(iter_jsonl(path, label, limit))
    if not rows:
        raise InputError(f"{label} {path}: no records")
    where, first = rows[0]
    data_format = detect_format(first, where)
    conversational = data_format == "messages" or (
        data_format == "prompt_completion" and isinstance(first.get("prompt"), list)
    )
    template = resolve_chat_template(tokenizer, None, data_format, tokenizer_name) if conversational else None
    if not conversational and tokenizer.eos_token_id is None:
        raise InputError(f"{tokenizer_name or 'the tokenizer'}: no eos token, which ends each calibration response")
    examples = []
    for where, row in rows:
        ids, labels = _encode(row, where, tokenizer, data_format, conversational, template)
        examples.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return examples


def _encode(
    row: Mapping[str, Any], where: str, tokenizer: Any, data_format: str, conversational: bool, template: str | None
) -> tuple[list[int], list[int]]:
    """One record's ``(input_ids, labels)``, as :func:`adakd.data.tokenize_rows` makes them for training."""
    if data_format == "messages":
        if row.get("messages") is None:
            raise InputError(f"{where}: missing 'messages' (the first record's format)")
        return chat_example(row["messages"], tokenizer, template, where=where)
    if data_format == "prompt_completion":
        return _prompt_completion(row, tokenizer, conversational, template, where)
    record = minillm_record(row, where) if data_format == "minillm" else instruction_record(row, "minillm", where)
    prompt = tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
    response = tokenizer(record.response, add_special_tokens=False)["input_ids"]
    return response_example(prompt, response, tokenizer.eos_token_id)


def batches(examples: list[dict[str, list[int]]], batch_size: int, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """``examples`` in order, ``batch_size`` at a time, right-padded: ``input_ids``, ``attention_mask``, ``labels``
    [B, T] each (:class:`adakd.data.DistillCollator`)."""
    collate = DistillCollator(pad_token_id)
    return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
