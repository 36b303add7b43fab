"""``adakd train CONFIG.yaml [key=value ...]``: distil (or SFT) as the config says."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``adakd train`` on the subcommand parsers ``sub``."""
    p = sub.add_parser(
        "train",
        help="train a student from a YAML config",
        description="Train a student from a YAML config; key.sub=value arguments override config entries.",
    )
    p.add_argument("config", help="the run's YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. training.max_steps=10 loss.ratio=0.5")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="resume from CHECKPOINT, or from the last checkpoint in output_dir when no path is given",
    )
    p.add_argument(
        "--accept-changes",
        action="store_true",
        help="with --resume: go on although the checkpoint was trained with other settings (loss, data, learning "
        "rate, seed, ...); without it such a resume is refused, naming each difference",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds an earlier run (deletes its checkpoints, final model, metrics)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the config with its overrides, train, report the summary on stderr; 0 when done.

    Bad input raises :class:`~adakd.errors.InputError` (the config, its files and models, the checkpoint to resume);
    a non-finite loss under ``loss.nonfinite: error`` raises :class:`~adakd.errors.NonFiniteLossError`.
    """
    from ..errors import InputError
    from ..train import load_config
    from ..train import run as run_training

    config = load_config(args.config, args.overrides)
    if args.accept_changes and not args.resume:
        raise InputError("--accept-changes: applies only with --resume")
    summary = run_training(config, resume=args.resume, overwrite=args.overwrite, accept_changes=args.accept_changes)
    # Every rank reports, so that a multi-process run shows each rank's final ratio. One write of the whole line:
    # print() writes the text and the newline apart, and two ranks sharing a pipe then glue their lines together.
    sys.stderr.write(f"[adakd] rank {summary['rank']}: {json.dumps(summary)}\n")
    sys.stderr.flush()
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Leave the process group together: a rank that exits while another still talks to it can abort in gloo's
    teardown ("terminate called without an active exception") and fail a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
