"""``adakd prune TEACHER --layers N --output DIR``: a depth-pruned student, N of the teacher's decoder layers kept,
chosen by measurement on calibration text (``docs/prune.md``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import InputError

__all__ = ["add_parser", "run"]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # the losses' install has torch; this only guards the help text
        return False


def add_parser(sub: Any) -> None:
    """Register ``adakd prune`` on the subcommand parsers ``sub``."""
    p = sub.add_parser(
        "prune",
        help="a depth-pruned student: N of the teacher's layers, chosen by measurement",
        description=(
            "Build a student that keeps N of the teacher's decoder layers (their weights exactly, in order; "
            "embeddings, final norm and head as they are) and save it as a Hugging Face folder with the teacher's "
            "tokenizer. The layers are chosen by block influence (importance), by the contiguous block whose ends "
            "are closest (contiguous), evenly (even) or named (--keep), measured on --calibration text; the "
            "teacher's and the student's CE on held-out records are printed and stored in DIR/prune.json. "
            "--compare measures all three methods."
        ),
    )
    p.add_argument("teacher", metavar="TEACHER", help="the teacher: a model folder or hub id")
    p.add_argument("--layers", type=int, default=None, metavar="N", help="decoder layers to keep (1 ≤ N < L)")
    p.add_argument("--output", required=True, metavar="DIR", help="the student's folder (refused if it exists)")
    p.add_argument(
        "--method",
        default=None,
        metavar="METHOD",
        help="importance (default: keep the N layers of largest block influence), contiguous (remove the block of "
        "L − N layers whose ends are closest, never the last layer) or even (first and last included)",
    )
    p.add_argument("--keep", default=None, metavar="I,J,...", help="keep these layer indices (0-based) instead")
    p.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="JSONL calibration text: chat messages, MiniLLM prompt/output, prompt/completion or instructions; "
        "needed by importance, contiguous and --compare",
    )
    p.add_argument(
        "--calibration-examples", type=int, default=64, metavar="K", help="the first K records score the layers"
    )
    p.add_argument(
        "--eval-examples", type=int, default=32, metavar="E", help="the next E records measure the CE (0: none)"
    )
    p.add_argument("--max-length", type=int, default=256, metavar="T", help="tokens per record, at most")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="records per forward (default: 8)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="where the teacher runs")
    p.add_argument("--compare", action="store_true", help="measure every method's CE and print a table first")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def parse_keep(text: str | None) -> list[int] | None:
    """``"0,1,5"`` -> ``[0, 1, 5]``; the order is checked later (layers keep the teacher's order)."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"--keep {text}: expected comma-separated layer indices, e.g. 0,1,5") from None


def run(args: argparse.Namespace) -> int:
    """Prune, print the CE lines (and the --compare table), save; 0 when done.

    Raises:
        InputError: a bad flag, calibration file or record, an unsupported teacher, or an existing DIR.
    """
    from ..prune.run import PruneOptions, prune_teacher

    opts = PruneOptions(
        teacher=args.teacher,
        output=args.output,
        layers=args.layers,
        method=args.method,
        keep=parse_keep(args.keep),
        calibration=args.calibration,
        calibration_examples=args.calibration_examples,
        eval_examples=args.eval_examples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        compare=args.compare,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    record = prune_teacher(opts)
    print(summary(record, opts.output))
    return 0


def summary(record: dict[str, Any], output: str) -> str:
    """The lines ``adakd prune`` prints: the teacher's CE, the --compare table, the student's CE and folder."""
    from ..markdown import table

    lines = []
    L, kept, ce = record["teacher_layers"], record["kept"], record["ce"]
    if ce is not None:
        lines.append(f"[adakd] teacher {record['teacher']}: {L} layers, CE {_ce(ce['teacher'])}")
    if "compare" in record:
        rows = [("teacher", f"all {L}", *_cells(ce and ce["teacher"]))]
        rows += [(row["method"], ",".join(map(str, row["kept"])), *_cells(row)) for row in record["compare"]]
        lines += ["", table(("method", "kept layers", "CE", "response CE"), rows), ""]
    shown = ",".join(map(str, kept))
    measured = f", CE {_ce(ce['pruned'])}" if ce is not None else ""
    lines.append(f"[adakd] student ({record['method']}): {len(kept)} of {L} layers kept ({shown}){measured}")
    lines.append(f"[adakd] saved {output} (the scores and CE: {output}/prune.json)")
    return "\n".join(lines)


def _ce(m: dict[str, Any]) -> str:
    return (
        f"{m['ce']:.4f} nats/token on {m['tokens']} held-out tokens (response tokens: {m['response_ce']:.4f} on "
        f"{m['response_tokens']})"
    )


def _cells(m: dict[str, Any] | None) -> tuple[str, str]:
    if not m or "ce" not in m:
        return "", ""
    return f"{m['ce']:.4f}", f"{m['response_ce']:.4f}"
