"""Reports of training runs: plots of ``RUN_DIR/metrics.jsonl`` and a markdown summary (``adakd report``).

Needs matplotlib (the ``eval`` extra).
"""

from __future__ import annotations

from .plots import plot_losses, plot_ratio, plot_tau_vs_difficulty, plot_temperatures, read_metrics
from .run_report import summarize, write_comparison_report, write_run_report

__all__ = [
    "plot_losses",
    "plot_ratio",
    "plot_tau_vs_difficulty",
    "plot_temperatures",
    "read_metrics",
    "summarize",
    "write_comparison_report",
    "write_run_report",
]
