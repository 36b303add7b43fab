"""Comparing training methods honestly: paired differences over training seeds, with a t interval.

Two methods trained from the same starting point with the same training seed share most of their randomness (data
order, initial state), so the difference of their scores, seed by seed, varies much less than either score. A
method differs from another only when the 95% interval of that paired difference excludes 0. The spread over
*sampling* seeds of one trained model is decoding noise and is reported apart: it says nothing about training.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["T95", "t95", "paired_difference", "mean_std", "format_mean_std", "format_difference", "plot_differences"]

# Two-sided 95% Student-t quantiles by degrees of freedom; beyond 30, the normal 1.96.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t95(df: int) -> float:
    """The two-sided 95% t quantile for ``df`` degrees of freedom (the next tabulated df below: conservative);
    NaN below 1."""
    if df < 1:
        return math.nan
    return T95[max(k for k in T95 if k <= df)] if df <= 30 else 1.96


def paired_difference(method: Mapping[object, float], baseline: Mapping[object, float]) -> dict[str, float] | None:
    """``method − baseline`` over the seeds both have (each a mapping seed → score): mean, sample std, the 95% t
    interval (``low``, ``high``; NaN with one pair) and ``n``; None without a common seed."""
    diffs = [method[s] - baseline[s] for s in method if s in baseline]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    half = t95(len(diffs) - 1) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": len(diffs)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std); the std is NaN for a single value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``mean ± std`` over ``values`` (the mean alone for one value, ``–`` for none)."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_difference(d: Mapping[str, float] | None, digits: int = 2) -> str:
    """``+m [low, high]`` with `` *`` when the interval excludes 0; ``+m (1 pair)`` without an interval."""
    if d is None:
        return "–"
    if d["n"] < 2:
        return f"{d['mean']:+.{digits}f} (1 pair)"
    verdict = "" if d["low"] <= 0 <= d["high"] else " *"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]{verdict}"


def plot_differences(
    rows: Sequence[tuple[str, Mapping[str, Mapping[str, float] | None]]], path: str | os.PathLike, xlabel: str
) -> Path:
    """One line per row label; per series (e.g. ``sampled``, ``greedy``) a dot at the mean paired difference with
    its 95% interval as a bar, and a vertical line at 0."""
    from .figures import figure, save

    series = list(dict.fromkeys(name for _, by_series in rows for name in by_series))
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    fig, ax = figure(9.5, 1.0 + 0.55 * max(1, len(rows)) * max(1, len(series)) ** 0.5, layout="tight")
    width = 0.6 / max(1, len(series))
    for j, name in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * width
        for i, (_, by_series) in enumerate(rows):
            d = by_series.get(name)
            if d is None:
                continue
            err = None if math.isnan(d["high"]) else [[d["mean"] - d["low"]], [d["high"] - d["mean"]]]
            ax.errorbar(
                d["mean"],
                i + offset,
                xerr=err,
                fmt="o",
                color=colours[j % len(colours)],
                capsize=4,
                label=name if i == next(k for k, (_, b) in enumerate(rows) if b.get(name) is not None) else None,
            )
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if series:  # beside the axes, where it cannot cover an interval
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save(fig, path)
