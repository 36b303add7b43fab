"""``adakd inspect``: see which tokens of one response AdaKD finds hard, keeps, and at which temperature.

adakd inspect --teacher T --student S (--text "..." [--prompt "..."] | --data FILE.jsonl --index I)
    [--ratio 0.75] [--c 0.5] [--tau-base 1.0] (--output tokens.html | --format text)

The command composes :mod:`adakd.analysis` (loads and runs the two models, scores every token) and
:mod:`adakd.report.tokens` (renders the result); here: the flags, the run's own settings, and where the text comes
from.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import input_file, write_text

__all__ = ["add_parser", "run"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def add_parser(sub) -> None:
    """Register the ``inspect`` subcommand on ``sub`` (the result of ``ArgumentParser.add_subparsers()``)."""
    p = sub.add_parser(
        "inspect",
        help="show each response token's difficulty, whether LATF keeps it, and its IDTS temperature",
        description=(
            "Run a teacher and a student over one response (after an optional prompt) and show, per response "
            "token, the Hellinger difficulty, the kept set at --ratio and the IDTS temperature of the kept "
            "tokens: an HTML page (--output) or a terminal table (--format text)."
        ),
    )
    p.add_argument("--teacher", required=True, help="the teacher: a model directory or hub id")
    p.add_argument(
        "--student", required=True, help="the student: a model directory, or a LoRA adapter (with --student-base)"
    )
    p.add_argument("--student-base", default=None, help="the base model of a LoRA adapter given as --student")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="defaults to --student (or --student-base when the adapter has none); 'byte': the built-in byte tokenizer",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", default=None, help="the response to analyse")
    source.add_argument("--data", default=None, metavar="FILE.jsonl", help="a MiniLLM-format JSONL (prompt, output)")
    p.add_argument("--index", type=int, default=None, help="the record of --data to analyse, 0-based")
    p.add_argument("--prompt", default=None, help="with --text: the formatted prompt before it (default: none)")
    from_run = "the run's (from --student's adakd_state.pt) when it has one, else"
    p.add_argument("--ratio", type=float, default=None, help=f"the kept ratio r in (0, 1]; default: {from_run} 0.75")
    p.add_argument("--c", type=float, default=None, help=f"the IDTS strength c; default: {from_run} 0.5")
    p.add_argument(
        "--tau-base", type=float, default=None, help=f"τ of a kept token at the median; default: {from_run} 1"
    )
    p.add_argument(
        "--tau-weight",
        choices=("squared", "none"),
        default=None,
        help=f"the factor on each kept token's loss: squared (τ²) or none; default: {from_run} squared",
    )
    p.add_argument(
        "--detach-tau",
        choices=("true", "false"),
        default=None,
        help=f"true (the paper: no gradient through τ) or false (the released code), shown; default: {from_run} true",
    )
    p.add_argument("--format", choices=("html", "text"), default="html", help="html (needs --output) or text")
    p.add_argument("--output", default=None, help="the HTML page to write (with --format text: the table, else stdout)")
    p.add_argument("--scale-min", type=float, default=None, help="colour scale low end (default: auto)")
    p.add_argument("--scale-max", type=float, default=None, help="colour scale high end (default: auto)")
    p.add_argument("--title", default=None, help="the page's heading")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.set_defaults(handler=run)


def _resolve_settings(args: argparse.Namespace) -> dict[str, str]:
    """Fill the loss settings not given as flags: from the run's own ``adakd_state.pt`` next to ``--student`` (a
    ``final/`` or ``checkpoint-N`` folder) when there is one, else :func:`adakd.analysis.analyse`'s defaults.
    Returns where each value came from: ``"flag"``, ``"the run's"`` or ``"default"``."""
    import inspect as pyinspect

    import torch

    from ..analysis import analyse
    from ..train.trainer import STATE_FILE

    state_path = Path(args.student) / STATE_FILE
    run: dict[str, Any] = {}
    if state_path.is_file():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            run = dict((state.get("_extra_state") or {}).get("settings") or {})
        except Exception as e:  # noqa: BLE001 - any unreadable file: say so in one line
            raise InputError(f"--student {state_path}: unreadable ({str(e).splitlines()[0]})") from None
    defaults = {k: v.default for k, v in pyinspect.signature(analyse).parameters.items()}
    defaults["detach_tau"] = True
    origin = {}
    for key in ("ratio", "c", "tau_base", "tau_weight", "detach_tau"):
        if getattr(args, key) is not None:
            origin[key] = "flag"
            continue
        value, origin[key] = (run[key], "the run's") if key in run else (defaults[key], "default")
        setattr(args, key, value)
    if not isinstance(args.detach_tau, str):
        args.detach_tau = "true" if args.detach_tau else "false"
    return origin


def _check_args(args: argparse.Namespace) -> None:
    """Reject bad flags before any model is loaded (loading a 7B teacher takes minutes)."""
    if not 0.0 < args.ratio <= 1.0:
        raise InputError(f"--ratio must be in (0, 1], got {args.ratio}")
    if not math.isfinite(args.c):
        raise InputError(f"--c must be a finite number, got {args.c}")
    if not (math.isfinite(args.tau_base) and args.tau_base > 0):
        raise InputError(f"--tau-base must be positive, got {args.tau_base}")
    for flag, value in (("--scale-min", args.scale_min), ("--scale-max", args.scale_max)):
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise InputError(f"{flag} must be in [0, 1] (Hellinger distances), got {value}")
    if args.scale_min is not None and args.scale_max is not None and args.scale_min >= args.scale_max:
        raise InputError(f"--scale-min ({args.scale_min}) must be below --scale-max ({args.scale_max})")
    if args.data is not None:
        if args.index is None:
            raise InputError(f"--data {args.data}: give the record to analyse with --index")
        if args.prompt is not None:
            raise InputError("--prompt goes with --text; --data records carry their own prompt")
    elif args.index is not None:
        raise InputError("--index goes with --data")
    if args.format == "html" and args.output is None:
        raise InputError("--output: give the HTML file to write (or use --format text)")


def _record(path: str, index: int) -> tuple[str, str]:
    """(prompt, response) of record ``index`` of a MiniLLM JSONL; the response is the first output."""
    from ..data import read_minillm_jsonl

    input_file(path, "--data")
    if index < 0:
        raise InputError(f"--index {index}: must be >= 0 (a record of --data {path})")
    records = read_minillm_jsonl(path, limit=index + 1)
    if index >= len(records):
        raise InputError(f"--index {index}: --data {path} has only {len(records)} records")
    return records[index].prompt, records[index].response


def _tokenizer_source(args: argparse.Namespace) -> tuple[str, str]:
    """Where the tokenizer comes from, and the flag that named it (for the error message)."""
    if args.tokenizer is not None:
        return args.tokenizer, "--tokenizer"
    # A LoRA adapter saved by `adakd train` holds the tokenizer; one saved elsewhere may not.
    if args.student_base is not None and not any((Path(args.student) / f).is_file() for f in _TOKENIZER_FILES):
        return args.student_base, "--student-base"
    return args.student, "--student"


def _tokenizer(args: argparse.Namespace) -> tuple[Any, str]:
    """The shared tokenizer and where it came from; one that cannot be loaded is an InputError naming the flag."""
    from ..data import tokenizer_for

    source, flag = _tokenizer_source(args)
    return tokenizer_for(source, label=flag), source


def _page_settings(args: argparse.Namespace, origin: dict[str, str], tokenizer: str, source: str) -> dict[str, str]:
    """The HTML page's header, in order: the models, the text's source and each loss setting with its origin."""
    weight = "\u03c4\u00b2 per kept token (Eq. 2)" if args.tau_weight == "squared" else "none (1 per kept token)"
    through_tau = (
        "no (detach_tau: true, the paper)"
        if args.detach_tau == "true"
        else "yes, through the scores and their median (detach_tau: false, the released code)"
    )
    return {
        "teacher": args.teacher,
        "student": args.student if args.student_base is None else f"{args.student} (LoRA on {args.student_base})",
        "tokenizer": tokenizer,
        "source": source,
        "ratio r": f"{args.ratio:.4g} ({origin['ratio']})",
        "c": f"{args.c:g} ({origin['c']})",
        "\u03c4_base": f"{args.tau_base:g} ({origin['tau_base']})",
        "loss weight": weight,
        "gradient through \u03c4": through_tau,
    }


def _write_table(args: argparse.Namespace, infos: list) -> None:
    from ..report.tokens import render_text

    settings = {key: getattr(args, key) for key in ("ratio", "c", "tau_base", "tau_weight", "detach_tau")}
    table = render_text(infos, settings)
    if args.output is None:
        sys.stdout.write(table)
    else:
        write_text(args.output, table)
        print(f"[adakd] inspect: wrote {args.output}", file=sys.stderr)


def _write_page(args: argparse.Namespace, infos: list, settings: dict[str, str], prompt: str | None) -> None:
    from ..analysis import summarize_tokens
    from ..report.tokens import render_html

    title = args.title or f"AdaKD token inspection: {Path(args.student).name or args.student}"
    write_text(args.output, render_html(infos, title, settings, prompt=prompt, scale=(args.scale_min, args.scale_max)))
    stats = summarize_tokens(infos)
    print(
        f"[adakd] inspect: kept {stats['k']} of {stats['n']} tokens (median m {stats['median']:.4f}); "
        f"wrote {args.output}",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    """Check the flags (before any model is loaded), analyse the response and write the page or the table."""
    import torch

    from ..analysis import analyse, load_model

    origin = _resolve_settings(args)
    _check_args(args)
    if args.data is not None:
        prompt, response = _record(args.data, args.index)
        source = f"{args.data} record {args.index}"
    else:
        prompt, response = args.prompt, args.text
        source = "--text"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, tok_source = _tokenizer(args)
    teacher = load_model(args.teacher, "--teacher", device=device)
    student = load_model(args.student, "--student", base=args.student_base, device=device)
    infos = analyse(
        teacher,
        student,
        tokenizer,
        prompt,
        response,
        ratio=args.ratio,
        c=args.c,
        tau_base=args.tau_base,
        tau_weight=args.tau_weight,
    )
    if args.format == "text":
        _write_table(args, infos)
    else:
        _write_page(args, infos, _page_settings(args, origin, tok_source, source), prompt)
    return 0
