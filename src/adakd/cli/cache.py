"""``adakd cache CONFIG.yaml --output DIR [key=value ...]``: run the teacher once over the training data and store its
top-k at every supervised position, for ``adakd train CONFIG.yaml teacher.cache=DIR`` (``docs/cache.md``)."""

from __future__ import annotations

import argparse
import shlex
from typing import Any


class _Parser(argparse.ArgumentParser):
    """``key=value`` overrides may come after the options too (``adakd cache cfg.yaml --output DIR data.limit=10``):
    argparse fills a ``*`` positional from the first run of positionals only, and leaves the later ones over."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        later = [a for a in extras if "=" in a and not a.startswith("-")]
        namespace.overrides = [*getattr(namespace, "overrides", []), *later]
        return namespace, [a for a in extras if a not in later]


# Above this mean tail mass the measured fidelity of a cache falls off (docs/cache.md, "Fidelity").
TAIL_WARN = 0.01
TAIL_ADVICE = (
    " (above 1%: the scores and gradients may differ markedly from the live teacher's; raise --top-k until it is "
    "below 1%, e.g. 512 for SmolLM2-135M-Instruct; a student far from the teacher, such as one just pruned from it, "
    "puts most of its mass outside the teacher's top-k, where the cache sees one bucket: train it with the live "
    "teacher first, docs/cache.md)"
)


def add_parser(sub: Any) -> None:
    """Register ``adakd cache`` on the subcommand parsers ``sub``."""
    p = sub.add_parser(
        "cache",
        help="store the teacher's top-k on the training data, to train without loading the teacher",
        description=(
            "Run the config's teacher over its training data (tokenised as adakd train does) and store, at every "
            "supervised position, its top-k token ids and log-probabilities and the log of the rest of its mass. "
            "Train from it with: adakd train CONFIG.yaml teacher.cache=DIR. Run the same command again to continue "
            "an interrupted cache (the shards there are checked; a damaged one is computed again); one run per DIR at "
            "a time (DIR/build.lock); launch it with torchrun to share the shards among processes."
        ),
    )
    p.add_argument("config", help="the run's YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="as for adakd train, e.g. data.limit=1000")
    p.add_argument("--output", required=True, metavar="DIR", help="the cache folder")
    p.add_argument("--top-k", type=int, default=32, metavar="K", help="tokens kept per position (default: 32)")
    p.add_argument(
        "--dtype",
        default="float16",
        help="storage dtype of the log-probabilities: float16 (default) or float32; the tail is always float32",
    )
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="examples per teacher pass (default: 8)")
    p.add_argument(
        "--shard-examples", type=int, default=1024, metavar="N", help="examples per shard file (default: 1024)"
    )
    p.add_argument("--overwrite", action="store_true", help="delete the cache DIR holds first, and start over")
    p.set_defaults(handler=run)
    p.__class__ = _Parser  # the subcommand's parser, made by add_subparsers' class; only this method differs


def run(args: argparse.Namespace) -> int:
    """Compute (or complete) the cache and print one summary line with the command that trains from it; 0 when done.

    Raises:
        InputError: a bad flag or ``--output`` folder; a :class:`~adakd.train.config.ConfigError` for a config that
            cannot be cached (no teacher, on-policy, streamed data) or that training would refuse.
    """
    from ..cache import build_cache
    from ..train import load_config

    config = load_config(args.config, args.overrides)
    summary = build_cache(
        config,
        args.output,
        top_k=args.top_k,
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_examples=args.shard_examples,
        overwrite=args.overwrite,
    )
    if summary["rank"] == 0:
        train = shlex.join(["adakd", "train", args.config, *args.overrides, f"teacher.cache={args.output}"])
        computed = summary["computed_shards"]
        done = f"{computed} shards computed" if computed else "complete already"
        print(
            f"[adakd] cache {args.output}: {summary['examples']} examples, {summary['positions']} positions, "
            f"{summary['shards']} shards, {summary['bytes']} bytes ({summary['bytes_per_position']:.1f} bytes per "
            f"position; {done}); the teacher's mean mass outside the top-{summary['top_k']}: {summary['tail_mass']:.2%}"
            f"{TAIL_ADVICE if summary['tail_mass'] > TAIL_WARN else ''}; train from it: {train}",
            flush=True,
        )
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Leave the process group (``torchrun``); every process has passed the cache's final barrier."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
