"""A run's data: the configured records, tokenised into training examples (and the on-policy held-out set), and the
eval set read the same way. Each function takes the ``data`` section and the values it needs, not the whole config,
so that ``adakd cache`` builds the very examples ``adakd train`` builds."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from ..errors import ConfigError, InputError
from .config import DataSection, EvalSection

__all__ = ["ExampleDataset", "check_readable", "eval_dataset", "load_records", "rouge_examples", "training_examples"]


class ExampleDataset(torch.utils.data.Dataset):
    """Tokenised examples (``input_ids``, ``labels`` lists) for the Trainer's data loader: a list, or a
    ``datasets.Dataset`` (source ``hf``).

    Given an :class:`adakd.data.ExampleStream` (``data.streaming``), the constructor returns the stream's
    ``datasets.IterableDataset`` itself (as ``pathlib.Path(...)`` returns a ``PosixPath``): a stream cannot be
    indexed, and the Trainer iterates an ``IterableDataset`` as it comes.
    """

    def __new__(cls, examples: Any = None) -> Any:  # pickle (data-loader workers) calls it without arguments
        from ..data import ExampleStream

        if isinstance(examples, ExampleStream):
            return examples.dataset
        return super().__new__(cls)

    def __init__(self, examples: Any) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def _log(args: Any, message: str) -> None:
    """Print ``message`` once, on the main process."""
    if args.process_index == 0:
        print(f"[adakd] {message}", flush=True)


def load_records(d: DataSection, tokenizer: Any = None, *, named: bool = True) -> Any:
    """The records of the data section ``d``: text records (token records for MiniLLM shards), or for source ``hf``
    the dataset's rows (a ``datasets.Dataset``; an ``IterableDataset`` when streaming), which
    :func:`training_examples` tokenises.

    Token shards hold another tokenizer's ids as readily as the student's. Given ``tokenizer`` (the student's), they
    are checked against it before any model loads: ``data.shard_tokenizer`` (the tokenizer that wrote them) must
    give its tokens the same ids (:func:`adakd.data.check_shard_tokenizer`), and every id must be below the
    tokenizer's length (without ``data.shard_tokenizer``, the only check, which the run says).

    ``named``: a ``datasets`` source that cannot be loaded is named under ``data.path`` (False: left unnamed, for a
    caller that names it under its own key, as :func:`eval_dataset` does).

    Raises:
        ConfigError: a data file that is missing or unreadable, named under ``data.path``.
        InputError: a bad record or shard, named by its file and line or item (see :mod:`adakd.data.readers`), a
            ``datasets`` source that cannot be loaded, or shards written by another tokenizer than ``tokenizer``.
    """
    from .. import data

    if d.source == "synthetic":
        return data.synthetic_instructions(d.synthetic_size, seed=d.seed)
    if d.source == "hf":
        # data.path before data.name: an eval set's config (data.eval_path) sets path and keeps the name.
        spec, key = (d.path, "data.path" if named else None) if d.path else (d.name, "data.name")
        return data.load_rows(
            spec, config=d.config, split=d.split, revision=d.revision, streaming=d.streaming, limit=d.limit, label=key
        )
    for path in (d.path + ".idx", d.path + ".bin") if d.source == "shards" else (d.path,):
        check_readable("data.path", path)
    if d.source == "minillm_jsonl":
        return data.read_minillm_jsonl(d.path, limit=d.limit)
    if d.source == "instructions":
        return data.read_instruction_jsonl(d.path, template=d.template or "minillm", limit=d.limit)
    if tokenizer is None:
        return data.read_token_shards(d.path, limit=d.limit)
    if d.shard_tokenizer is not None:
        data.check_shard_tokenizer(d.shard_tokenizer, tokenizer)
    else:
        print(
            f"[adakd] data.shard_tokenizer is not set: the shards' ids are only checked to be below the student "
            f"tokenizer's {len(tokenizer)} (name the tokenizer that wrote them to check that they mean its tokens)",
            file=sys.stderr,
        )
    return data.read_token_shards(d.path, limit=d.limit, vocab_size=len(tokenizer))


def check_readable(key: str, path: str) -> None:
    """Open ``path`` once, so that a missing or unreadable data file is reported under its config key ``key`` (the
    readers name the file alone).

    Raises:
        ConfigError: ``key: path: no such file`` / ``key: path: cannot read (why)``, with ``key`` and ``reason`` (the
            message after the key) apart.
    """
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {path}: no such file", key=key, reason=f"{path}: no such file") from e
    except OSError as e:  # a directory, no permission, an I/O error
        why = e.strerror or e
        raise ConfigError(f"{key}: {path}: cannot read ({why})", key=key, reason=f"{path}: cannot read ({why})") from e


def training_examples(
    d: DataSection,
    args: Any,
    tokenizer: Any,
    *,
    holdout: int | None = None,
    tokenizer_name: str | None = None,
    named: bool = True,
) -> tuple[Any, list[Any]]:
    """``(train, held out)`` tokenised examples of the data section ``d``: the last ``holdout`` examples are held out
    for on-policy validation (DistiLLM's ``onpolicy.eval_examples``; None holds nothing out).

    ``train`` is a list of examples, or for source ``hf`` a ``datasets.Dataset`` tokenised with ``map`` (cached by
    ``datasets``), or an :class:`adakd.data.ExampleStream` when ``data.streaming``. Conversations are rendered with
    the student tokenizer's chat template, or the one ``data.template`` names, which then becomes the tokenizer's
    ``chat_template``: the tokenizer saved with the model formats conversations as the model was trained on them.
    ``args``: the run's ``TrainingArguments``; ``tokenizer_name``: where the tokenizer came from, for messages;
    ``named``: see :func:`load_records`.

    Raises:
        ConfigError: no example is left after tokenisation, or the held-out set would take them all.
        InputError: a record that fits no format or lacks what its format needs, or a chat format without a chat
            template (see :func:`adakd.data.tokenize_rows`).
    """
    from .. import data

    if d.source == "hf":
        # Several processes: the main one loads and tokenises first, filling the datasets cache, then the others
        # find the same map (same fingerprint) there instead of tokenising again.
        with args.main_process_first(desc="adakd: data"):
            made = data.tokenize_rows(
                load_records(d, named=named),
                tokenizer,
                data_format=d.format,
                template=d.template,
                max_length=d.max_length,
                max_prompt_length=d.max_prompt_length,
                where=f"{d.path or d.name} ({d.split})",
                tokenizer_name=tokenizer_name,
            )
        if made.chat_template is not None and d.template is not None:
            tokenizer.chat_template = made.chat_template
        _log(args, f"data: format {made.format}" + ("" if d.format else " (detected from the first record)"))
        examples, counts = made.examples, made.counts
        if counts is None:
            _log(args, "data: streamed; examples are tokenised as they are read (the length policy is not counted)")
            per_process = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
            return data.ExampleStream(examples, per_process), []
    else:
        records = load_records(d, tokenizer, named=named)
        examples, counts = data.build_examples(
            records, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length
        )
    _log(args, "data: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if not len(examples):
        reason = f"no example left after tokenisation ({counts})"
        raise ConfigError(f"data: no example left after tokenisation ({counts})", key="data", reason=reason)
    if holdout is None:
        return examples, []
    if holdout >= len(examples):
        raise ConfigError(f"onpolicy.eval_examples: {holdout} leaves no training example (of {len(examples)})")
    _log(args, f"on-policy: {holdout} examples held out for validation")
    if isinstance(examples, list):
        return examples[:-holdout], examples[-holdout:]
    cut = len(examples) - holdout
    return examples.select(range(cut)), [examples[i] for i in range(cut, len(examples))]


def eval_dataset(d: DataSection, args: Any, tokenizer: Any, *, tokenizer_name: str | None = None) -> Any:
    """The eval set for evaluation during training (``docs/training-eval.md``), or None without
    ``data.eval_path`` / ``data.eval_split``.

    The eval set is read and tokenised exactly as the training data: :func:`training_examples` runs on the data
    section with ``path``, ``split`` and ``limit`` replaced by ``data.eval_path`` (else ``data.path``),
    ``data.eval_split`` (else ``data.split``) and ``data.eval_limit``, never streamed, and nothing held out for
    on-policy validation.

    Raises:
        ConfigError: an eval file that is missing, unreadable, malformed or left without an example, named under
            its key.
    """
    if d.eval_path is None and d.eval_split is None:
        return None
    key = "data.eval_path" if d.eval_path is not None else "data.eval_split"
    # Never streamed: evaluation passes over the same set every time (data.eval_limit bounds it).
    section = dataclasses.replace(
        d, path=d.eval_path or d.path, split=d.eval_split or d.split, limit=d.eval_limit, streaming=False
    )
    try:
        # named=False: datasets' load errors leave data.path out, to be named under ``key`` here.
        examples, _ = training_examples(section, args, tokenizer, tokenizer_name=tokenizer_name, named=False)
    except InputError as e:
        # An error the readers name under the training data's key (data.path, data) is this set's, under ``key``.
        ours = isinstance(e, ConfigError) and e.key in ("data.path", "data") and e.reason is not None
        reason = e.reason if ours else str(e)
        raise ConfigError(f"{key}: {reason}", key=key, reason=reason) from e
    _log(args, f"eval set: {len(examples)} examples ({key}: {d.eval_path or d.eval_split})")
    return ExampleDataset(examples)


def rouge_examples(ev: EvalSection, d: DataSection) -> tuple[Any, Any] | None:
    """``(eval set, generation config)`` for ROUGE-L during training (``eval.rouge_every``), read by ``adakd eval``'s
    own loader; None when off. Generation lengths default to the data section's.

    Raises:
        ConfigError: the eval extra is missing, or ``eval.rouge_examples`` is missing, unreadable, malformed or
            empty; at start, not at the first scoring step.
    """
    if ev.rouge_every <= 0:
        return None
    import importlib.util
    from pathlib import Path

    from ..eval.sets import load_eval_set
    from ..generation import GenerationConfig

    if importlib.util.find_spec("rouge_score") is None:  # at start, not at the first scoring step
        raise ConfigError("eval.rouge_every: ROUGE-L needs the eval extra: pip install 'adakd[eval]'")
    check_readable("eval.rouge_examples", ev.rouge_examples)
    path = Path(ev.rouge_examples)
    try:
        eval_set = load_eval_set(path.stem, path, limit=ev.rouge_limit)
    except InputError as e:
        raise ConfigError(f"eval.rouge_examples: {e}") from e
    if not eval_set.records:
        raise ConfigError(f"eval.rouge_examples: {path}: no record")
    generation = GenerationConfig(
        max_length=d.max_length if ev.max_length is None else ev.max_length,
        max_prompt_length=d.max_prompt_length if ev.max_prompt_length is None else ev.max_prompt_length,
        greedy=ev.greedy,
        batch_size=ev.batch_size,
    )
    return eval_set, generation
