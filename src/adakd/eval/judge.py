"""LLM-as-judge evaluation: pairwise comparison of two answers by a chat model (the AdaKD paper's protocol).

Following MiniLLM / DistiLLM, a strong chat model compares a student's answers with either the dataset's reference
answers or another model's answers, with the reference answer shown to the judge. Each pair is judged in both orders
(A as answer 1, then A as answer 2) so that the judge's position bias cancels: A wins only when both orders prefer A,
loses only when both prefer B, and everything else is a tie.

The judge is any OpenAI-compatible chat-completions server (OpenAI, vLLM, SGLang, llama.cpp, TGI, ...), reached with
the standard library only::

    client = ChatClient("http://localhost:8000/v1", "Qwen2.5-72B-Instruct")
    with JudgeCache("judge.cache.jsonl") as cache:
        examples = judge_pairs(pairs, client, cache=cache, concurrency=8)
    summary = aggregate(examples)

Replies are cached by a hash of (URL, model, temperature, max_tokens, messages), one JSON line each, so that an
interrupted or repeated run never pays twice for the same judgement.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TEMPERATURE",
    "SYSTEM_PROMPT",
    "USER_TEMPLATE",
    "ChatClient",
    "JudgeCache",
    "JudgeRequestError",
    "Pair",
    "aggregate",
    "build_messages",
    "chat_completions_url",
    "judge_pairs",
    "load_predictions",
    "make_pairs",
    "parse_verdict",
]

DEFAULT_TEMPERATURE = 0.2
# Room for a short explanation before the verdict line; a truncated reply loses its verdict (and counts as unparsed).
DEFAULT_MAX_TOKENS = 1024

SYSTEM_PROMPT = (
    "You are an impartial judge of answers to user instructions. You are shown a question, a reference answer "
    "written by an expert, and two candidate answers, Answer 1 and Answer 2. Decide which candidate answers the "
    "question better. Judge correctness first, using the reference answer as a guide: a candidate that is correct "
    "but worded differently from the reference is fine, while one that contradicts it on facts or on the final "
    "result is wrong. Then consider helpfulness, relevance, completeness and clarity. Do not let the order in which "
    "the answers are presented, their length, or their style influence you, and do not favour either position. "
    "Briefly explain your reasoning, then end your reply with one final line holding only your verdict: [[1]] if "
    "Answer 1 is better, [[2]] if Answer 2 is better, or [[tie]] if they are equally good or equally bad."
)

USER_TEMPLATE = """[Question]
{question}

[The Start of the Reference Answer]
{reference}
[The End of the Reference Answer]

[The Start of Answer 1]
{answer_1}
[The End of Answer 1]

[The Start of Answer 2]
{answer_2}
[The End of Answer 2]

Which answer is better? Explain briefly, then end with [[1]], [[2]] or [[tie]] on a line of its own."""

# Tolerates the usual drift of judge models: "[[ 1 ]]", "[[Tie]]", "[[Answer 2]]".
_VERDICT = re.compile(r"\[\[\s*(?:answer\s*)?(1|2|tie)\s*\]\]", re.IGNORECASE)

_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


class JudgeRequestError(OSError):
    """The judge server refused a request (a 4xx other than 429) or stayed unreachable after all retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0])


def parse_verdict(text: str | None) -> str | None:
    """The judge's verdict: ``"1"``, ``"2"`` or ``"tie"`` from the last ``[[...]]`` token, or None if there is none.

    The last token wins because judges often quote the instructions ("end with [[1]], [[2]] or [[tie]]") before
    giving their own verdict.
    """
    if not text:
        return None
    matches = _VERDICT.findall(text)
    return matches[-1].lower() if matches else None


def build_messages(question: str, reference: str, answer_1: str, answer_2: str) -> list[dict[str, str]]:
    """The chat messages asking the judge to compare ``answer_1`` and ``answer_2`` for ``question``."""
    user = USER_TEMPLATE.format(question=question, reference=reference, answer_1=answer_1, answer_2=answer_2)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def chat_completions_url(endpoint: str) -> str:
    """``{endpoint}/chat/completions`` for a base URL such as ``http://host:8000/v1``.

    A URL that already ends in ``/chat/completions`` is taken as is.
    """
    url = endpoint.strip().rstrip("/")
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"--endpoint {endpoint!r}: expected an http(s) base URL such as http://localhost:8000/v1")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_detail(body: bytes) -> str:
    """The server's own explanation of an HTTP error, from OpenAI's ``{"error": {"message": ...}}`` when present."""
    text = body.decode("utf-8", "replace")
    try:
        payload = json.loads(text)
    except ValueError:
        return _one_line(text)
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail", payload.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return _one_line(error if isinstance(error, str) else json.dumps(error))
    return _one_line(text)


def _message_content(payload: Any) -> str:
    """``choices[0].message.content``; a list of content parts is joined and a null content is an empty reply."""
    content = payload["choices"][0]["message"]["content"]
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    if not isinstance(content, str):
        raise TypeError(f"content is a {type(content).__name__}")
    return content


class ChatClient:
    """A minimal, thread-safe client for an OpenAI-compatible ``/chat/completions`` endpoint.

    Each HTTP attempt has its own socket ``timeout`` (seconds, per connect or read). Connection errors, timeouts,
    HTTP 429 and 5xx are retried up to ``retries`` times with exponential backoff (``backoff`` seconds, doubled each
    time, capped at ``max_backoff``; a 429's ``Retry-After`` is honoured up to the same cap). Other 4xx answers are
    the caller's mistake (wrong model name, missing key) and fail at once.
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
    ) -> None:
        if not model:
            raise ValueError("--model: the judge model name must not be empty")
        if timeout <= 0:
            raise ValueError(f"--timeout {timeout}: must be > 0 seconds")
        if retries < 0:
            raise ValueError(f"--retries {retries}: must be >= 0")
        if temperature < 0:
            raise ValueError(f"--temperature {temperature}: must be >= 0")
        if max_tokens < 1:
            raise ValueError(f"--max-tokens {max_tokens}: must be >= 1")
        self.url = chat_completions_url(endpoint)
        self.model = model
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._api_key = api_key or None
        self._lock = threading.Lock()
        self.http_requests = 0  # every attempt, retries included

    def __repr__(self) -> str:
        # Never shows the key: the client ends up in logs and tracebacks.
        key = "set" if self._api_key else "none"
        return f"ChatClient(url={self.url!r}, model={self.model!r}, temperature={self.temperature}, api_key={key})"

    def cache_key(self, messages: Sequence[dict[str, str]]) -> str:
        """A stable hash of everything that determines the reply: URL, model, temperature, max_tokens, messages."""
        blob = json.dumps(
            {
                "endpoint": self.url,
                "model": self.model,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
                "messages": list(messages),
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _delay(self, attempt: int, retry_after: str | None = None) -> float:
        delay = min(self.backoff * (2**attempt), self.max_backoff)
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.max_backoff))
            except ValueError:
                pass  # an HTTP-date Retry-After: the exponential delay will do
        return delay

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.http_requests += 1
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()

    def complete(self, messages: Sequence[dict[str, str]], stop: threading.Event | None = None) -> str:
        """The judge's reply (``choices[0].message.content``) to ``messages``.

        ``stop`` (optional) aborts the retry loop early, e.g. when another request of the same run failed fatally.
        """
        body = json.dumps(
            {
                "model": self.model,
                "messages": list(messages),
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode("utf-8")
        last_error = "no attempt made"
        for attempt in range(self.retries + 1):
            if stop is not None and stop.is_set():
                raise JudgeRequestError(f"{self.url}: request abandoned, the run was stopped")
            retry_after = None
            try:
                raw = self._post(body)
            except urllib.error.HTTPError as e:
                detail = _error_detail(e.read() or b"")
                if e.code in _RETRYABLE_STATUS or e.code >= 500:
                    last_error = f"HTTP {e.code}: {detail}"
                    retry_after = e.headers.get("Retry-After") if e.headers else None
                else:
                    hint = " (check --api-key-env)" if e.code in (401, 403) else ""
                    hint = hint or (" (check --model and --endpoint)" if e.code in (400, 404, 422) else "")
                    raise JudgeRequestError(f"{self.url}: HTTP {e.code}: {detail}{hint}", status=e.code) from e
            except urllib.error.URLError as e:
                last_error = f"connection failed: {e.reason}"
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                try:
                    return _message_content(json.loads(raw))
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    # A 200 that is not a chat completion: the endpoint is some other server, retrying will not help.
                    raise JudgeRequestError(
                        f"{self.url}: not an OpenAI chat-completions reply ({e.__class__.__name__}: {e}); "
                        "--endpoint should be the API base URL, e.g. http://host:8000/v1"
                    ) from e
            if attempt < self.retries:
                delay = self._delay(attempt, retry_after)
                if stop is not None:
                    if stop.wait(delay):
                        raise JudgeRequestError(f"{self.url}: request abandoned, the run was stopped")
                else:
                    time.sleep(delay)
        raise JudgeRequestError(f"{self.url}: giving up after {self.retries + 1} attempts, last error: {last_error}")


class JudgeCache:
    """Judge replies on disk, one ``{"key": ..., "reply": ...}`` JSON line per reply, appended as they arrive.

    Appending a line per reply (under a lock, flushed at once) means an interrupted run keeps everything it paid for;
    a line cut short by a crash is skipped when the file is read back.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        self._needs_newline = False
        if self.path.exists():
            if self.path.is_dir():
                raise ValueError(f"--cache {self.path}: is a directory, expected a .jsonl file")
            data = self.path.read_text(encoding="utf-8", errors="replace")
            for line in data.splitlines():
                try:
                    record = json.loads(line)
                    key, reply = record["key"], record["reply"]
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(key, str) and isinstance(reply, str):
                    self._entries[key] = reply
            self._needs_newline = bool(data) and not data.endswith("\n")
        self._file = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> str | None:
        """The cached reply for ``key``, or None."""
        return self._entries.get(key)

    def put(self, key: str, reply: str) -> None:
        """Store ``reply`` under ``key``, in memory and at once on disk."""
        line = json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
                if self._needs_newline:
                    # The previous run died mid-line: start ours on a fresh one instead of gluing onto the fragment.
                    self._file.write("\n")
                    self._needs_newline = False
            self._file.write(line)
            self._file.flush()
            self._entries[key] = reply

    def close(self) -> None:
        """Close the file (the entries stay readable in memory)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Pair:
    """One comparison: ``answer_a`` (the model under test) against ``answer_b`` for ``prompt``."""

    prompt: str
    answer_a: str
    answer_b: str
    reference: str
    id: Any = None


def load_predictions(path: str | os.PathLike[str], flag: str = "--predictions") -> list[dict[str, Any]]:
    """The records of an ``adakd eval`` predictions file (JSONL with ``prompt``, ``prediction``, ``references``);
    ``flag`` names the command-line option in error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{flag} {path} line {lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{flag} {path} line {lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    if not records:
        raise ValueError(f"{flag} {path}: no records")
    out = []
    for lineno, record in records:
        for field in ("prompt", "prediction"):
            if not isinstance(record.get(field), str):
                raise ValueError(f"{flag} {path} line {lineno}: '{field}' must be a string")
        refs = record.get("references")
        if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
            raise ValueError(f"{flag} {path} line {lineno}: 'references' must be a non-empty list of strings")
        out.append(record)
    return out


def make_pairs(
    records_a: Sequence[dict[str, Any]], against: Sequence[dict[str, Any]] | None, *, against_name: str = "--against"
) -> list[Pair]:
    """Pairs of A's predictions with the reference answers (``against=None``) or with B's predictions.

    B's records are matched to A's by ``prompt``, in A's order; a prompt repeated in A takes B's occurrences in turn.
    The reference shown to the judge is always A's first reference.
    """
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    if against is not None:
        for record in against:
            by_prompt.setdefault(record["prompt"], []).append(record)
    pairs = []
    for i, record in enumerate(records_a):
        if against is None:
            other = record["references"][0]
        else:
            matches = by_prompt.get(record["prompt"])
            if not matches:
                raise ValueError(f"{against_name}: no prediction for the prompt {_one_line(record['prompt'], 80)!r}")
            other = matches.pop(0)["prediction"]
        rid = record.get("id", record.get("index", i))
        pairs.append(Pair(record["prompt"], record["prediction"], other, record["references"][0], rid))
    return pairs


def _preferred(verdict: str | None, a_position: int) -> str:
    """Which model a verdict prefers, "A", "B" or "tie", when A was shown as answer ``a_position``."""
    if verdict in ("1", "2"):
        return "A" if int(verdict) == a_position else "B"
    return "tie"


def _outcome(first: str, second: str) -> str:
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
    concurrency: int = 8,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Judge every pair in both orders and return one record per pair, in order.

    Each record holds the pair's ``index``, ``id`` and ``prompt``, its ``outcome`` for A (``"win"``, ``"tie"`` or
    ``"loss"``) and its two ``judgements`` (``order`` ``"AB"`` = A shown as answer 1, then ``"BA"``), each with the
    parsed ``verdict`` (``"1"``, ``"2"``, ``"tie"`` or None when unparsed), the model it ``preferred``, the judge's
    ``reply`` and whether the reply came from the ``cache``. Identical requests are sent once; cached ones not at all.
    """
    if concurrency < 1:
        raise ValueError(f"--concurrency {concurrency}: must be >= 1")
    pairs = list(pairs)
    # (pair index, order) -> key, and key -> messages, so that duplicates cost one request.
    keys: list[tuple[str, str]] = []
    todo: dict[str, list[dict[str, str]]] = {}
    replies: dict[str, str] = {}
    from_cache: set[str] = set()
    for pair in pairs:
        both = []
        for answer_1, answer_2 in ((pair.answer_a, pair.answer_b), (pair.answer_b, pair.answer_a)):
            messages = build_messages(pair.prompt, pair.reference, answer_1, answer_2)
            key = client.cache_key(messages)
            both.append(key)
            cached = cache.get(key) if cache is not None else None
            if cached is not None:
                replies[key] = cached
                from_cache.add(key)
            elif key not in todo:
                todo[key] = messages
        keys.append((both[0], both[1]))

    if todo:
        _fetch(todo, replies, client, cache, concurrency, progress)

    seen: set[str] = set()
    results = []
    for index, (pair, (key_ab, key_ba)) in enumerate(zip(pairs, keys, strict=True)):
        judgements = []
        for order, key, a_position in (("AB", key_ab, 1), ("BA", key_ba, 2)):
            verdict = parse_verdict(replies[key])
            # A repeated request was sent once: its later uses count as cached, like a rerun's.
            was_cached = key in from_cache or key in seen
            seen.add(key)
            judgements.append(
                {
                    "order": order,
                    "verdict": verdict,
                    "preferred": _preferred(verdict, a_position),
                    "reply": replies[key],
                    "cached": was_cached,
                }
            )
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
    todo: dict[str, list[dict[str, str]]],
    replies: dict[str, str],
    client: ChatClient,
    cache: JudgeCache | None,
    concurrency: int,
    progress: bool,
) -> None:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the [train] extra; the judge works without it
        tqdm = None
    bar = tqdm(total=len(todo), desc="judge", unit="req", disable=not progress) if tqdm is not None else None
    stop = threading.Event()
    lock = threading.Lock()

    def fetch(key: str, messages: list[dict[str, str]]) -> None:
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
        # On the first fatal error (or Ctrl-C) the queued requests are dropped and running ones stop retrying;
        # replies already received are in the cache.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()


def aggregate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Win/tie/loss counts and rates of A over ``examples`` (from :func:`judge_pairs`).

    ``unparsed`` counts judge replies without a verdict (each counted as a tie for its order), and
    ``unparsed_examples`` the examples with at least one; ``score`` is (wins + ties / 2) / n.
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
