"""``adakd demo``: the whole pipeline on this CPU in minutes, nothing downloaded."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``adakd demo`` on the subcommand parsers ``sub``."""
    p = sub.add_parser(
        "demo",
        help="train a teacher and students on synthetic tasks, compare RKL and AdaKD-RKL over training seeds",
        description=(
            "A teacher trained from scratch and one long SFT warm-start of a smaller student; RKL and AdaKD-RKL "
            "continued from it for 3 training seeds; ROUGE-L sampled and greedy on single-answer and several-answer "
            "tasks; AdaKD - RKL paired by training seed with a 95%% interval; report.md with plots. About 5 minutes "
            "on a 2-core CPU (--quick: a 1-2 minute smoke check with one training seed and no comparison)."
        ),
    )
    p.add_argument("--output", default="adakd-demo", help="folder for the data, runs, evaluation and report")
    p.add_argument("--quick", action="store_true", help="a smoke check: smaller budgets, one training seed")
    p.add_argument("--seed", type=int, default=0, help="the data, tokenizer, teacher and warm-start seed")
    p.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="the students' training seeds (default: 0 1 2; --quick: 0); two or more for a comparison",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also train SFT, RKL + LATF only, RKL + IDTS only and AdaKD-RKL without the tau^2 weight (longer)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo into ``--output``; 0 when done (repeated ``--train-seeds`` are an InputError)."""
    from ..demo import run_demo

    run_demo(
        args.output,
        quick=args.quick,
        seed=args.seed,
        ablations=args.ablations,
        train_seeds=None if args.train_seeds is None else tuple(args.train_seeds),
    )
    return 0
