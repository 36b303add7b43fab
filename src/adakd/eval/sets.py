"""The paper's five evaluation sets, in the MiniLLM JSONL layout, selected by name under a data directory; and their
prompts as one chat turn (``adakd eval --chat-template``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import Record
from ..data.chat import CHAT_TEMPLATES
from ..data.readers import _check_limit, minillm_record
from ..data.templates import MINILLM_PROMPT_NO_INPUT, MINILLM_PROMPT_WITH_INPUT, TEMPLATES
from ..errors import InputError
from ..files import iter_jsonl

__all__ = [
    "EVAL_SETS",
    "ChatTemplate",
    "EvalSet",
    "chat_prompts",
    "chat_template_for",
    "end_of_turn_ids",
    "load_eval_set",
    "resolve_eval_sets",
    "user_turn",
    "user_turns",
]

# name -> candidate paths under the data directory, the first that exists wins (MiniLLM's layout).
EVAL_SETS: dict[str, tuple[str, ...]] = {
    "dolly": ("dolly/valid.jsonl",),
    "self-inst": ("self-inst/valid.jsonl",),
    "vicuna": ("vicuna/valid.jsonl",),
    "sinst": ("sinst/11_/valid.jsonl",),
    "uinst": ("uinst/11_/valid.jsonl", "uinst-subset1050/valid.jsonl"),
}


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: its name, the file it came from, and its records (prompt and references).

    ``turns``: each record's user turn for ``--chat-template`` (:func:`user_turn`), None where a record cannot be one;
    ``lines``: each record's ``file:line``. Both are None for a set not read by :func:`load_eval_set`.
    """

    name: str
    path: Path
    records: list[Record]
    turns: list[str | None] | None = None
    lines: list[str] | None = None


def resolve_eval_sets(data_dir: str | Path | None, names: list[str]) -> dict[str, Path]:
    """Map each requested set to its file: ``name`` under ``data_dir`` (MiniLLM's layout) or ``name=path``.

    Raises:
        InputError: an unknown name (listing the valid ones) or a missing file (naming the paths tried).
    """
    out: dict[str, Path] = {}
    for item in names:
        name, sep, explicit = item.partition("=")
        if sep:
            path = Path(explicit)
            if not path.is_file():
                raise InputError(f"--datasets {item}: {path} does not exist")
            out[name] = path
            continue
        if name not in EVAL_SETS:
            raise InputError(f"--datasets: unknown set {name!r}; valid: {', '.join(EVAL_SETS)} (or name=path)")
        if data_dir is None:
            raise InputError(f"--data-dir is needed to find {name!r} (or pass {name}=path)")
        candidates = [Path(data_dir) / rel for rel in EVAL_SETS[name]]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise InputError(f"--datasets {name}: none of {', '.join(map(str, candidates))} exists")
        out[name] = found
    return out


def load_eval_set(name: str, path: Path, limit: int | None = None) -> EvalSet:
    """Read one set (``prompt``, ``output`` as one reference or a list of them), its first ``limit`` records, and
    each record's user turn (:func:`user_turn`) for ``--chat-template``.

    Raises:
        InputError: a malformed line (``path:line: reason``) or a record without ``prompt`` / ``output``.
    """
    _check_limit(limit)
    records, turns, lines = [], [], []
    for where, row in iter_jsonl(path, limit=limit):
        records.append(minillm_record(row, where))
        turns.append(user_turn(row))
        lines.append(where)
    return EvalSet(name, path, records, turns, lines)


# ---------------------------------------------------------------------------------------------- chat prompts


def _template_pattern(template: str, with_input: bool) -> re.Pattern[str]:
    """A MiniLLM/Alpaca prompt template as a regex capturing ``instruction`` (and ``input``)."""
    pattern = re.escape(template).replace(
        re.escape("{instruction}"), "(?P<instruction>.*?)" if with_input else "(?P<instruction>.*)"
    )
    return re.compile(pattern.replace(re.escape("{input}"), "(?P<input>.*)") + r"\Z", re.DOTALL)


# The two variants differ in their first sentence, so at most one matches; with an input, the instruction ends at
# the first "### Input:" heading.
_ALPACA = (_template_pattern(MINILLM_PROMPT_WITH_INPUT, True), _template_pattern(MINILLM_PROMPT_NO_INPUT, False))


def user_turn(row: Mapping[str, Any]) -> str | None:
    """The content of the one user turn a record becomes: ``instruction`` [+ ``"\\n\\n"`` + ``input``] when the input
    is non-empty, as the conversations of ``dolly-train-text/train.messages.jsonl`` were made.

    The fields are ``instruction`` and ``input`` (or ``context``); a record without ``instruction`` has them read
    back out of its ``prompt`` when that is in the MiniLLM/Alpaca template. None: neither is there.
    """
    instruction, context = row.get("instruction"), row.get("input", row.get("context"))
    if instruction is None and isinstance(row.get("prompt"), str):
        match = next((m for m in (p.match(row["prompt"]) for p in _ALPACA) if m), None)
        if match is None:
            return None
        instruction, context = match.group("instruction"), match.groupdict().get("input")
    if not isinstance(instruction, str) or not (context is None or isinstance(context, str)):
        return None
    return instruction + ("\n\n" + context if context else "")


def user_turns(eval_set: EvalSet, option: str = "--chat-template") -> list[str]:
    """Every record's user turn; ``option`` (the flag or key that asked for them) names the refusal.

    Raises:
        InputError: a record that has no ``instruction`` and no ``prompt`` in the MiniLLM/Alpaca template (the
            message names its file and line), or a set not read by :func:`load_eval_set`.
    """
    if eval_set.turns is None or eval_set.lines is None:
        raise InputError(f"{option}: the set {eval_set.name!r} holds no instructions (read it with load_eval_set)")
    for turn, where in zip(eval_set.turns, eval_set.lines, strict=True):
        if turn is None:
            raise InputError(
                f"{where}: {option} needs the record's 'instruction' (a str, with an optional str 'input') or a "
                "'prompt' in the MiniLLM/Alpaca template, and this record has neither"
            )
    return list(eval_set.turns)


@dataclass(frozen=True)
class ChatTemplate:
    """The chat template the prompts are rendered with: its Jinja ``text``, and its ``source`` as the results record
    it: ``"tokenizer"`` (the tokenizer's own), a name of :data:`adakd.data.CHAT_TEMPLATES`, or the Jinja file."""

    text: str
    source: str


def chat_template_for(
    tokenizer, spec: str | None, tokenizer_name: str, option: str = "--chat-template"
) -> ChatTemplate:
    """The chat template ``spec`` names: None, the tokenizer's own; a name of :data:`adakd.data.CHAT_TEMPLATES`
    (``qwen2``); or the path of a Jinja file.

    Raises:
        InputError: a tokenizer without a chat template, an instruction template's name (``minillm``), or a file
            that cannot be read; the one-line message names ``option`` (and the tokenizer).
    """
    if spec is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one formats conversations
            own = own.get("default")
        if not own:
            raise InputError(
                f"{option}: the tokenizer {tokenizer_name!r} has no chat template; name one "
                f"({', '.join(CHAT_TEMPLATES)}) or give a Jinja file"
            )
        return ChatTemplate(own, "tokenizer")
    if spec in CHAT_TEMPLATES:
        return ChatTemplate(CHAT_TEMPLATES[spec], spec)
    if spec in TEMPLATES:
        raise InputError(
            f"{option}: {spec!r} is an instruction template, not a chat template: the raw prompts are its text "
            f"(leave {option} off), or use {', '.join(CHAT_TEMPLATES)} or a Jinja file"
        )
    try:
        return ChatTemplate(Path(spec).read_text(encoding="utf-8"), spec)
    except FileNotFoundError:
        raise InputError(f"{option} {spec}: no such file (nor a template name: {', '.join(CHAT_TEMPLATES)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{option} {spec}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def chat_prompts(eval_set: EvalSet, tokenizer, template: ChatTemplate, option: str = "--chat-template") -> list[str]:
    """Each record's user turn rendered as a one-turn conversation with the generation prompt: the text the model
    continues. It holds every special token of the template (BOS, ``<|im_start|>``), so it is tokenised without
    adding any (``add_special_tokens=False``, as the backends do): the ids are those of ``apply_chat_template(...,
    tokenize=True)``.

    Raises:
        InputError: as :func:`user_turns`.
    """
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": turn}], chat_template=template.text, tokenize=False, add_generation_prompt=True
        )
        for turn in user_turns(eval_set, option)
    ]


_PROBE = "adakd end-of-turn probe 7f3a"


def end_of_turn_ids(tokenizer, template: ChatTemplate) -> list[int]:
    """The token that ends an assistant turn in ``template``, as ids (one, or none): the special token written right
    after the assistant's text (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``).

    Generation stops there as well as at the tokenizer's eos, which is not always the same token (a base model's
    tokenizer with ChatML added: eos ``<|endoftext|>``). A template that writes nothing special after the answer,
    or cannot render a user + assistant exchange, gives none: the eos alone ends the answer.
    """
    from jinja2 import TemplateError

    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template.text, tokenize=False)
    except (TemplateError, ValueError, TypeError):
        return []
    at = text.rfind(_PROBE)
    if at < 0:
        return []
    ids = tokenizer(text[at + len(_PROBE) :], add_special_tokens=False)["input_ids"]
    if not ids:
        return []
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(ids[0])
    special = ids[0] in tokenizer.all_special_ids or (added is not None and added.special)
    return [ids[0]] if special else []
