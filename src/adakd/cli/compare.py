"""``adakd compare A.json B.json ...``: a markdown table (and optionally a bar chart) of ``adakd eval`` results."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError


def add_parser(sub) -> None:
    """Register the ``compare`` subcommand on ``sub`` (the result of ``ArgumentParser.add_subparsers()``)."""
    p = sub.add_parser(
        "compare",
        help="compare `adakd eval --output` results files in a markdown table",
        description=(
            "Print a markdown table of ROUGE-L (mean ± std over seeds) per dataset for each results file, with "
            "deltas against a baseline file and the average over datasets; optionally save it and a bar chart."
        ),
    )
    p.add_argument("results", nargs="+", metavar="RESULTS.json", help="files written by `adakd eval --output`")
    p.add_argument(
        "--labels",
        default=None,
        metavar="A,B,...",
        help="comma-separated column labels, one per results file (default: each file's model)",
    )
    p.add_argument(
        "--baseline",
        type=int,
        default=0,
        metavar="INDEX",
        help="0-based index of the results file that the deltas are against (default: 0, the first)",
    )
    p.add_argument("--plot", default=None, metavar="OUT.png", help="also save a grouped bar chart as PNG")
    p.add_argument("--output", default=None, metavar="TABLE.md", help="also write the table to this file")
    p.set_defaults(handler=run)


def _parse_labels(text: str | None, n_files: int) -> list[str] | None:
    """``--labels A,B,...`` as a list, one non-empty, distinct label per results file; None when not given."""
    if text is None:
        return None
    labels = [label.strip() for label in text.split(",")]
    if len(labels) != n_files:
        raise InputError(f"--labels: got {len(labels)} label(s) for {n_files} results file(s)")
    if any(not label for label in labels):
        raise InputError(f"--labels: empty label in {text!r}")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise InputError(f"--labels: label {duplicates[0]!r} is given more than once")
    return labels


def _check_output(flag: str, path: str | None, inputs: list[str]) -> None:
    # A slip such as `--output b.json` for an input file would overwrite the results it was comparing.
    if path is None:
        return
    target = Path(path).resolve()
    if any(Path(p).resolve() == target for p in inputs):
        raise InputError(f"{flag}: {path} is one of the results files; refusing to overwrite it")


def run(args: argparse.Namespace) -> int:
    """Print the comparison table; write it to ``--output`` and the chart to ``--plot`` when given."""
    from ..eval.tables import compare_table, load_results
    from ..files import write_text

    labels = _parse_labels(args.labels, len(args.results))
    if not 0 <= args.baseline < len(args.results):
        raise InputError(
            f"--baseline: index {args.baseline} is out of range for {len(args.results)} results file(s) "
            f"(0 to {len(args.results) - 1})"
        )
    _check_output("--output", args.output, args.results)
    _check_output("--plot", args.plot, args.results)

    # Everything is read and checked before anything is written: a bad file leaves no half-done outputs.
    results = [load_results(path) for path in args.results]
    table = compare_table(results, labels=labels, baseline=args.baseline)
    print(table)
    if args.output:
        write_text(args.output, table + "\n")  # creates the folder
    if args.plot:
        from ..report.plots import plot_rouge

        plot_rouge(results, labels, args.plot)
    return 0
