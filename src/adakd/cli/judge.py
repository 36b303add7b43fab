"""``adakd judge --predictions A.jsonl --against B.jsonl|reference --endpoint URL --model NAME``: LLM-as-judge.

Pairwise comparison by an OpenAI-compatible chat model, each pair judged in both orders (see
:mod:`adakd.eval.judge`). Prints a one-line summary and writes counts, rates and per-example verdicts to ``--output``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..eval.judge.defaults import (
    DEFAULT_API_KEY_ENV,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_TOKENS,
    DEFAULT_RETRIES,
    DEFAULT_TEMPERATURE,
    DEFAULT_TIMEOUT,
)
from ..files import write_json


def add_parser(sub: Any) -> None:
    """Register the ``judge`` subcommand on ``sub`` (an ``argparse`` subparsers action)."""
    p = sub.add_parser(
        "judge",
        help="compare predictions pairwise with an LLM judge (win/tie/loss)",
        description=(
            "Compare the predictions of A.jsonl (written by `adakd eval`) with the reference answers or with another "
            "model's predictions, using an OpenAI-compatible chat model as the judge. Each pair is judged in both "
            "orders; A wins only when both orders prefer it, loses only when both prefer the other answer."
        ),
    )
    p.add_argument("--predictions", required=True, metavar="A.jsonl", help="predictions of the model under test")
    p.add_argument(
        "--against",
        required=True,
        metavar="B.jsonl|reference",
        help="'reference' for the first reference answer of each record, or another predictions file "
        "(matched by prompt; write ./reference for a file of that name)",
    )
    _add_judge_options(p)
    p.add_argument(
        "--cache",
        default=None,
        metavar="PATH",
        help="JSONL cache of judge replies, reused by reruns (default: OUTPUT with the suffix .cache.jsonl)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write a cache")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="judge only the first N records of A")
    p.add_argument(
        "--output", default="judge.json", metavar="PATH", help="where to write the JSON report (default judge.json)"
    )
    p.set_defaults(handler=run)


def _add_judge_options(p: argparse.ArgumentParser) -> None:
    """The options of the judge itself: the server, the model, its sampling settings and the request policy."""
    p.add_argument(
        "--endpoint",
        required=True,
        metavar="URL",
        help="base URL of the OpenAI-compatible API, e.g. http://localhost:8000/v1 or https://api.openai.com/v1 "
        "(requests go to URL/chat/completions)",
    )
    p.add_argument("--model", required=True, metavar="NAME", help="the judge model, as the server names it")
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help=f"environment variable holding the API key, sent as a Bearer token if set (default {DEFAULT_API_KEY_ENV})",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"requests in flight at once (default {DEFAULT_CONCURRENCY})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SEC",
        help=f"limit on each connect and each read of a request (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        metavar="N",
        help="retries on connection errors, timeouts, HTTP 408, 409, 429 and 5xx, after the server's Retry-After or "
        f"else 0.5 s, 1 s, 2 s, ... up to 8 s (default {DEFAULT_RETRIES})",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        metavar="T",
        help=f"judge sampling temperature (default {DEFAULT_TEMPERATURE})",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help=f"judge reply length limit (default {DEFAULT_MAX_TOKENS})",
    )


def default_cache_path(output: str | os.PathLike[str]) -> Path:
    """The cache next to the report: ``judge.json`` -> ``judge.cache.jsonl``."""
    output = Path(output)
    return output.with_name(output.stem + ".cache.jsonl")


def _api_key(name: str | None) -> str | None:
    """The key in ``$name`` (default ``$OPENAI_API_KEY``); a variable named on the command line but unset warns."""
    key_env = name or DEFAULT_API_KEY_ENV
    api_key = os.environ.get(key_env) or None
    if api_key is None and name:
        print(f"adakd judge: warning: ${key_env} is not set, sending no Authorization header", file=sys.stderr)
    return api_key


def _pairs(args: argparse.Namespace) -> list[Any]:
    """The pairs to judge: ``--predictions`` (its first ``--limit`` records) against ``--against``."""
    from ..eval.judge import load_predictions, make_pairs

    records = load_predictions(args.predictions, "--predictions", limit=args.limit)
    others = None if args.against == "reference" else load_predictions(args.against, "--against")
    return make_pairs(records, others, against_name=f"--against {args.against}")


def run(args: argparse.Namespace) -> int:
    """Judge A against B or the references; print a one-line summary and write the ``--output`` report."""
    from ..eval.judge import ChatClient, JudgeCache, aggregate, judge_pairs

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit}: must be >= 1")
    output = Path(args.output)
    if output.is_dir():
        raise InputError(f"--output {output}: is a directory, expected a .json file")
    cache_path = None if args.no_cache else Path(args.cache) if args.cache else default_cache_path(output)
    client = ChatClient(
        args.endpoint,
        args.model,
        api_key=_api_key(args.api_key_env),
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
        retries=args.retries,
    )
    with client:
        pairs = _pairs(args)
        cache = JudgeCache(cache_path) if cache_path is not None else None
        with cache if cache is not None else contextlib.nullcontext():
            examples = judge_pairs(
                pairs, client, cache=cache, concurrency=args.concurrency, progress=sys.stderr.isatty()
            )

    summary = aggregate(examples)
    against = "reference" if args.against == "reference" else str(args.against)
    report = {
        "predictions": str(args.predictions),
        "against": against,
        "judge": {
            "endpoint": client.url,
            "model": client.model,
            "temperature": client.temperature,
            "max_tokens": client.max_tokens,
        },
        "cache": str(cache_path) if cache_path is not None else None,
        "http_requests": client.http_requests,
        **summary,
        "examples": examples,
    }
    write_json(output, report)
    print(
        f"judge {args.predictions} vs {against} ({client.model}, n={summary['n']}): "
        f"win {summary['win']} ({summary['win_rate']:.1%}) / tie {summary['tie']} ({summary['tie_rate']:.1%}) / "
        f"loss {summary['loss']} ({summary['loss_rate']:.1%}), score {summary['score']:.3f}; "
        f"unparsed {summary['unparsed']}; {summary['n_judgements']} judgements, {summary['cached']} cached, "
        f"{client.http_requests} HTTP requests -> {output}",
        flush=True,
    )
    return 0
