"""The synthetic instruction tasks, in one place: each task kind is written once and parametrised (its number
range, word list, table and wording), and two sets are drawn from them.

- :data:`FAMILIES` (six, exact answers) and :data:`SOFT_FAMILIES` (four, several valid answers in known proportions):
  the demo's (:mod:`adakd.demo.tasks` splits them into train / validation / test);
- :data:`INSTRUCTION_FAMILIES` (seven, exact answers): what :func:`synthetic_instructions`, the ``data.source:
  synthetic`` reader, draws from. Four are the demo's kinds (sum, reversal, uppercase, capital) with their own range
  and wording, three are its own (repetition, letter sorting, word count). Its records are those the tests and the
  tiny configs were written against (which examples the length policy keeps, how a cache of them is sharded), so
  its parameters are kept as they are.

Answers mix trivially predictable tokens (the echoed words of "The capital of France is", separators) with hard
ones (the digits of a sum, the looked-up city, a reordered list), which is what AdaKD's difficulty score is meant
to tell apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ..errors import InputError
from .readers import Record
from .templates import format_prompt

__all__ = ["FAMILIES", "INSTRUCTION_FAMILIES", "SOFT_FAMILIES", "Task", "synthetic_instructions"]

# rng -> (instruction, input or None, the answer)
Task = Callable[[random.Random], tuple[str, str | None, str]]
# rng -> (instruction, input or None, the sampled answer, every valid answer)
SoftTask = Callable[[random.Random], tuple[str, str | None, str, tuple[str, ...]]]

_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo", "Peru": "Lima",
    "Kenya": "Nairobi", "Canada": "Ottawa", "Norway": "Oslo", "Chile": "Santiago", "Greece": "Athens",
    "Poland": "Warsaw", "Cuba": "Havana", "Iran": "Tehran", "Ghana": "Accra", "Nepal": "Kathmandu",
    "Austria": "Vienna", "Portugal": "Lisbon", "Sweden": "Stockholm", "Mexico": "Mexico City",
}  # fmt: skip
_WORDS = (
    "apple river stone cloud tiger garden silver window candle ocean forest bridge mirror pepper rocket "
    "violin marble thunder lantern meadow"
).split()
# The synthetic reader's own tables.
_INSTRUCTION_WORDS = (
    "apple river stone cloud green quick music light table tiger paper ocean happy dream forest silver garden "
    "window rocket candle"
).split()
_INSTRUCTION_CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Spain", "Madrid"), ("India", "New Delhi"),
    ("Brazil", "Brasília"), ("Australia", "Canberra"),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- task kinds


def _sum(low: int, high: int, wording: str) -> Task:
    """Two numbers in ``[low, high]`` added; ``wording`` has ``{a}`` and ``{b}``."""

    def task(rng: random.Random) -> tuple[str, str | None, str]:
        a, b = rng.randint(low, high), rng.randint(low, high)
        return wording.format(a=a, b=b), None, f"{a} + {b} = {a + b}"

    return task


def _reversal(words: Sequence[str], low: int, high: int, wording: str) -> Task:
    """``low`` to ``high`` distinct ``words`` in the input, reversed."""

    def task(rng: random.Random) -> tuple[str, str | None, str]:
        ws = rng.sample(words, rng.randint(low, high))
        return wording, " ".join(ws), " ".join(reversed(ws))

    return task


def _upper(words: Sequence[str], low: int, high: int) -> Task:
    """``low`` to ``high`` distinct ``words`` in the input, in uppercase."""

    def task(rng: random.Random) -> tuple[str, str | None, str]:
        text = " ".join(rng.sample(words, rng.randint(low, high)))
        return "Rewrite the input in uppercase letters.", text, text.upper()

    return task


def _capital(table: Sequence[tuple[str, str]]) -> Task:
    """A country of ``table`` (country, capital) and its capital."""

    def task(rng: random.Random) -> tuple[str, str | None, str]:
        country, capital = rng.choice(table)
        return f"What is the capital of {country}?", None, f"The capital of {country} is {capital}."

    return task


def _sort_numbers(rng: random.Random) -> tuple[str, str | None, str]:
    xs = rng.sample(range(1, 60), rng.randint(3, 5))
    return "Sort these numbers in ascending order.", " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))


def _date(rng: random.Random) -> tuple[str, str | None, str]:
    y, m, d = rng.randint(1990, 2029), rng.randint(1, 12), rng.randint(1, 28)
    return "Convert the date to DD/MM/YYYY format.", f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}"


def _repeat(rng: random.Random) -> tuple[str, str | None, str]:
    word = rng.choice(_INSTRUCTION_WORDS)
    return f"Repeat the word '{word}' three times.", None, " ".join([word] * 3)


def _sort_letters(rng: random.Random) -> tuple[str, str | None, str]:
    letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(4, 8))
    return "Sort these letters alphabetically.", " ".join(letters), " ".join(sorted(letters))


def _count_words(rng: random.Random) -> tuple[str, str | None, str]:
    words = [rng.choice(_INSTRUCTION_WORDS) for _ in range(rng.randint(2, 9))]
    return "How many words are in the input?", " ".join(words), f"There are {len(words)} words."


# Kinds with several valid answers: the teacher learns a soft distribution over them (what distillation transfers
# beyond the argmax), and an answer is scored against every valid one.


def _pick(rng: random.Random, options: list[tuple[str, float]]) -> str:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def _sum_phrasing(rng: random.Random) -> tuple[str, str | None, str, tuple[str, ...]]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    options = [(f"{a} + {b} = {a + b}", 0.6), (f"The sum is {a + b}.", 0.4)]
    return f"What is {a} plus {b}?", None, _pick(rng, options), tuple(o for o, _ in options)


def _either_order(rng: random.Random) -> tuple[str, str | None, str, tuple[str, ...]]:
    xs = rng.sample(range(1, 60), rng.randint(3, 5))
    up, down = " ".join(map(str, sorted(xs))), " ".join(map(str, sorted(xs, reverse=True)))
    options = [(up, 0.7), (down, 0.3)]
    return "List these numbers in order.", " ".join(map(str, xs)), _pick(rng, options), (up, down)


def _join(rng: random.Random) -> tuple[str, str | None, str, tuple[str, ...]]:
    ws = rng.sample(_WORDS, rng.randint(2, 4))
    options = [(" ".join(ws), 0.5), (", ".join(ws), 0.3), ("-".join(ws), 0.2)]
    return "Join these words.", " / ".join(ws), _pick(rng, options), tuple(o for o, _ in options)


def _greet(rng: random.Random) -> tuple[str, str | None, str, tuple[str, ...]]:
    name = rng.choice(sorted(_CAPITALS.values()))  # city names double as given names here
    options = [(f"Hello, {name}!", 0.5), (f"Hi {name}!", 0.3), (f"Good morning, {name}.", 0.2)]
    return f"Greet {name}.", None, _pick(rng, options), tuple(o for o, _ in options)


# ---------------------------------------------------------------------------------------------- the sets
# A set's order is part of what it draws (rng.choice over its values): keep it.

FAMILIES: dict[str, Task] = {
    "arithmetic": _sum(10, 99, "Add {a} and {b}."),
    "sorting": _sort_numbers,
    "reversal": _reversal(_WORDS, 2, 4, "Reverse the order of these words."),
    "uppercase": _upper(_WORDS, 1, 3),
    "lookup": _capital(sorted(_CAPITALS.items())),
    "date-format": _date,
}
SOFT_FAMILIES: dict[str, SoftTask] = {
    "sum-phrasing": _sum_phrasing,
    "either-order": _either_order,
    "join": _join,
    "greeting": _greet,
}
INSTRUCTION_FAMILIES: dict[str, Task] = {
    "reversal": _reversal(_INSTRUCTION_WORDS, 3, 6, "Reverse the order of the words in the input."),
    "arithmetic": _sum(0, 999, "Add the numbers {a} and {b}."),
    "repetition": _repeat,
    "letter-sorting": _sort_letters,
    "lookup": _capital(_INSTRUCTION_CAPITALS),
    "word-count": _count_words,
    "uppercase": _upper(_INSTRUCTION_WORDS, 2, 5),
}


def synthetic_instructions(n: int = 256, seed: int = 0) -> list[Record]:
    """``n`` short, deterministic instruction/response pairs (the seven :data:`INSTRUCTION_FAMILIES`, drawn
    uniformly) in the MiniLLM template, each with its one right answer as the response and the only reference.

    The same ``(n, seed)`` always gives the same records, and fewer records are a prefix of more; responses are at
    most about a dozen words.

    Raises:
        InputError: ``n`` is not a non-negative int.
    """
    if not isinstance(n, int) or n < 0:
        raise InputError(f"n must be a non-negative int, got {n!r}")
    rng = random.Random(seed)
    tasks = list(INSTRUCTION_FAMILIES.values())
    records = []
    for _ in range(n):
        instruction, context, response = rng.choice(tasks)(rng)
        records.append(Record(prompt=format_prompt(instruction, context), response=response, references=(response,)))
    return records
