"""Hugging Face ``datasets`` as users pass them, in any supported record format, tokenised with ``Dataset.map``.

Where rows come from (:func:`load_rows`, in :mod:`.hf_load` and importable from here): a hub id or a local dataset
folder, a folder written by ``Dataset.save_to_disk``, or local data files (``.json``/``.jsonl``, ``.parquet``,
``.arrow``, ``.csv``); streamed (``streaming=True``) or not.

What a row is (:data:`FORMATS`, detected from the first row when not given, :func:`detect_format`):

- ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (TRL's conversational format); every
  assistant turn is trained on, through the chat template (:mod:`.chat`);
- ``prompt_completion``: TRL's prompt-completion format, standard (``prompt`` and ``completion`` strings, used as
  they are) or conversational (``prompt`` a list of turns, ``completion`` the assistant turn(s), the only ones
  trained on);
- ``minillm``: a formatted ``prompt`` and an ``output`` (str or list of references);
- ``instructions``: raw dolly-style ``instruction``, ``context``/``input``, ``response``/``output``.

Other columns are ignored. :func:`tokenize_rows` tokenises with ``map``, so that the result is cached by ``datasets``
and a second process (or a second run) reads it instead of tokenising again.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .chat import CHAT_TEMPLATES, chat_example, resolve_chat_template, template_label
from .examples import check_lengths, count_outcomes, fit_example, response_example
from .hf_load import FILE_BUILDERS, dataset_builder, load_rows
from .readers import Record, instruction_record, minillm_record, record_from_row
from .templates import TEMPLATES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "FILE_BUILDERS",
    "FORMATS",
    "ExampleStream",
    "TokenizedData",
    "dataset_builder",
    "detect_format",
    "load_hf_dataset",
    "load_rows",
    "tokenize_rows",
]

FORMATS = ("messages", "prompt_completion", "minillm", "instructions")


def detect_format(row: Mapping[str, Any], where: str) -> str:
    """The format of a row (one of :data:`FORMATS`), from the columns it fills.

    Raises:
        InputError: a row that fits no format; the message lists what each format needs and the row's columns.
    """
    filled = {key for key, value in row.items() if value is not None}
    if "messages" in filled:
        return "messages"
    if {"prompt", "completion"} <= filled:
        return "prompt_completion"
    if {"prompt", "output"} <= filled:
        return "minillm"
    if "instruction" in filled:
        return "instructions"
    columns = ", ".join(repr(k) for k in sorted(filled)) or "none"
    raise InputError(
        f"{where}: fits no data format: needs 'messages' (messages), 'prompt' and 'completion' (prompt_completion), "
        f"'prompt' and 'output' (minillm) or 'instruction' and 'response' (instructions); its columns: {columns}"
    )


@dataclass
class TokenizedData:
    """What :func:`tokenize_rows` made of a dataset.

    ``examples``: a ``datasets.Dataset`` (``IterableDataset`` when streaming) of ``input_ids`` and ``labels`` (lists,
    equal lengths, labels -100 where nothing is trained, unshifted). ``counts``: the length policy's counts, as
    :func:`adakd.data.build_examples` reports them (``None`` for a stream, which is read only as it trains).
    ``format``: the rows' format. ``chat_template``: the Jinja text the conversations were rendered with, or ``None``.
    """

    examples: Any
    counts: dict[str, int] | None
    format: str
    chat_template: str | None


def tokenize_rows(
    rows: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_format: str | None = None,
    template: str | None = None,
    max_length: int = 512,
    max_prompt_length: int = 256,
    where: str = "data",
    tokenizer_name: str | None = None,
) -> TokenizedData:
    """Tokenise a dataset's rows into training examples with ``map`` (cached by ``datasets``; lazy for a stream).

    Args:
        rows: a ``datasets.Dataset`` or ``IterableDataset`` (:func:`load_rows`).
        tokenizer: the student's tokenizer; teacher and student both read the ids made here.
        data_format: one of :data:`FORMATS`; ``None`` detects it from the first row.
        template: instruction rows: ``"minillm"`` (default) or ``"qwen2"``; conversations: ``None`` (the tokenizer's
            chat template), ``"qwen2"`` or a Jinja file (:func:`adakd.data.chat.resolve_chat_template`). Minillm rows
            and standard prompt/completion strings are used as they are and take no template.
        max_length, max_prompt_length: MiniLLM's length policy (:func:`adakd.data.fit_example`).
        where: names the dataset in messages (``"train.parquet (train)"``); a row adds ``row <index>``.
        tokenizer_name: where the tokenizer came from, for the message about a missing chat template.

    Raises:
        InputError: no rows to detect the format from, a row that fits no format or misses what its format needs
            (named by its index), a template that does not apply to the format.
    """
    check_lengths(max_length, max_prompt_length)
    if data_format is not None and data_format not in FORMATS:
        raise InputError(f"unknown data format {data_format!r}; valid: {', '.join(FORMATS)}")
    try:
        first = next(iter(rows), None)
    except UnicodeDecodeError as e:  # a local data file's bad bytes are caught by load_rows with their line
        raise InputError(f"{where} row 0: {_not_utf8(e)}") from None
    if data_format is None:
        if first is None:
            raise InputError(f"{where}: no records")
        data_format = detect_format(first, f"{where} row 0")
    conversational = data_format == "messages" or (
        data_format == "prompt_completion" and first is not None and isinstance(first.get("prompt"), list)
    )
    chat_template = None
    if conversational:
        chat_template = resolve_chat_template(tokenizer, template, data_format, tokenizer_name)
    else:
        _check_record_template(data_format, template)
        if tokenizer.eos_token_id is None:
            raise InputError("tokenizer has no eos_token_id; load it with adakd.data.tokenizer_for or set eos_token")
    import datasets

    encode = functools.partial(
        _encode_row,
        code=_code_digest(),
        tokenizer=tokenizer,
        data_format=data_format,
        conversational=conversational,
        chat_template=chat_template,
        template=template or "minillm",
        label=template_label(template, tokenizer_name),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        where=where,
    )
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int64")),
            "labels": datasets.Sequence(datasets.Value("int64")),
            "outcome": datasets.Value("string"),
        }
    )
    streaming = isinstance(rows, datasets.IterableDataset)
    # A stream may not know its columns before it is read; the output keeps only the new ones either way.
    kwargs: dict[str, Any] = {"with_indices": True, "remove_columns": rows.column_names, "features": features}
    if not streaming:
        kwargs["desc"] = "adakd: tokenising"
    mapped = rows.map(encode, **kwargs).select_columns(["input_ids", "labels", "outcome"])
    counts = None if streaming else count_outcomes(mapped["outcome"])
    kept = mapped.filter(_trained, input_columns="outcome", **({} if streaming else {"desc": "adakd: length policy"}))
    return TokenizedData(kept.remove_columns("outcome"), counts, data_format, chat_template)


def _check_record_template(data_format: str, template: str | None) -> None:
    """Record formats take an instruction template (instructions) or none (minillm, standard prompt/completion)."""
    if template is None:
        return
    if data_format == "instructions":
        if template not in TEMPLATES:
            raise InputError(
                f"data.template: {template} is a chat template, which formats conversations; instruction records "
                f"take an instruction template: {', '.join(TEMPLATES)}"
            )
        return
    if data_format == "minillm" and template == "minillm":
        return
    shown = template if template in TEMPLATES or template in CHAT_TEMPLATES else f"{template} (a Jinja file)"
    raise InputError(
        f"data.template: {shown} does not apply to data.format {data_format}, whose prompts are used as they are"
    )


@functools.cache
def _code_digest() -> str:
    """A digest of this package's source. ``datasets`` fingerprints a module's function by its name alone, so a cached
    map would otherwise outlive a change to how adakd tokenises rows (an upgrade, a checkout)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _trained(outcome: str) -> bool:
    """Whether the length policy kept an example (``datasets.filter`` predicate)."""
    return outcome in ("kept", "truncated")


def _encode_row(
    row: Mapping[str, Any],
    index: int,
    *,
    tokenizer: PreTrainedTokenizerBase,
    data_format: str,
    conversational: bool,
    chat_template: str | None,
    template: str,
    label: str,
    max_length: int,
    max_prompt_length: int,
    where: str,
    code: str,
) -> dict[str, Any]:
    """One row -> ``{"input_ids", "labels", "outcome"}`` (``datasets.map`` function; skipped rows are empty).

    ``code`` (:func:`_code_digest`) is not used: it is in the arguments for ``datasets``' cache fingerprint only.
    """
    at = f"{where} row {index}"
    try:
        ids, labels = _row_example(
            row,
            tokenizer,
            data_format,
            conversational=conversational,
            chat_template=chat_template,
            template=template,
            label=label,
            max_length=max_length,
            at=at,
        )
    except UnicodeDecodeError as e:  # a string column that is not UTF-8 (Arrow decodes it only when it is read)
        raise InputError(f"{at}: {_not_utf8(e)}") from None
    ids, labels, outcome = fit_example(ids, labels, max_length, max_prompt_length)
    return {"input_ids": ids, "labels": labels, "outcome": outcome}


def _not_utf8(e: UnicodeDecodeError) -> str:
    """A string that is not UTF-8, as the JSONL readers say it (``byte N`` counts from 1, in the string here)."""
    return f"not UTF-8 (byte {e.start + 1} of a string: {e.reason})"


def _row_example(
    row: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    data_format: str,
    *,
    conversational: bool,
    chat_template: str | None,
    template: str,
    label: str,
    max_length: int,
    at: str,
) -> tuple[list[int], list[int]]:
    """One row's ``(input_ids, labels)`` before the length policy."""
    if data_format == "messages":
        if row.get("messages") is None:
            raise InputError(f"{at}: missing 'messages' (data.format messages)")
        return chat_example(
            row["messages"], tokenizer, chat_template, where=f"{at}: 'messages'", max_length=max_length, label=label
        )
    if data_format == "prompt_completion":
        return _prompt_completion(row, tokenizer, conversational, chat_template, at, label, max_length)
    if data_format == "minillm":
        record = minillm_record(row, at)
    else:
        record = instruction_record(row, template, at)
    return _text_pair(tokenizer, record.prompt, record.response)


def _prompt_completion(
    row: Mapping[str, Any],
    tokenizer: Any,
    conversational: bool,
    chat_template: str | None,
    at: str,
    label: str = "the chat template",
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """TRL's prompt-completion row: conversational (lists of turns, only the completion trained) or standard
    (strings, tokenised as a MiniLLM prompt and response are)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    for key, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise InputError(f"{at}: missing {key!r} (data.format prompt_completion)")
    if conversational:
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise InputError(f"{at}: 'prompt' and 'completion' must both be lists of turns, as in the first row")
        return chat_example(
            [*prompt, *completion],
            tokenizer,
            chat_template,
            train_from=len(prompt),
            where=at,
            max_length=max_length,
            label=label,
        )
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise InputError(f"{at}: 'prompt' and 'completion' must both be strings, as in the first row")
    if not completion.strip():
        raise InputError(f"{at}: key 'completion': empty response")
    return _text_pair(tokenizer, prompt, completion)


def _text_pair(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """A prompt and a response, tokenised apart as :func:`adakd.data.build_examples` does, plus the eos."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return response_example(prompt_ids, response_ids, tokenizer.eos_token_id)


@dataclass
class ExampleStream:
    """Tokenised examples read as a stream (``data.streaming``), for a run with a fixed number of steps.

    ``dataset`` is the ``datasets.IterableDataset`` the Trainer iterates (it has no length, so the Trainer runs
    ``max_steps`` and starts the stream over when it ends). ``len()`` is what one process trains on in that run,
    ``max_steps × per_device_train_batch_size × gradient_accumulation_steps`` examples, for code that sizes a run
    from its example count; nothing is read to compute it.
    """

    dataset: Any
    examples_per_process: int

    def __len__(self) -> int:
        return self.examples_per_process


def load_hf_dataset(
    name: str, split: str = "train", template: str = "minillm", limit: int | None = None, label: str | None = None
) -> list[Record]:
    """Load a Hugging Face dataset and map its rows like the JSONL readers (see :func:`record_from_row`).

    ``name`` is anything :func:`adakd.data.hf.load_rows` loads: a hub id (e.g.
    ``"databricks/databricks-dolly-15k"``), a local dataset folder, or local data files (``"json:<path>"``,
    ``"data.parquet"``, ...; their split is ``"train"``). Returns at most ``limit`` records. Conversations (the
    chat formats) are not records: :func:`adakd.data.tokenize_rows` tokenises those.

    Raises:
        InputError: the dataset or split cannot be loaded (missing files, an unknown hub id or split, no network;
            ``datasets``' error is chained), or a row lacks the fields. A load failure names ``label`` first (the
            key or flag ``name`` came from), when given.
    """
    rows = load_rows(name, split=split, limit=limit, label=label)
    return [record_from_row(row, template, f"{name} ({split}) row {i}") for i, row in enumerate(rows)]
