"""The demo's synthetic instruction-following data: the task families of :mod:`adakd.data.synthetic` (six with
exact answers, four with several valid ones) split into train / validation / test.

Every split is deterministic for a seed and the splits share no prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data import Record, format_prompt
from ..data.synthetic import FAMILIES, SOFT_FAMILIES
from ..errors import InputError

__all__ = ["FAMILIES", "SOFT_FAMILIES", "TASK_SETS", "TaskRecord", "make_splits"]


@dataclass(frozen=True)
class TaskRecord(Record):
    """A demo example that knows its task family (so scores can be split by family and kind without parsing)."""

    family: str = ""

    @property
    def kind(self) -> str:
        """``soft`` (several valid answers) or ``exact`` (one right answer)."""
        return "soft" if self.family in SOFT_FAMILIES else "exact"


TASK_SETS = ("exact", "soft", "mixed")


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
