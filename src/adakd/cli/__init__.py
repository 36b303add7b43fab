"""The ``adakd`` command line: one entry point, one small module per subcommand.

    adakd train CONFIG.yaml [key.sub=value ...] [--resume [CHECKPOINT]]
    adakd cache CONFIG.yaml --output DIR [--top-k K] [key.sub=value ...]
    adakd eval --model PATH --data-dir DIR --output results.json [...]
    adakd compare results_a.json results_b.json ... [--plot chart.png]
    adakd demo [--output DIR] [--quick] [--train-seeds S ...] [--ablations]
    adakd judge --predictions A.jsonl --against B.jsonl|reference --endpoint URL --model NAME
    adakd report RUN_DIR [RUN_DIR ...]
    adakd inspect --teacher T --student S (--text "..." | --data FILE --index I) [--ratio r] --output tokens.html
    adakd prune TEACHER --layers N --output DIR [--method M | --keep I,J,...] [--calibration FILE] [--compare]
    python -m adakd train ...

Bad input (an :class:`~adakd.errors.InputError`) ends with one line, ``adakd: error: ...`` naming the file, key or
flag, and exit status 2; another of adakd's own errors (a non-finite loss, a judge endpoint that stops answering)
with one line and exit status 1. Any other exception is a bug and shows its traceback. ``adakd --debug COMMAND ...``
re-raises adakd's own errors too.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from ..errors import AdakdError, InputError
from . import cache as cache_cmd
from . import compare as compare_cmd
from . import demo as demo_cmd
from . import eval as eval_cmd
from . import inspect as inspect_cmd
from . import judge as judge_cmd
from . import prune as prune_cmd
from . import report as report_cmd
from . import train as train_cmd

__all__ = ["main"]

# bitsandbytes (the `quant` extra) warns when transformers imports it, on CPUs with AVX512-BF16, that an optional
# faster kernel package is missing, and falls back to its own kernel: a line on every command, which would break
# the one-line error contract. Its real errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# The optional dependencies (pyproject extras) each command imports.
EXTRAS = {
    "train": ("train",),
    "cache": ("train",),
    "eval": ("train", "eval"),
    "compare": ("eval",),
    "demo": ("train", "eval"),
    "judge": ("judge",),
    "inspect": ("train", "eval"),
    "report": ("eval",),
    "prune": ("train",),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``adakd`` parser: one subcommand per module of this package, each setting its ``handler``."""
    parser = argparse.ArgumentParser(prog="adakd", description="Token-adaptive knowledge distillation (AdaKD).")
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"adakd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_cmd.add_parser(sub)
    cache_cmd.add_parser(sub)
    eval_cmd.add_parser(sub)
    compare_cmd.add_parser(sub)
    demo_cmd.add_parser(sub)
    judge_cmd.add_parser(sub)
    inspect_cmd.add_parser(sub)
    report_cmd.add_parser(sub)
    prune_cmd.add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``docker stop``, torchrun stopping its workers), raised where the process
    is, so that it ends as an interrupt does: files being written stay staged (never published half-written), and
    the next run resumes from the last complete checkpoint."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run ``adakd ARGV`` (default: ``sys.argv[1:]``) and return its exit status.

    0: done; 2: bad input (:class:`~adakd.errors.InputError`) or a missing optional dependency; 1: another of
    adakd's own errors; 130: interrupted (Ctrl-C); 143: terminated (SIGTERM). Each error is one
    ``adakd: error: ...`` line on stderr; any other exception propagates with its traceback (a bug), as do adakd's
    own under ``--debug``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    # Restored on return: main() is also called in-process (tests, scripts), whose own handler must survive it.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return args.handler(args)
    except ModuleNotFoundError as e:
        if args.debug or not e.name or e.name.split(".")[0] == "adakd":
            raise
        # `pip install adakd` alone installs the losses only; each command names the extras it needs.
        extras = ",".join(EXTRAS.get(args.command, ("train", "eval")))
        print(
            f"adakd: error: adakd {args.command} needs the Python module {e.name.split('.')[0]!r}, which is not "
            f"installed: pip install 'adakd[{extras}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        terminated = isinstance(e, Terminated)
        print("adakd: terminated (SIGTERM)" if terminated else "adakd: interrupted", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    except AdakdError as e:
        if args.debug:
            raise
        message = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        print(f"adakd: error: {message}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
