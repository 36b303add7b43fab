"""Data pipeline: MiniLLM/DistiLLM instruction data -> prompt-masked training examples -> padded batches.

Sources (:mod:`.readers`) give :class:`Record` (text) or :class:`TokenRecord` (MiniLLM token shards);
:func:`build_examples` tokenizes them with MiniLLM's length policy; :class:`DistillCollator` pads a batch.
``datasets`` and ``transformers`` are imported only by the functions that need them.
"""

from __future__ import annotations

from .examples import DistillCollator, build_examples, tokenizer_for
from .readers import (
    Record,
    TokenRecord,
    load_hf_dataset,
    read_instruction_jsonl,
    read_minillm_jsonl,
    read_token_shards,
    synthetic_instructions,
)
from .templates import TEMPLATES, format_prompt

__all__ = [
    "TEMPLATES",
    "DistillCollator",
    "Record",
    "TokenRecord",
    "build_examples",
    "format_prompt",
    "load_hf_dataset",
    "read_instruction_jsonl",
    "read_minillm_jsonl",
    "read_token_shards",
    "synthetic_instructions",
    "tokenizer_for",
]
