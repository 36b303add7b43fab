"""Data pipeline: instruction data and conversations -> prompt-masked training examples -> padded batches.

Sources (:mod:`.readers`; the synthetic tasks: :mod:`.synthetic`) give :class:`Record` (text) or :class:`TokenRecord`
(MiniLLM token shards); :func:`build_examples` tokenizes them with MiniLLM's length policy (:func:`fit_example`).
Hugging Face datasets and
local data files (:mod:`.hf_load`: :func:`load_rows`) in any of :data:`FORMATS` (TRL's conversational ``messages`` and
``prompt``/``completion``, MiniLLM, dolly instructions) are tokenised by :func:`tokenize_rows` with ``Dataset.map``;
conversations go through the chat template, trained on their assistant turns (:mod:`.chat`: :func:`chat_example`).
:class:`DistillCollator` pads a batch. ``datasets`` and ``transformers`` are imported only by the functions that need
them.
"""

from __future__ import annotations

from .chat import CHAT_TEMPLATES, chat_example
from .examples import DistillCollator, build_examples, check_shard_tokenizer, fit_example, tokenizer_for
from .hf import FORMATS, ExampleStream, TokenizedData, detect_format, load_hf_dataset, load_rows, tokenize_rows
from .readers import (
    Record,
    TokenRecord,
    read_instruction_jsonl,
    read_minillm_jsonl,
    read_token_shards,
)
from .synthetic import synthetic_instructions
from .templates import TEMPLATES, format_prompt

__all__ = [
    "CHAT_TEMPLATES",
    "FORMATS",
    "TEMPLATES",
    "DistillCollator",
    "ExampleStream",
    "Record",
    "TokenRecord",
    "TokenizedData",
    "build_examples",
    "chat_example",
    "check_shard_tokenizer",
    "detect_format",
    "fit_example",
    "format_prompt",
    "load_hf_dataset",
    "load_rows",
    "read_instruction_jsonl",
    "read_minillm_jsonl",
    "read_token_shards",
    "synthetic_instructions",
    "tokenize_rows",
    "tokenizer_for",
]
