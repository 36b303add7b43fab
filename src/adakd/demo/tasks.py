"""The demo's synthetic instruction-following data: six task families with exact answers.

Answers mix trivially predictable tokens (the echoed words of "The capital of France is", separators) with hard
ones (the digits of a sum, the looked-up city, a reordered list), which is what AdaKD's difficulty score is meant
to tell apart. Every split is deterministic for a seed and the splits share no prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ..data import Record, format_prompt
from ..errors import InputError

__all__ = ["FAMILIES", "SOFT_FAMILIES", "TASK_SETS", "TaskRecord", "make_splits"]

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


@dataclass(frozen=True)
class TaskRecord(Record):
    """A demo example that knows its task family (so scores can be split by family and kind without parsing)."""

    family: str = ""

    @property
    def kind(self) -> str:
        """``soft`` (several valid answers) or ``exact`` (one right answer)."""
        return "soft" if self.family in SOFT_FAMILIES else "exact"


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
TASK_SETS = ("exact", "soft", "mixed")

FAMILIES: dict[str, Task] = {
    "arithmetic": _add,
    "sorting": _sort_numbers,
    "reversal": _reverse,
    "uppercase": _uppercase,
    "lookup": _capital,
    "date-format": _date,
}


# Families drawn from a 20-entry table (capitals, names): too few prompts to hold some out, so training may repeat
# the held-out ones; they measure recall of the table (and, for greetings, of the answers' proportions).
_TABLES = ("What is the capital", "Greet ")


def make_splits(
    n_train: int, n_val: int, n_test: int, seed: int = 0, tasks: str = "exact"
) -> dict[str, list[TaskRecord]]:
    """Disjoint train / validation / test splits (by prompt), families drawn uniformly, formatted with the
    MiniLLM template. The lookup and greeting families have only 20 prompts each, so most of their test prompts
    are also trained on: they measure recall of a table, the others generalisation.

    ``tasks``: ``exact`` (the six families with one right answer, the demo's), ``soft`` (the families with several
    valid answers in known proportions; each record's references hold all of them) or ``mixed`` (both).

    Raises:
        InputError: an unknown ``tasks``, or sizes too large for the distinct prompts the families can make.
    """
    if tasks not in TASK_SETS:
        raise InputError(f"unknown task set {tasks!r}; valid: {', '.join(TASK_SETS)}")
    rng = random.Random(seed)
    families: list = []
    if tasks in ("exact", "mixed"):
        families += list(FAMILIES.items())
    if tasks in ("soft", "mixed"):
        families += list(SOFT_FAMILIES.items())
    seen: set[str] = set()
    out: dict[str, list[Record]] = {"test": [], "validation": [], "train": []}
    targets = {"test": n_test, "validation": n_val, "train": n_train}
    for split in ("test", "validation", "train"):  # held-out splits first, so they get the rarer prompts
        attempts = 0
        while len(out[split]) < targets[split]:
            attempts += 1
            if attempts > 100 * targets[split] + 1000:
                raise InputError(f"cannot draw {targets[split]} distinct {split} examples; lower the sizes")
            family, task = rng.choice(families)
            instruction, context, answer, *valid = task(rng)
            prompt = format_prompt(instruction, context)
            if prompt in seen and not (split == "train" and instruction.startswith(_TABLES)):
                continue
            seen.add(prompt)
            references = tuple(valid[0]) if valid else (answer,)
            out[split].append(TaskRecord(prompt=prompt, response=answer, references=references, family=family))
    return out
