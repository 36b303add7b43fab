"""The judge's prompt and the parsing of its verdict: pure text, no I/O."""

from __future__ import annotations

import re

__all__ = ["SYSTEM_PROMPT", "USER_TEMPLATE", "build_messages", "one_line", "parse_verdict"]

SYSTEM_PROMPT = (
    "You are an impartial judge of answers to user instructions. You are shown a question, a reference answer "
    "written by an expert, and two candidate answers, Answer 1 and Answer 2. Decide which candidate answers the "
    "question better. Judge correctness first, using the reference answer as a guide: a candidate that is correct "
    "but worded differently from the reference is fine, while one that contradicts it on facts or on the final "
    "result is wrong. Then consider helpfulness, relevance, completeness and clarity. Do not let the order in which "
    "the answers are presented, their length, or their style influence you, and do not favour either position. "
    "Briefly explain your reasoning, then end your reply with one final line holding only your verdict: [[1]] if "
    "Answer 1 is better, [[2]] if Answer 2 is better, or [[tie]] if they are equally good or equally bad."
)

USER_TEMPLATE = """[Question]
{question}

[The Start of the Reference Answer]
{reference}
[The End of the Reference Answer]

[The Start of Answer 1]
{answer_1}
[The End of Answer 1]

[The Start of Answer 2]
{answer_2}
[The End of Answer 2]

Which answer is better? Explain briefly, then end with [[1]], [[2]] or [[tie]] on a line of its own."""

# Tolerates the usual drift of judge models: "[[ 1 ]]", "[[Tie]]", "[[Answer 2]]".
_VERDICT = re.compile(r"\[\[\s*(?:answer\s*)?(1|2|tie)\s*\]\]", re.IGNORECASE)


def build_messages(question: str, reference: str, answer_1: str, answer_2: str) -> list[dict[str, str]]:
    """The chat messages (system, then user) asking the judge to compare ``answer_1`` and ``answer_2``.

    The messages depend on nothing but the four texts, so that the reply cache finds them again on a rerun.
    """
    user = USER_TEMPLATE.format(question=question, reference=reference, answer_1=answer_1, answer_2=answer_2)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_verdict(text: str | None) -> str | None:
    """The judge's verdict: ``"1"``, ``"2"`` or ``"tie"`` from the last ``[[...]]`` token, or None if there is none.

    The last token wins because judges often quote the instructions ("end with [[1]], [[2]] or [[tie]]") before
    giving their own verdict.
    """
    if not text:
        return None
    matches = _VERDICT.findall(text)
    return matches[-1].lower() if matches else None


def one_line(text: str, limit: int = 200) -> str:
    """``text`` with its whitespace collapsed and cut to ``limit`` characters, for a one-line error message."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
