"""The synthetic instruction tasks: families of short prompts with exact answers (:data:`FAMILIES`), and families
with several valid answers in known proportions (:data:`SOFT_FAMILIES`). :func:`synthetic_instructions` (the
``data.source: synthetic`` reader) draws from the exact families and three more (:data:`INSTRUCTION_FAMILIES`); the
demo (:mod:`adakd.demo.tasks`) splits them
into train / validation / test.

Answers mix trivially predictable tokens (the echoed words of "The capital of France is", separators) with hard
ones (the digits of a sum, the looked-up city, a reordered list), which is what AdaKD's difficulty score is meant
to tell apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ..errors import InputError
from .readers import Record
from .templates import format_prompt

__all__ = ["FAMILIES", "INSTRUCTION_FAMILIES", "SOFT_FAMILIES", "synthetic_instructions"]

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


Task = Callable[[random.Random], tuple[str, str | None, str]]


def _add(rng: random.Random) -> tuple[str, str | None, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add {a} and {b}.", None, f"{a} + {b} = {a + b}"


def _sort_numbers(rng: random.Random) -> tuple[str, str | None, str]:
    xs = rng.sample(range(1, 60), rng.randint(3, 5))
    return "Sort these numbers in ascending order.", " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))


def _reverse(rng: random.Random) -> tuple[str, str | None, str]:
    ws = rng.sample(_WORDS, rng.randint(2, 4))
    return "Reverse the order of these words.", " ".join(ws), " ".join(reversed(ws))


def _uppercase(rng: random.Random) -> tuple[str, str | None, str]:
    ws = rng.sample(_WORDS, rng.randint(1, 3))
    return "Rewrite the input in uppercase letters.", " ".join(ws), " ".join(ws).upper()


def _capital(rng: random.Random) -> tuple[str, str | None, str]:
    country = rng.choice(sorted(_CAPITALS))
    return f"What is the capital of {country}?", None, f"The capital of {country} is {_CAPITALS[country]}."


def _date(rng: random.Random) -> tuple[str, str | None, str]:
    y, m, d = rng.randint(1990, 2029), rng.randint(1, 12), rng.randint(1, 28)
    return "Convert the date to DD/MM/YYYY format.", f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}"


# Families with several valid answers in known proportions: the teacher learns a soft distribution over them
# (what distillation transfers beyond the argmax), and an answer is scored against every valid one.
# Each returns (instruction, context, the sampled answer, all valid answers).
SoftTask = Callable[[random.Random], tuple[str, str | None, str, tuple[str, ...]]]


def _pick(rng: random.Random, options: list[tuple[str, float]]) -> str:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def _sum_phrasing(rng: random.Random):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    options = [(f"{a} + {b} = {a + b}", 0.6), (f"The sum is {a + b}.", 0.4)]
    return f"What is {a} plus {b}?", None, _pick(rng, options), tuple(o for o, _ in options)


def _either_order(rng: random.Random):
    xs = rng.sample(range(1, 60), rng.randint(3, 5))
    up, down = " ".join(map(str, sorted(xs))), " ".join(map(str, sorted(xs, reverse=True)))
    options = [(up, 0.7), (down, 0.3)]
    return "List these numbers in order.", " ".join(map(str, xs)), _pick(rng, options), (up, down)


def _join(rng: random.Random):
    ws = rng.sample(_WORDS, rng.randint(2, 4))
    options = [(" ".join(ws), 0.5), (", ".join(ws), 0.3), ("-".join(ws), 0.2)]
    return "Join these words.", " / ".join(ws), _pick(rng, options), tuple(o for o, _ in options)


def _greet(rng: random.Random):
    name = rng.choice(sorted(_CAPITALS.values()))  # city names double as given names here
    options = [(f"Hello, {name}!", 0.5), (f"Hi {name}!", 0.3), (f"Good morning, {name}.", 0.2)]
    return f"Greet {name}.", None, _pick(rng, options), tuple(o for o, _ in options)


SOFT_FAMILIES: dict[str, SoftTask] = {
    "sum-phrasing": _sum_phrasing,
    "either-order": _either_order,
    "join": _join,
    "greeting": _greet,
}

FAMILIES: dict[str, Task] = {
    "arithmetic": _add,
    "sorting": _sort_numbers,
    "reversal": _reverse,
    "uppercase": _uppercase,
    "lookup": _capital,
    "date-format": _date,
}


def _repeat(rng: random.Random) -> tuple[str, str | None, str]:
    word = rng.choice(_WORDS)
    return f"Repeat the word '{word}' three times.", None, " ".join([word] * 3)


def _sort_letters(rng: random.Random) -> tuple[str, str | None, str]:
    letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(4, 8))
    return "Sort these letters alphabetically.", " ".join(letters), " ".join(sorted(letters))


def _count_words(rng: random.Random) -> tuple[str, str | None, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 9))]
    return "How many words are in the input?", " ".join(words), f"There are {len(words)} words."


# What data.source: synthetic draws from: the demo's exact families, and three more with exact answers that the
# demo leaves out (its splits and scores are by the six above).
INSTRUCTION_FAMILIES: dict[str, Task] = {
    **FAMILIES,
    "repetition": _repeat,
    "letter-sorting": _sort_letters,
    "word-count": _count_words,
}


def synthetic_instructions(n: int = 256, seed: int = 0) -> list[Record]:
    """``n`` short, deterministic instruction/response pairs in the MiniLLM template, each from one of the
    :data:`INSTRUCTION_FAMILIES` (drawn uniformly), with its one right answer as the response and the only reference.

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
