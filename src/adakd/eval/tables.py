"""Compare ``adakd eval --output results.json`` files: a markdown table, a one-line summary, and the numbers of the
grouped bar chart that :func:`adakd.report.plots.plot_rouge` draws.

A results file looks like::

    {"model": "path/or/name",
     "datasets": {"dolly": {"n": 500, "rougeL": {"mean": 26.1, "std": 0.3, "per_seed": {"10": 26.0, "20": 26.4}}}},
     "average": {"mean": 30.2, "std": 0.2}}

ROUGE-L is on a 0-100 scale; ``mean``/``std`` are over seeds and ``average`` is over datasets. Unknown keys
("protocol", ...) are ignored; of ``generation``, the prompt rendering (``chat_template``) and the decoding
(``greedy``) are compared, and a note under the table names the files where they differ.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..markdown import table as markdown_table

__all__ = [
    "MINUS",
    "compare_table",
    "default_labels",
    "load_results",
    "rouge_groups",
    "summary_line",
    "validate_results",
]

#: Negative deltas use the typographic minus sign (U+2212) so that ``+0.84`` and ``−0.31`` line up in a table.
MINUS = "\u2212"
MISSING = "\u2014"  # em dash: a dataset that a results file does not have

# load_results records where a dict came from, so that labels can be disambiguated by file name and errors can
# name the file. The leading underscore keeps it apart from anything `adakd eval` writes.
PATH_KEY = "_path"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but `"mean": true` is a broken file, not 1.0.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_stat(stat: Any, source: str, key: str, *, require_std: bool = True) -> None:
    if not isinstance(stat, dict):
        raise InputError(f"{source}: key '{key}' must be an object with 'mean' and 'std', got {_type_name(stat)}")
    if "mean" not in stat:
        raise InputError(f"{source}: missing key '{key}.mean'")
    if not _is_number(stat["mean"]):
        raise InputError(f"{source}: key '{key}.mean' must be a number, got {_type_name(stat['mean'])}")
    if "std" not in stat:
        if require_std:
            raise InputError(f"{source}: missing key '{key}.std'")
    # A single-seed run has no spread; eval may write null for it.
    elif stat["std"] is not None and not _is_number(stat["std"]):
        raise InputError(f"{source}: key '{key}.std' must be a number or null, got {_type_name(stat['std'])}")


def validate_results(data: Any, source: str = "<results>") -> dict:
    """Check that ``data`` has the shape of a results file; return it unchanged.

    Raises :class:`~adakd.errors.InputError` whose one-line message names ``source`` and the dotted key that is
    missing or ill-typed.
    """
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a JSON object at the top level, got {_type_name(data)}")
    if "model" not in data:
        raise InputError(f"{source}: missing key 'model'")
    if not isinstance(data["model"], str):
        raise InputError(f"{source}: key 'model' must be a string, got {_type_name(data['model'])}")
    if "datasets" not in data:
        raise InputError(f"{source}: missing key 'datasets'")
    datasets = data["datasets"]
    if not isinstance(datasets, dict):
        raise InputError(f"{source}: key 'datasets' must be an object, got {_type_name(datasets)}")
    if not datasets:
        raise InputError(f"{source}: key 'datasets' is empty")
    for name, entry in datasets.items():
        key = f"datasets.{name}"
        if not isinstance(entry, dict):
            raise InputError(f"{source}: key '{key}' must be an object, got {_type_name(entry)}")
        if "n" in entry and (not isinstance(entry["n"], int) or isinstance(entry["n"], bool)):
            raise InputError(f"{source}: key '{key}.n' must be an integer, got {_type_name(entry['n'])}")
        if "rougeL" not in entry:
            raise InputError(f"{source}: missing key '{key}.rougeL'")
        rouge = entry["rougeL"]
        _check_stat(rouge, source, f"{key}.rougeL")
        if "per_seed" in rouge:
            per_seed = rouge["per_seed"]
            if not isinstance(per_seed, dict):
                raise InputError(f"{source}: key '{key}.rougeL.per_seed' must be an object, got {_type_name(per_seed)}")
            for seed, value in per_seed.items():
                if not _is_number(value):
                    raise InputError(
                        f"{source}: key '{key}.rougeL.per_seed.{seed}' must be a number, got {_type_name(value)}"
                    )
    if "average" not in data:
        raise InputError(f"{source}: missing key 'average'")
    _check_stat(data["average"], source, "average")
    return data


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate one ``adakd eval --output`` file.

    The returned dict is the file's content plus ``"_path"`` (the path as given), which :func:`compare_table`
    uses to tell apart two files of the same model. Raises :class:`~adakd.errors.InputError` when the file cannot
    be read (missing, not UTF-8), is not valid JSON or has a wrong shape; the message names the file (and the key).
    """
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{source}: not a UTF-8 text file ({e.reason})") from e
    except OSError as e:
        raise InputError(f"{source}: cannot read results file ({e.strerror or e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    validate_results(data, source)
    data[PATH_KEY] = source
    return data


def _source(result: dict, index: int) -> str:
    return str(result.get(PATH_KEY, f"results #{index}"))


def _validated(results: list[dict]) -> list[dict]:
    if not results:
        raise InputError("no results to compare: give at least one results file")
    return [validate_results(r, _source(r, i)) for i, r in enumerate(results)]


def default_labels(results: list[dict]) -> list[str]:
    """One label per results dict: its ``model``, plus the file name (or path) where two models are equal."""

    def refine(labels: list[str], suffix) -> list[str]:
        # Counts come from the list before this pass, so that renaming one duplicate does not unmask the other.
        return [suffix(i, label) if labels.count(label) > 1 else label for i, label in enumerate(labels)]

    def path(i: int) -> str | None:
        return results[i].get(PATH_KEY)

    models = [r["model"] for r in results]
    labels = refine(models, lambda i, m: f"{m} ({Path(path(i)).name})" if path(i) else f"{m} (#{i})")

    # Same file name in different folders (run1/results.json, run2/results.json): the full path. Not for the
    # same file given twice, where the path tells nothing more than the name did.
    def by_path(i: int, label: str) -> str:
        paths = {path(j) for j, other in enumerate(labels) if other == label}
        return f"{models[i]} ({path(i)})" if path(i) and len(paths) > 1 else label

    labels = refine(labels, by_path)
    # The same file given twice: nothing left to tell them apart but the position.
    return refine(labels, lambda i, label: f"{label} #{i}")


def _resolve_labels(results: list[dict], labels: list[str] | None) -> list[str]:
    if labels is None:
        return default_labels(results)
    labels = list(labels)
    if len(labels) != len(results):
        raise InputError(f"labels: got {len(labels)} label(s) for {len(results)} results file(s)")
    for label in labels:
        if not label.strip():
            raise InputError("labels: a label is empty")
        if labels.count(label) > 1:
            raise InputError(f"labels: label {label!r} is given more than once")
    return labels


def _dataset_union(results: list[dict]) -> list[str]:
    names: dict[str, None] = {}  # an ordered set: order of first appearance across the files
    for r in results:
        names.update(dict.fromkeys(r["datasets"]))
    return list(names)


def _stat(result: dict, dataset: str) -> dict | None:
    entry = result["datasets"].get(dataset)
    return None if entry is None else entry["rougeL"]


def _fmt_stat(stat: dict | None) -> str:
    if stat is None:
        return MISSING
    std = stat.get("std")
    if std is None:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {std:.2f}"


def _fmt_delta(value: float | None) -> str:
    if value is None:
        return MISSING
    if math.isnan(value):
        return "nan"
    text = f"{abs(value):.2f}"
    # A delta that rounds to zero reads as +0.00, never as a signed "−0.00".
    if value < 0 and text.strip("0.") != "":
        return MINUS + text
    return "+" + text


def compare_table(results: list[dict], labels: list[str] | None = None, baseline: int = 0) -> str:
    """A GitHub markdown table comparing results files, one row per dataset plus a final ``average`` row.

    Each file gets a ``mean ± std`` column; every file except the baseline is followed by a ``Δ vs <baseline>``
    column (mean minus the baseline's mean, 2 decimals, signed with ``+`` or a real minus sign ``−``). Datasets
    are the union over the files in order of first appearance; a dataset a file lacks shows ``—``. Labels
    default to each file's ``model`` (see :func:`default_labels`). When the files cover different datasets, a
    note under the table says that their averages are not over the same datasets; when their answers were generated
    with different prompts (``--chat-template`` or not) or decoding (greedy or sampled), another note names them.
    """
    results = _validated(results)
    labels = _resolve_labels(results, labels)
    if not 0 <= baseline < len(results):
        raise InputError(f"baseline: index {baseline} is out of range for {len(results)} results file(s)")
    base_label = labels[baseline]

    header = ["dataset"]
    align = [":---"]
    for i, label in enumerate(labels):
        header.append(label)
        align.append("---:")
        if i != baseline:
            header.append(f"Δ vs {base_label}")
            align.append("---:")

    def row(name: str, stats: list[dict | None]) -> list[str]:
        cells = [name]
        for i, stat in enumerate(stats):
            cells.append(_fmt_stat(stat))
            if i != baseline:
                base_stat = stats[baseline]
                delta = None if stat is None or base_stat is None else stat["mean"] - base_stat["mean"]
                cells.append(_fmt_delta(delta))
        return cells

    datasets = _dataset_union(results)
    rows = [row(name, [_stat(r, name) for r in results]) for name in datasets]
    rows.append(row("average", [r["average"] for r in results]))

    lines = markdown_table(header, rows, align).split("\n")
    # Averages over different dataset sets are not comparable; say so rather than let the delta pass as one.
    lacking = [
        f"{label} lacks {', '.join(n for n in datasets if n not in r['datasets'])}"
        for label, r in zip(labels, results, strict=True)
        if len(r["datasets"]) != len(datasets)
    ]
    if lacking:
        lines += ["", f"Note: the averages are over different datasets ({'; '.join(lacking)})."]
    differing = _differing_settings(results, labels)
    if differing:
        lines += ["", f"Note: the answers were generated differently ({'; '.join(differing)})."]
    return "\n".join(lines)


def _settings(result: dict) -> dict[str, str] | None:
    """How a results file's answers were generated, as far as it says (``generation``; None when it does not): the
    prompts (raw, or rendered with a chat template) and the decoding (sampled or greedy)."""
    gen = result.get("generation")
    if not isinstance(gen, dict):
        return None
    chat = gen.get("chat_template")  # absent in files written before --chat-template: raw prompts
    return {
        "prompts": "raw prompts" if chat is None else f"chat template {chat}",
        "decoding": "greedy" if gen.get("greedy") else "sampled",
    }


def _differing_settings(results: list[dict], labels: list[str]) -> list[str]:
    """``label: setting, ...`` for each file, over the settings that are not the same in every file that records
    them; empty when they agree."""
    known = [(label, s) for label, r in zip(labels, results, strict=True) if (s := _settings(r)) is not None]
    keys = [k for k in ("prompts", "decoding") if len({s[k] for _, s in known}) > 1]
    return [f"{label}: {', '.join(s[k] for k in keys)}" for label, s in known] if keys else []


def summary_line(result: dict) -> str:
    """One results file on one line: ``model: dolly 26.10 ± 0.30, sinst ... | average 30.20 ± 0.20 (5 seeds)``."""
    result = validate_results(result, _source(result, 0))
    parts = [f"{name} {_fmt_stat(entry['rougeL'])}" for name, entry in result["datasets"].items()]
    seed_counts = {len(e["rougeL"]["per_seed"]) for e in result["datasets"].values() if "per_seed" in e["rougeL"]}
    seeds = ""
    # Only when every dataset agrees; mixed counts would need a per-dataset note that a one-liner cannot hold.
    if len(seed_counts) == 1 and (count := seed_counts.pop()) > 0:
        seeds = f" ({count} seed{'s' if count != 1 else ''})"
    return f"{result['model']}: {', '.join(parts)} | average {_fmt_stat(result['average'])}{seeds}"


def rouge_groups(
    results: list[dict], labels: list[str] | None = None
) -> tuple[list[str], list[tuple[str, list[float], list[float]]]]:
    """ROUGE-L of each results file per dataset, as a grouped chart needs it (:func:`adakd.report.plots.plot_rouge`).

    Returns:
        ``(names, bars)``: the datasets in order of first appearance and then ``"average"``; one ``(label, means,
        stds)`` per file, with a value per name. A dataset the file lacks has mean NaN (a gap, not a score of 0);
        a missing std is 0.

    Raises:
        InputError: a malformed results dict, or labels that do not match the files.
    """
    results = _validated(results)
    labels = _resolve_labels(results, labels)
    groups = _dataset_union(results)
    bars = []
    for r, label in zip(results, labels, strict=True):
        stats = [_stat(r, g) for g in groups] + [r["average"]]
        means = [s["mean"] if s is not None else math.nan for s in stats]
        stds = [(s.get("std") or 0.0) if s is not None else 0.0 for s in stats]
        bars.append((label, means, stds))
    return [*groups, "average"], bars
