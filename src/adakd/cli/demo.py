"""``adakd demo``: the whole pipeline on this CPU in minutes, nothing downloaded."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train a teacher and three students on synthetic tasks, evaluate them, write a report",
        description=(
            "A teacher trained from scratch, students distilled by SFT, RKL KD and AdaKD-RKL with the same budget, "
            "ROUGE-L over 3 seeds, and report.md with plots. About 5 minutes on a 2-core CPU (--quick: 2)."
        ),
    )
    p.add_argument("--output", default="adakd-demo", help="folder for the data, runs, evaluation and report")
    p.add_argument("--quick", action="store_true", help="smaller budgets: about 2 minutes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.output, quick=args.quick, seed=args.seed)
    return 0
