"""A judging run: every pair judged in both orders, requests deduplicated, cached ones skipped, the rest sent
``concurrency`` at a time; then win/tie/loss per pair and over the run."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from ...errors import InputError
from .cache import JudgeCache
from .client import ChatClient
from .defaults import DEFAULT_CONCURRENCY
from .pairs import Pair
from .prompts import build_messages, parse_verdict

__all__ = ["aggregate", "judge_pairs"]

Messages = list[dict[str, str]]


def _preferred(verdict: str | None, a_position: int) -> str:
    """Which model a verdict prefers, "A", "B" or "tie", when A was shown as answer ``a_position``."""
    if verdict in ("1", "2"):
        return "A" if int(verdict) == a_position else "B"
    return "tie"


def _outcome(first: str, second: str) -> str:
    """A's outcome from the preferences of the two orders: only agreement wins or loses."""
    if first == second == "A":
        return "win"
    if first == second == "B":
        return "loss"
    return "tie"


def judge_pairs(
    pairs: Iterable[Pair],
    client: ChatClient,
    *,
    cache: JudgeCache | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Judge every pair in both orders and return one record per pair, in order.

    Each record holds the pair's ``index``, ``id`` and ``prompt``, its ``outcome`` for A (``"win"``, ``"tie"`` or
    ``"loss"``) and its two ``judgements`` (``order`` ``"AB"`` = A shown as answer 1, then ``"BA"``), each with the
    parsed ``verdict`` (``"1"``, ``"2"``, ``"tie"`` or None when unparsed), the model it ``preferred``, the judge's
    ``reply`` and whether the reply came from the ``cache``. Identical requests are sent once; cached ones not at all.
    The first request that fails for good stops the run with its :class:`JudgeRequestError`; the replies received
    until then are in ``cache``.
    """
    if concurrency < 1:
        raise InputError(f"--concurrency {concurrency}: must be >= 1")
    pairs = list(pairs)
    # (key of order AB, key of order BA) per pair, and key -> messages, so that duplicates cost one request.
    keys: list[tuple[str, str]] = []
    todo: dict[str, Messages] = {}
    replies: dict[str, str] = {}
    for pair in pairs:
        both = []
        for answer_1, answer_2 in ((pair.answer_a, pair.answer_b), (pair.answer_b, pair.answer_a)):
            messages = build_messages(pair.prompt, pair.reference, answer_1, answer_2)
            key = client.cache_key(messages)
            both.append(key)
            cached = cache.get(key) if cache is not None else None
            if cached is not None:
                replies[key] = cached
            elif key not in todo:
                todo[key] = messages
        keys.append((both[0], both[1]))
    from_cache = set(replies)
    if todo:
        _fetch(todo, replies, client, cache, concurrency, progress)
    return _results(pairs, keys, replies, from_cache)


def _results(
    pairs: Sequence[Pair], keys: Sequence[tuple[str, str]], replies: dict[str, str], from_cache: set[str]
) -> list[dict[str, Any]]:
    """The records :func:`judge_pairs` returns, once every reply is in ``replies``."""
    seen: set[str] = set()
    results = []
    for index, (pair, (key_ab, key_ba)) in enumerate(zip(pairs, keys, strict=True)):
        judgements = []
        for order, key, a_position in (("AB", key_ab, 1), ("BA", key_ba, 2)):
            verdict = parse_verdict(replies[key])
            judgements.append(
                {
                    "order": order,
                    "verdict": verdict,
                    "preferred": _preferred(verdict, a_position),
                    "reply": replies[key],
                    # A repeated request was sent once: its later uses count as cached, like a rerun's.
                    "cached": key in from_cache or key in seen,
                }
            )
            seen.add(key)
        results.append(
            {
                "index": index,
                "id": pair.id,
                "prompt": pair.prompt,
                "outcome": _outcome(judgements[0]["preferred"], judgements[1]["preferred"]),
                "judgements": judgements,
            }
        )
    return results


def _fetch(
    todo: dict[str, Messages],
    replies: dict[str, str],
    client: ChatClient,
    cache: JudgeCache | None,
    concurrency: int,
    progress: bool,
) -> None:
    """Send the requests of ``todo`` on a thread pool, storing each reply in ``replies`` and ``cache`` as it arrives."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with adakd's extras, but the bar is a nicety: judge without it
        tqdm = None
    bar = tqdm(total=len(todo), desc="judge", unit="req", disable=not progress) if tqdm is not None else None
    stop = threading.Event()
    lock = threading.Lock()

    def fetch(key: str, messages: Messages) -> None:
        reply = client.complete(messages, stop=stop)
        if cache is not None:
            cache.put(key, reply)
        with lock:
            replies[key] = reply
            if bar is not None:
                bar.update(1)

    pool = ThreadPoolExecutor(max_workers=min(concurrency, len(todo)), thread_name_prefix="judge")
    try:
        futures = [pool.submit(fetch, key, messages) for key, messages in todo.items()]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future in done and future.exception() is not None:
                raise future.exception()
    finally:
        # On the first fatal error (or Ctrl-C) the queued requests are dropped and running ones make no further
        # attempt; replies already received are in the cache.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()


def aggregate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Win/tie/loss counts and rates of A over ``examples`` (from :func:`judge_pairs`).

    ``unparsed`` counts judge replies without a verdict (each counted as a tie for its order), and
    ``unparsed_examples`` the examples with at least one; ``score`` is (wins + ties / 2) / n;
    ``order_agreement`` is the share of examples whose two orders prefer the same answer; ``cached`` counts the
    judgements that cost no request.
    """
    n = len(examples)
    counts = {outcome: sum(e["outcome"] == outcome for e in examples) for outcome in ("win", "tie", "loss")}
    unparsed = [sum(j["verdict"] is None for j in e["judgements"]) for e in examples]
    judgements = [j for e in examples for j in e["judgements"]]
    summary: dict[str, Any] = {"n": n, **counts}
    for outcome, count in counts.items():
        summary[f"{outcome}_rate"] = count / n if n else 0.0
    summary["score"] = (counts["win"] + 0.5 * counts["tie"]) / n if n else 0.0
    summary["unparsed"] = sum(unparsed)
    summary["unparsed_examples"] = sum(u > 0 for u in unparsed)
    # Both orders agreeing is how often the judge's preference survives swapping positions.
    summary["order_agreement"] = (
        sum(e["judgements"][0]["preferred"] == e["judgements"][1]["preferred"] for e in examples) / n if n else 0.0
    )
    summary["n_judgements"] = len(judgements)
    summary["cached"] = sum(j["cached"] for j in judgements)
    return summary
