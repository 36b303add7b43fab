"""The demo's synthetic instruction-following data: six task families with exact answers.

Answers mix trivially predictable tokens (the echoed words of "The capital of France is", separators) with hard
ones (the digits of a sum, the looked-up city, a reordered list), which is what AdaKD's difficulty score is meant
to tell apart. Every split is deterministic for a seed and the splits share no prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ..data import Record, format_prompt

__all__ = ["FAMILIES", "make_splits"]

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


FAMILIES: dict[str, Task] = {
    "arithmetic": _add,
    "sorting": _sort_numbers,
    "reversal": _reverse,
    "uppercase": _uppercase,
    "lookup": _capital,
    "date-format": _date,
}


def make_splits(n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, list[Record]]:
    """Disjoint train / validation / test splits (by prompt), families drawn uniformly, formatted with the
    MiniLLM template. The lookup family has only 20 prompts, so most of its test prompts are also trained on:
    that family measures recall of the table, the others generalisation."""
    rng = random.Random(seed)
    families = list(FAMILIES.values())
    seen: set[str] = set()
    out: dict[str, list[Record]] = {"test": [], "validation": [], "train": []}
    targets = {"test": n_test, "validation": n_val, "train": n_train}
    for split in ("test", "validation", "train"):  # held-out splits first, so they get the rarer prompts
        attempts = 0
        while len(out[split]) < targets[split]:
            attempts += 1
            if attempts > 100 * targets[split] + 1000:
                raise ValueError(f"cannot draw {targets[split]} distinct {split} examples; lower the sizes")
            instruction, context, answer = rng.choice(families)(rng)
            prompt = format_prompt(instruction, context)
            if prompt in seen and not (split == "train" and instruction.startswith("What is the capital")):
                continue
            seen.add(prompt)
            out[split].append(Record(prompt=prompt, response=answer, references=(answer,)))
    return out
