"""A markdown report of one training run, or of several side by side: a summary table and the plots that apply.

``write_run_report(RUN_DIR)`` writes into ``RUN_DIR/report/``::

    report.md         summary table, the run's files, the plots (relative links)
    loss.png          training loss (and KD / CE loss) over optimizer steps
    ratio.png         the LATF kept ratio r            (AdaKD runs only)
    temperatures.png  mean τ with its min–max band     (AdaKD runs only)

``write_comparison_report([RUN_A, RUN_B], OUT)`` writes the same files into ``OUT`` with one column per run in the
table and the runs overlaid in each plot.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import write_text
from ..markdown import cell, table
from .metrics import METRICS_FILE, is_number, read_rows, series, training_rows
from .plots import plot_losses, plot_ratio, plot_temperatures

__all__ = [
    "REPORT_FILE",
    "run_label",
    "run_labels",
    "summarize",
    "summary_line",
    "write_comparison_report",
    "write_run_report",
]

REPORT_FILE = "report.md"
REPORT_DIR = "report"
MISSING = "\u2014"  # em dash, as in `adakd compare`: a value that a run does not have
TAIL_FRACTION = 0.1


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def summarize(rows: Sequence[Mapping]) -> dict[str, Any]:
    """The numbers of a run's summary, from its ``metrics.jsonl`` rows (training rows, and the run-end row if any).

    Returns a dict with (None where the run did not log it):

    - ``kind``: ``"adakd"`` when the rows have ``adakd/ratio``, else ``"sft"``;
    - ``steps`` (the last logged optimizer step), ``logged`` (training rows), ``final_loss``;
    - ``tail_loss``: mean loss of the rows with step > 0.9 · ``steps`` (the last 10 % of steps; at least the last
      row), ``tail_rows``: how many rows that is;
    - ``ratio_final``, ``ratio_mean``, ``ratio_min``: the LATF ratio r over the logged rows;
    - ``tau_mean`` (mean of ``adakd/tau_mean``), ``tau_min`` / ``tau_max`` (the lowest / highest logged value);
    - ``kept_fraction``: Σ kept_tokens / Σ valid_tokens (mean kept over mean valid);
    - ``train_runtime`` (s), ``train_loss``, ``train_samples_per_second``: from the run-end row.

    Raises:
        InputError: no training row (no row with ``loss``).
    """
    train = training_rows(rows)
    if not train:
        raise InputError("no training rows (lines with 'loss') to summarize")
    steps, loss = series(train, "loss")
    last = steps[-1]
    tail = [v for s, v in zip(steps, loss, strict=True) if s > (1 - TAIL_FRACTION) * last] or loss[-1:]
    _, ratio = series(train, "adakd/ratio")
    _, tau = series(train, "adakd/tau_mean")
    _, tau_min = series(train, "adakd/tau_min")
    _, tau_max = series(train, "adakd/tau_max")
    both = [r for r in train if "adakd/kept_tokens" in r and "adakd/valid_tokens" in r]
    valid = math.fsum(float(r["adakd/valid_tokens"]) for r in both)
    end = next((r for r in reversed(rows) if "loss" not in r and "train_runtime" in r), {})

    def end_value(key: str) -> float | None:
        value = end.get(key)
        return float(value) if is_number(value) else None

    return {
        "kind": "adakd" if ratio else "sft",
        "steps": int(last) if float(last).is_integer() else last,
        "logged": len(train),
        "final_loss": loss[-1],
        "tail_loss": _mean(tail),
        "tail_rows": len(tail),
        "ratio_final": ratio[-1] if ratio else None,
        "ratio_mean": _mean(ratio),
        "ratio_min": min(ratio) if ratio else None,
        "tau_mean": _mean(tau),
        "tau_min": min(tau_min) if tau_min else None,
        "tau_max": max(tau_max) if tau_max else None,
        "kept_fraction": math.fsum(float(r["adakd/kept_tokens"]) for r in both) / valid if valid > 0 else None,
        "train_runtime": end_value("train_runtime"),
        "train_loss": end_value("train_loss"),
        "train_samples_per_second": end_value("train_samples_per_second"),
    }


# --- formatting --------------------------------------------------------------------------------------------------


def _num(value: float | None, spec: str = ".4g") -> str:
    return MISSING if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f} %"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def summary_line(label: str, summary: Mapping[str, Any]) -> str:
    """One run on one line, e.g. ``run: AdaKD, 50 steps, final loss 0.00781 (last 10%: 0.00779), r 0.35 (min
    0.35, mean 0.62), mean τ 1.003, kept 58.1 %, 6.7 s``."""
    parts = [
        "AdaKD" if summary["kind"] == "adakd" else "SFT",
        f"{summary['steps']} steps",
        f"final loss {_num(summary['final_loss'])} (last 10%: {_num(summary['tail_loss'])})",
    ]
    if summary["ratio_final"] is not None:
        parts.append(
            f"r {summary['ratio_final']:.3f} (min {summary['ratio_min']:.3f}, mean {summary['ratio_mean']:.3f})"
        )
    if summary["tau_mean"] is not None:
        parts.append(f"mean τ {summary['tau_mean']:.3f}")
    if summary["kept_fraction"] is not None:
        parts.append(f"kept {_percent(summary['kept_fraction'])}")
    if summary["train_runtime"] is not None:
        parts.append(_duration(summary["train_runtime"]))
    return f"{label}: " + ", ".join(parts)


# One table row per quantity, one column per run: the same layout serves one run and a comparison.
_TABLE_ROWS: tuple[tuple[str, Any], ...] = (
    ("kind", lambda s: "AdaKD (LATF + IDTS)" if s["kind"] == "adakd" else "SFT (no distillation terms)"),
    ("optimizer steps", lambda s: str(s["steps"])),
    ("logged rows", lambda s: str(s["logged"])),
    ("final loss", lambda s: _num(s["final_loss"])),
    (
        "mean loss, last 10 % of steps",
        lambda s: f"{_num(s['tail_loss'])} ({s['tail_rows']} row{'s' if s['tail_rows'] != 1 else ''})",
    ),
    ("final ratio r", lambda s: _num(s["ratio_final"], ".3f")),
    ("mean ratio r", lambda s: _num(s["ratio_mean"], ".3f")),
    ("min ratio r", lambda s: _num(s["ratio_min"], ".3f")),
    ("kept fraction (Σ kept / Σ valid tokens)", lambda s: _percent(s["kept_fraction"])),
    ("mean τ", lambda s: _num(s["tau_mean"], ".4f")),
    ("τ range (logged min – max)", lambda s: _tau_range(s)),
    ("train loss (Trainer, whole run)", lambda s: _num(s["train_loss"])),
    ("train runtime", lambda s: _duration(s["train_runtime"])),
    ("train samples / s", lambda s: _num(s["train_samples_per_second"], ".1f")),
)


def _tau_range(s: Mapping[str, Any]) -> str:
    if s["tau_min"] is None or s["tau_max"] is None:
        return MISSING
    return f"{s['tau_min']:.3f} – {s['tau_max']:.3f}"


def _table(labels: Sequence[str], summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [[name, *(fmt(s) for s in summaries)] for name, fmt in _TABLE_ROWS]
    return table(["", *labels], rows, [":---", *("---:" for _ in labels)]).split("\n")


def _link(target: Path, base: Path) -> str:
    try:
        rel = os.path.relpath(target, base)
    except ValueError:  # another drive on Windows: no relative path exists
        rel = os.fspath(target.resolve())
    return Path(rel).as_posix()


def _files(label: str, run_dir: Path, out: Path) -> list[str]:
    metrics = run_dir / METRICS_FILE
    lines = [f"- {cell(label)}: `{run_dir}`", f"  - metrics: [metrics.jsonl]({_link(metrics, out)})"]
    final = run_dir / "final"
    lines.append(f"  - final model: [final/]({_link(final, out)})" if final.is_dir() else "  - final model: none")
    checkpoints = sorted(
        (p for p in run_dir.glob("checkpoint-*") if p.is_dir()),
        key=lambda p: (int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else math.inf, p.name),
    )
    if checkpoints:
        links = ", ".join(f"[{p.name}]({_link(p, out)})" for p in checkpoints)
        lines.append(f"  - checkpoints: {links}")
    else:
        lines.append("  - checkpoints: none")
    return lines


# --- the reports -------------------------------------------------------------------------------------------------


def _run_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    # The metrics file itself stands for its run.
    return p.parent if p.is_file() else p


def run_label(run_dir: str | os.PathLike) -> str:
    """A run's label: the name of its folder (``.`` and trailing slashes resolved)."""
    d = _run_dir(run_dir)
    return d.name or d.resolve().name or os.fspath(d)


def run_labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """One label per run: the folder name; ``parent/name`` where two names are equal; ``#i`` for the same run."""
    dirs = [_run_dir(d).resolve() for d in run_dirs]
    labels = [d.name or os.fspath(d) for d in dirs]
    labels = [
        f"{d.parent.name}/{d.name}" if labels.count(label) > 1 else label for d, label in zip(dirs, labels, strict=True)
    ]
    return [f"{label} #{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _write(run_dirs: Sequence[Path], labels: Sequence[str], out: Path, title: str) -> tuple[Path, list[dict[str, Any]]]:
    # Everything is read and checked before anything is written: a bad file leaves no half-done report.
    all_rows = [read_rows(d) for d in run_dirs]
    runs: dict[str, list[dict]] = {}
    for label, rows, d in zip(labels, all_rows, run_dirs, strict=True):
        runs[label] = training_rows(rows)
        if not runs[label]:
            raise InputError(f"{d / METRICS_FILE}: no training rows (lines with 'loss') were logged")
    summaries = [summarize(rows) for rows in all_rows]

    out.mkdir(parents=True, exist_ok=True)
    plots = [("Training loss", "loss.png", plot_losses, True)]
    has_ratio = any(series(rows, "adakd/ratio")[0] for rows in runs.values())
    has_tau = any(series(rows, "adakd/tau_mean")[0] for rows in runs.values())
    plots.append(("LATF kept ratio r", "ratio.png", plot_ratio, has_ratio))
    plots.append(("IDTS temperatures", "temperatures.png", plot_temperatures, has_tau))

    lines = [f"# {title}", ""]
    lines += ["## Summary", ""] + _table(labels, summaries) + [""]
    lines += [
        "The last-10 % loss averages the logged rows with step > 0.9 × the final step. Each logged value averages "
        "its logging window; τ min / max are per-micro-batch extremes averaged over that window.",
        "",
    ]
    lines += ["## Files", ""]
    for label, d in zip(labels, run_dirs, strict=True):
        lines += _files(label, d, out)
    lines += ["", "## Plots", ""]
    for heading, name, plot, applies in plots:
        lines.append(f"### {heading}")
        lines.append("")
        if applies:
            plot(runs, out / name)
            lines.append(f"![{heading}]({name})")
        else:
            lines.append("Not applicable: no run logged it (SFT runs have no LATF ratio nor IDTS temperatures).")
        lines.append("")
    report = out / REPORT_FILE
    write_text(report, "\n".join(lines))
    return report, summaries


def write_run_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write ``report.md`` and its plots for one run into ``output`` (default ``RUN_DIR/report/``).

    Args:
        run_dir: a folder written by ``adakd train`` (or its ``metrics.jsonl``).
        output: the report folder (created).

    Returns:
        The path of ``report.md``.

    Raises:
        InputError: the metrics file is missing, empty, corrupt (``path:line``), or has no training row.
    """
    d = _run_dir(run_dir)
    out = Path(output) if output is not None else d / REPORT_DIR
    label = run_label(d)
    report, _ = _write([d], [label], out, f"Training report: {label}")
    return report


def write_comparison_report(
    run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike, labels: Sequence[str] | None = None
) -> Path:
    """Write one ``report.md`` comparing several runs into ``output``: a column per run, the runs overlaid per plot.

    Args:
        run_dirs: folders written by ``adakd train`` (or their ``metrics.jsonl``).
        output: the report folder (created).
        labels: one per run; default :func:`run_labels` (the folder names).

    Returns:
        The path of ``report.md``.

    Raises:
        InputError: no runs, labels that do not match them, or a metrics file as in :func:`write_run_report`.
    """
    if not run_dirs:
        raise InputError("no runs to report on")
    dirs = [_run_dir(d) for d in run_dirs]
    labels = list(labels) if labels is not None else run_labels(dirs)
    if len(labels) != len(dirs):
        raise InputError(f"labels: got {len(labels)} label(s) for {len(dirs)} run(s)")
    if len(set(labels)) != len(labels):
        raise InputError("labels: a label is given more than once")
    report, _ = _write(dirs, labels, Path(output), "Training report: " + " vs ".join(labels))
    return report
