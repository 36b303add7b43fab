"""``adakd report RUN_DIR [RUN_DIR ...] [--output DIR]``: a markdown report with plots of training runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError

#: Where a report comparing several runs goes when --output is not given (one run's goes into RUN_DIR/report/).
DEFAULT_COMPARISON_DIR = "adakd-report"


def add_parser(sub) -> None:
    """Register the ``report`` subcommand on ``sub`` (the result of ``ArgumentParser.add_subparsers()``)."""
    p = sub.add_parser(
        "report",
        help="write a markdown report with plots (loss, LATF ratio, IDTS τ) of training runs",
        description=(
            "Read RUN_DIR/metrics.jsonl of runs written by `adakd train` and write report.md with a summary table "
            "and plots: the training loss, and for AdaKD runs the LATF kept ratio r and the IDTS temperatures. "
            "One run: the report goes into RUN_DIR/report/. Several runs: one report compares them (labels are "
            f"the folder names), in ./{DEFAULT_COMPARISON_DIR}/ by default."
        ),
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of an `adakd train` run")
    p.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help=f"the report folder (default: RUN_DIR/report for one run, ./{DEFAULT_COMPARISON_DIR} for several)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Write the report, print where it is and one summary line per run."""
    from ..report.metrics import read_rows
    from ..report.run_report import (
        run_labels,
        summarize,
        summary_line,
        write_comparison_report,
        write_run_report,
    )

    for d in args.run_dirs:
        if not Path(d).exists():
            raise InputError(f"{d}: no such run directory")
    if args.output is not None and Path(args.output).exists() and not Path(args.output).is_dir():
        raise InputError(f"--output: {args.output} exists and is not a directory")

    if len(args.run_dirs) == 1:
        report = write_run_report(args.run_dirs[0], args.output)
    else:
        report = write_comparison_report(args.run_dirs, args.output or DEFAULT_COMPARISON_DIR)
    print(f"report: {report}")
    for label, d in zip(run_labels(args.run_dirs), args.run_dirs, strict=True):
        print(summary_line(label, summarize(read_rows(d))))
    return 0
