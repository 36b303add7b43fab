"""Reports: plots of training runs (``RUN_DIR/metrics.jsonl``), a markdown summary (``adakd report``), the
ROUGE-L chart of ``adakd compare``, and the token inspector's page (:mod:`adakd.report.tokens`). Rendering only:
the models are run by :mod:`adakd.analysis`.

Needs matplotlib (the ``eval`` extra).
"""

from __future__ import annotations

from .metrics import read_metrics
from .plots import plot_losses, plot_ratio, plot_rouge, plot_tau_vs_difficulty, plot_temperatures
from .run_report import summarize, write_comparison_report, write_run_report

__all__ = [
    "plot_losses",
    "plot_ratio",
    "plot_rouge",
    "plot_tau_vs_difficulty",
    "plot_temperatures",
    "read_metrics",
    "summarize",
    "write_comparison_report",
    "write_run_report",
]
