"""Conversations -> token ids whose labels cover the assistant turns only.

A conversation is rendered once with the chat template and tokenized once, as the student will see it; the trained
(assistant) parts are found as character spans of that text, and a token is trained on when it overlaps one:

- a template with ``{% generation %}`` markers: the spans the template marks (transformers'
  ``return_assistant_tokens_mask``);
- any other template, prefix by prefix: assistant turn k starts where ``messages[:k]`` rendered with the generation
  prompt ends, and ends where ``messages[:k + 1]`` rendered ends, less the whitespace that follows the turn's end
  marker (ChatML's newline after ``<|im_end|>``), which the model never generates. Given the length the example is
  cut to, rendering stops at the first turn that starts beyond the cut (the later turns are never trained).

A trained assistant turn must have text (an empty one would train its end marker alone), and the template must
write that text: a span without the turn's content (a template reading ``message.text``) is refused, as is a
template that Jinja cannot parse or that refuses a conversation (``raise_exception``); each message names the record.
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

__all__ = [
    "CHAT_TEMPLATES",
    "chat_example",
    "check_template_syntax",
    "check_turns",
    "has_generation_markers",
    "resolve_chat_template",
    "template_label",
]

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


def template_label(template: str | None, tokenizer_name: str | None = None) -> str:
    """How messages name a chat template: ``data.template X`` for a chosen one, else the student tokenizer's own."""
    if template is not None:
        return f"data.template {template}"
    if tokenizer_name:
        return f"the chat template of the tokenizer {tokenizer_name!r}"
    return "the tokenizer's chat template"


def resolve_chat_template(
    tokenizer: PreTrainedTokenizerBase, template: str | None, data_format: str, tokenizer_name: str | None = None
) -> str:
    """The Jinja text a chat format is rendered with, checked to parse.

    Args:
        tokenizer: the student's tokenizer.
        template: ``None`` (the tokenizer's own chat template), a name in :data:`CHAT_TEMPLATES` (``"qwen2"``), or the
            path of a Jinja file (which replaces the tokenizer's template, if it has one).
        data_format: the data format that needs it, for messages (``"messages"``).
        tokenizer_name: where the tokenizer came from, for messages.

    Raises:
        InputError: no template to use, ``"minillm"`` (an instruction template), a file that cannot be read, or a
            template Jinja cannot parse; the message names ``data.template`` (or the tokenizer, for its own).
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
        check_template_syntax(tokenizer, own, template_label(None, tokenizer_name) + " (set data.template to another)")
        return own
    if template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[template]
    if template in TEMPLATES:
        raise InputError(
            f"data.template: {template!r} formats instruction records, not data.format {data_format}: use "
            f"{', '.join(CHAT_TEMPLATES)}, a Jinja file, or no data.template (the tokenizer's own chat template)"
        )
    try:
        text = Path(template).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"data.template: {template}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"data.template: {template}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    check_template_syntax(tokenizer, text, f"data.template: {template}")
    return text


def check_template_syntax(tokenizer: PreTrainedTokenizerBase, template: str, label: str) -> None:
    """Parse ``template`` once, before any record is rendered: a syntax error is the template's, not a record's.

    The template is compiled as transformers compiles it (its ``{% generation %}`` tag included) by rendering a
    two-turn probe conversation; only a syntax error counts here (a template may well refuse the probe).

    Raises:
        InputError: ``"<label>: not a valid Jinja template (line N: ...)"``.
    """
    import jinja2

    probe = [{"role": "user", "content": "probe"}, {"role": "assistant", "content": "probe"}]
    try:
        tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{label}: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    except Exception:  # noqa: BLE001 - anything else the probe meets is a record's business, checked per record
        pass


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
    max_length: int | None = None,
    label: str = "the chat template",
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation, trained on its assistant turns.

    Args:
        messages: the turns (``role``, ``content``), as in TRL's conversational datasets.
        tokenizer: the student's tokenizer (fast: the spans are mapped to tokens through its offsets).
        template: the Jinja chat template (:func:`resolve_chat_template`).
        train_from: assistant turns before this index are context, not trained (TRL's conversational
            prompt/completion: the prompt's turns).
        where: names the record in messages (``"train.jsonl (train) row 3"``).
        max_length: the length the example will be cut to (:func:`adakd.data.fit_example`), or None. Turns that
            start beyond it are not rendered prefix by prefix (which costs time in the square of the turns); the
            labels of the first ``max_length`` tokens, and the position of the first trained token, are the same
            as without it.
        label: names the template in messages (``"data.template chat.jinja"``, :func:`template_label`).

    Returns:
        ``(input_ids, labels)``, both ``[T]``, the whole conversation rendered without a generation prompt; labels are
        the ids on every token of a trained assistant turn (its content and end-of-turn token) and -100 elsewhere.

    Raises:
        InputError: bad turns, no assistant turn to train on, a trained assistant turn without text, a template that
            refuses the conversation or renders an assistant turn without its content, or one that renders a
            conversation's beginning differently once more turns follow (and has no generation markers).
    """
    turns = check_turns(messages, where)
    trained = [k for k, turn in enumerate(turns) if turn["role"] == "assistant" and k >= train_from]
    if not trained:
        raise InputError(f"{where}: no assistant turn to train on")
    for k in trained:
        # Policy (as for a MiniLLM or instruction record): an empty answer is an error, not a silent skip; it would
        # train the end-of-turn marker alone. A turn that only calls tools has its call to train on.
        if not turns[k]["content"].strip() and not turns[k].get("tool_calls"):
            raise InputError(f"{where}: turn {k} (assistant): empty response")

    def render(part: list[dict[str, Any]], generation_prompt: bool, **kwargs: Any) -> Any:
        return _render(tokenizer, part, template, generation_prompt, where, label, **kwargs)

    text = render(turns, False)
    if has_generation_markers(template):
        # The marks cover every assistant turn; those of the context (before train_from) are not trained.
        context = len(_prefix(render(turns[:train_from], False), text, where, train_from)) if train_from else 0
        try:
            encoded = render(
                turns,
                False,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                tokenizer_kwargs={"return_offsets_mapping": True},
            )
        except NotImplementedError as e:
            raise _slow(tokenizer) from e
        ids, masks, offsets = list(encoded["input_ids"]), encoded["assistant_masks"], encoded["offset_mapping"]
        keep = [bool(m) and start >= context for m, (start, _) in zip(masks, offsets, strict=True)]
        runs: list[list[int]] = []  # the characters of each run of marked tokens
        for (t_start, t_end), k, previous in zip(offsets, keep, [False, *keep], strict=False):
            if k and previous:
                runs[-1][1] = t_end
            elif k:
                runs.append([t_start, t_end])
        marked = "\0".join(text[s:e] for s, e in runs)
        for k in trained:
            if _content_end(turns[k], marked, 0, len(marked)) is None:
                raise _no_content(label, where, k)
    else:
        ids, offsets = _encode(tokenizer, text)
        # The characters the first max_length tokens reach: a turn that starts there or later is cut off entirely.
        reach = max(e for _, e in offsets[:max_length]) if max_length is not None and len(ids) > max_length else None
        spans = []
        specials = _special_pattern(tokenizer)
        for k in trained:
            start = len(_prefix(render(turns[:k], True), text, where, k))
            if reach is not None and spans and start >= reach:
                break  # this turn and the later ones lie past the cut; the first trained turn is always found
            end = len(_prefix(render(turns[: k + 1], False), text, where, k + 1))
            if end <= start:
                raise InputError(f"{where}: the chat template renders assistant turn {k} as nothing")
            content_end = _content_end(turns[k], text, start, end)
            if content_end is None:
                raise _no_content(label, where, k)
            spans.append((start, _trim(text, start, end, specials, content_end)))
        keep = [any(t_end > s and t_start < e for s, e in spans) for t_start, t_end in offsets]
    return ids, [i if k else IGNORE_INDEX for i, k in zip(ids, keep, strict=True)]


def _render(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[dict[str, Any]],
    template: str,
    generation_prompt: bool,
    where: str,
    label: str,
    **kwargs: Any,
) -> Any:
    """``apply_chat_template`` (text, unless ``kwargs`` ask for more), its Jinja errors as one-line InputErrors: a
    syntax error names the template, a refusal (``raise_exception``) or a failure names the record too."""
    import jinja2

    kwargs.setdefault("tokenize", False)
    try:
        return tokenizer.apply_chat_template(
            turns, chat_template=template, add_generation_prompt=generation_prompt, **kwargs
        )
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{label}: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    except jinja2.TemplateError as e:
        said = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if type(e) is jinja2.TemplateError:  # raise_exception('...'): the template's own words
            raise InputError(f"{where}: {label} refuses this conversation: {said}") from None
        raise InputError(f"{where}: {label} cannot render this conversation ({type(e).__name__}: {said})") from None


def _content_end(turn: Mapping[str, Any], text: str, start: int, end: int) -> int | None:
    """Where the turn's content ends in ``text[start:end]`` (the rendered turn), or None when it is not there.

    The content's last non-blank line is looked for, stripped: templates trim the content, and some keep only its
    last part (reasoning templates drop the thinking before the answer). A turn without text (a tool call) has
    nothing to look for and ends at ``start``.
    """
    lines = [line.strip() for line in turn["content"].splitlines() if line.strip()]
    if not lines:
        return start
    at = text.rfind(lines[-1], start, end)
    return None if at < 0 else at + len(lines[-1])


def _no_content(label: str, where: str, k: int) -> InputError:
    """A template that writes an assistant turn without its content trains the end marker alone."""
    return InputError(
        f"{where}: {label} renders assistant turn {k} without its content, so only its end marker would be trained "
        "(does the template write message['content']?)"
    )


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


def _trim(text: str, start: int, end: int, specials: re.Pattern[str] | None, content_end: int) -> int:
    """The end of an assistant span ``text[start:end]`` whose content ends at ``content_end``, less the separator
    between turns, which the model never generates:

    - the end of the span's last special token, when only whitespace follows it;
    - else, when an end marker follows the content (text that is not whitespace, such as ChatML's ``<|im_end|>``
      for a tokenizer that does not have it as a special token, like the byte-level one), the end of that marker;
    - else ``end``: a turn that ends in whitespace alone keeps it, its only end of turn.
    """
    if specials is not None:
        found = list(specials.finditer(text, start, end))
        if found and not text[found[-1].end() : end].strip():
            return found[-1].end()
    tail = text[content_end:end]
    if tail.strip():
        return content_end + len(tail.rstrip())
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
