"""Conversations -> token ids whose labels cover the assistant turns only.

A conversation is rendered once with the chat template and tokenized once, as the student will see it; the trained
(assistant) parts are found as character spans of that text, and a token is trained on when it overlaps one:

- a template with ``{% generation %}`` markers: the spans the template marks (transformers'
  ``return_assistant_tokens_mask``);
- any other template, prefix by prefix: assistant turn k starts where ``messages[:k]`` rendered with the generation
  prompt ends, and ends where ``messages[:k + 1]`` rendered ends, less the whitespace that follows the turn's last
  special token (ChatML's newline after ``<|im_end|>``), which the model never generates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .examples import IGNORE_INDEX
from .templates import QWEN2_SYSTEM, TEMPLATES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["CHAT_TEMPLATES", "chat_example", "check_turns", "has_generation_markers", "resolve_chat_template"]

# Qwen2-Instruct's own chat template (ChatML with a default system turn): a single-turn conversation renders exactly
# as format_prompt(..., template="qwen2") followed by the response.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + QWEN2_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"qwen2": QWEN2_CHAT_TEMPLATE}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str) -> bool:
    """Whether a Jinja chat template marks the assistant's text with ``{% generation %}`` blocks."""
    return bool(_GENERATION_TAG.search(template))


def resolve_chat_template(
    tokenizer: PreTrainedTokenizerBase, template: str | None, data_format: str, tokenizer_name: str | None = None
) -> str:
    """The Jinja text a chat format is rendered with.

    Args:
        tokenizer: the student's tokenizer.
        template: ``None`` (the tokenizer's own chat template), a name in :data:`CHAT_TEMPLATES` (``"qwen2"``), or the
            path of a Jinja file (which replaces the tokenizer's template, if it has one).
        data_format: the data format that needs it, for messages (``"messages"``).
        tokenizer_name: where the tokenizer came from, for messages.

    Raises:
        InputError: no template to use, ``"minillm"`` (an instruction template), or a file that cannot be read; the
            message names ``data.template``.
    """
    if template is None:
        own = tokenizer.chat_template
        if isinstance(own, dict):  # several named templates: the default one formats conversations
            own = own.get("default")
        if not own:
            named = f"{tokenizer_name!r} " if tokenizer_name else ""
            raise InputError(
                f"data.format {data_format} needs a chat template: the tokenizer {named}has none; set data.template to "
                f"a template name ({', '.join(CHAT_TEMPLATES)}) or a Jinja file"
            )
        return own
    if template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[template]
    if template in TEMPLATES:
        raise InputError(
            f"data.template: {template!r} formats instruction records, not data.format {data_format}: use "
            f"{', '.join(CHAT_TEMPLATES)}, a Jinja file, or no data.template (the tokenizer's own chat template)"
        )
    try:
        return Path(template).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"data.template: {template}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"data.template: {template}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def check_turns(messages: Any, where: str) -> list[dict[str, Any]]:
    """``messages`` as a list of turns, each a mapping with a str ``role`` and a str ``content``.

    Keys whose value is None are dropped: a ``datasets`` table fills every turn with every key any row has, and a
    template that tests ``message.tool_calls is defined`` must not see the filler.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InputError(f"{where}: expected a non-empty list of turns, got {_describe(messages)}")
    turns = []
    for j, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            raise InputError(f"{where}: turn {j} must be a mapping with 'role' and 'content', got {_describe(turn)}")
        for key in ("role", "content"):
            if not isinstance(turn.get(key), str):
                raise InputError(f"{where}: turn {j}: missing {key!r} (a str), got {_describe(turn.get(key))}")
        turns.append({k: v for k, v in turn.items() if v is not None})
    return turns


def _describe(value: Any) -> str:
    """What a value is, for a message."""
    if value is None:
        return "nothing"
    if isinstance(value, (list, tuple)):
        return "an empty list" if not value else f"a list of {type(value[0]).__name__}"
    return type(value).__name__


def chat_example(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    *,
    train_from: int = 0,
    where: str = "conversation",
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation, trained on its assistant turns.

    Args:
        messages: the turns (``role``, ``content``), as in TRL's conversational datasets.
        tokenizer: the student's tokenizer (fast: the spans are mapped to tokens through its offsets).
        template: the Jinja chat template (:func:`resolve_chat_template`).
        train_from: assistant turns before this index are context, not trained (TRL's conversational
            prompt/completion: the prompt's turns).
        where: names the record in messages (``"train.jsonl (train) row 3"``).

    Returns:
        ``(input_ids, labels)``, both ``[T]``, the whole conversation rendered without a generation prompt; labels are
        the ids on every token of a trained assistant turn (its content and end-of-turn token) and -100 elsewhere.

    Raises:
        InputError: bad turns, no assistant turn to train on, or a template that renders a conversation's beginning
            differently once more turns follow (and has no generation markers).
    """
    turns = check_turns(messages, where)
    if not any(turn["role"] == "assistant" for turn in turns[train_from:]):
        raise InputError(f"{where}: no assistant turn to train on")

    def render(part: list[dict[str, Any]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            part, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    text = render(turns, False)
    if has_generation_markers(template):
        # The marks cover every assistant turn; those of the context (before train_from) are not trained.
        context = len(_prefix(render(turns[:train_from], False), text, where, train_from)) if train_from else 0
        try:
            encoded = tokenizer.apply_chat_template(
                turns,
                chat_template=template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                tokenizer_kwargs={"return_offsets_mapping": True},
            )
        except NotImplementedError as e:
            raise _slow(tokenizer) from e
        ids, masks, offsets = list(encoded["input_ids"]), encoded["assistant_masks"], encoded["offset_mapping"]
        keep = [bool(m) and start >= context for m, (start, _) in zip(masks, offsets, strict=True)]
    else:
        spans = []
        specials = _special_pattern(tokenizer)
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant" or k < train_from:
                continue
            start = len(_prefix(render(turns[:k], True), text, where, k))
            end = len(_prefix(render(turns[: k + 1], False), text, where, k + 1))
            if end <= start:
                raise InputError(f"{where}: the chat template renders assistant turn {k} as nothing")
            spans.append((start, _trim(text, start, end, specials)))
        ids, offsets = _encode(tokenizer, text)
        keep = [any(t_end > s and t_start < e for s, e in spans) for t_start, t_end in offsets]
    return ids, [i if k else IGNORE_INDEX for i, k in zip(ids, keep, strict=True)]


def _prefix(part: str, text: str, where: str, turns: int) -> str:
    """``part`` (the first ``turns`` turns rendered on their own), checked to begin the whole conversation's text."""
    if not text.startswith(part):
        raise InputError(
            f"{where}: the chat template renders the first {turns} turn(s) differently once later turns follow, so "
            "the assistant turns cannot be found prefix by prefix; use a template with {% generation %} markers "
            "(data.template)"
        )
    return part


def _special_pattern(tokenizer: PreTrainedTokenizerBase) -> re.Pattern[str] | None:
    """A regex matching any of the tokenizer's special tokens, longest first."""
    specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _trim(text: str, start: int, end: int, specials: re.Pattern[str] | None) -> int:
    """The end of an assistant span: ``end``, or the end of the span's last special token when only whitespace
    follows it (the separator between turns, which the model never generates)."""
    if specials is None:
        return end
    found = list(specials.finditer(text, start, end))
    if found and not text[found[-1].end() : end].strip():
        return found[-1].end()
    return end


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of rendered text; the template writes every special token itself."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise _slow(tokenizer) from e
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def _slow(tokenizer: PreTrainedTokenizerBase) -> InputError:
    """Slow (Python) tokenizers have no character offsets, which map the assistant spans to tokens."""
    return InputError(f"chat formats need a fast tokenizer (with offsets), got {type(tokenizer).__name__}")
