"""A teacher served by vLLM over HTTP: its top-k log-probabilities at every supervised position of a batch, asked
of the server's ``/v1/completions`` with ``prompt_logprobs`` (the prompt's own distributions, nothing generated
but one token), in the shape an ``adakd cache`` stores (:func:`adakd.cache.writer.teacher_rows`).

:meth:`TeacherServer.check` runs before the first step and turns every mismatch between the server and the run
(another model name, another tokenizer, a smaller vocabulary, ``--max-logprobs`` below ``top_k``) into one
:class:`adakd.errors.ConfigError` naming its ``teacher.server`` key. :meth:`TeacherServer.rows` is the call every
training step (or a cache builder) makes. The transport (timeouts, retries, backoff) is
:class:`adakd.serving.http.Endpoint`'s.

Wire format (vLLM's OpenAI-compatible server): ``prompt_logprobs[j]`` is the distribution of prompt token j given the
tokens before it (entry 0 is null), a mapping ``{"<id>": {"logprob", "rank", "decoded_token"}}`` holding the top k
(ranks 1..k) and, when it is not among them, the actual token j with its own rank.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, ServerError
from ..labels import IGNORE_INDEX
from ..sparse import SparseTeacher
from .http import Endpoint, Refusal
from .served import PROBES, served_models, tokenizer_mismatch

__all__ = ["PROBES", "TeacherServer", "parse_prompt_logprobs"]


def _short(ids: list[int], keep: int = 12) -> str:
    """An id list for a message, shortened to its first ``keep`` ids."""
    return str(ids) if len(ids) <= keep else f"[{', '.join(map(str, ids[:keep]))}, ... ({len(ids)} ids)]"


def parse_prompt_logprobs(entries: list[Any], positions: list[int], k: int, vocab_rows: int, where: str) -> tuple:
    """The top ``k`` of ``entries[t + 1]`` for each position t of ``positions`` (one prompt's ``prompt_logprobs``).

    Returns:
        ``(ids, logprobs)`` as nested lists ``[n][k]``, most probable first (ties in vLLM's rank order).

    Raises:
        ServerError: an entry missing, holding fewer than ``k`` tokens, or an id ≥ ``vocab_rows``; ``where`` names
            the server in the message.
    """
    ids, logprobs = [], []
    for t in positions:
        entry = entries[t + 1] if t + 1 < len(entries) else None
        if not entry:
            raise ServerError(f"{where}: no prompt_logprobs at prompt position {t + 1} (got {len(entries)} entries)")
        # The actual token comes along when its rank is > k: sort, keep the k most probable.
        ranked = sorted(entry.items(), key=lambda item: (-item[1]["logprob"], item[1].get("rank", 0)))[:k]
        if len(ranked) < k:
            raise ServerError(f"{where}: {len(ranked)} log-probabilities at prompt position {t + 1}, need top_k {k}")
        row = [int(token) for token, _ in ranked]
        if max(row) >= vocab_rows:
            raise ServerError(
                f"{where}: token id {max(row)} at prompt position {t + 1} is outside the student's vocabulary "
                f"({vocab_rows} rows): the served model's vocabulary is larger than the student's"
            )
        ids.append(row)
        logprobs.append([float(v["logprob"]) for _, v in ranked])
    return ids, logprobs


class TeacherServer:
    """A teacher served by vLLM, asked for the top-k of its distribution at the supervised positions of a batch.

    Args:
        endpoint: the server (:class:`adakd.serving.http.Endpoint`, ``key="teacher.server.url"``).
        model: the served model name (``vllm ... --served-model-name``; ``teacher.server.model``).
        top_k: log-probabilities kept per position (``teacher.server.top_k``); at most the server's
            ``--max-logprobs``.
        vocab_rows: the student's lm_head rows (ids at or beyond it are refused); set by :meth:`check` when None.
    """

    def __init__(self, endpoint: Endpoint, model: str, top_k: int, vocab_rows: int | None = None) -> None:
        if top_k < 1:
            raise ConfigError(f"teacher.server.top_k: must be >= 1, got {top_k}", key="teacher.server.top_k")
        self.endpoint, self.model, self.top_k, self.vocab_rows = endpoint, model, top_k, vocab_rows
        self.requests = 0  # completions requests of rows() (counted under the lock: several threads may ask)
        self._lock = threading.Lock()

    @classmethod
    def from_section(cls, section: Any, top_k: int | None = None) -> TeacherServer:
        """The server of a ``teacher.server`` config section (``url``, ``model``, ``top_k``, ``timeout``, ``retries``,
        ``backoff``, ``api_key_env``); ``top_k`` overrides the section's (``adakd cache --top-k``).

        Raises:
            InputError: ``api_key_env`` names an unset variable, or ``url`` is not an http(s) URL.
        """
        from .http import api_key_from_env

        key = api_key_from_env(section.api_key_env, "teacher.server.api_key_env")
        transport = {"timeout": section.timeout, "retries": section.retries, "backoff": section.backoff}
        endpoint = Endpoint(section.url, api_key=key, key="teacher.server.url", **transport)
        return cls(endpoint, section.model, section.top_k if top_k is None else top_k)

    @property
    def where(self) -> str:
        """The server as messages name it."""
        return f"teacher.server {self.endpoint.url} ({self.model})"

    @property
    def k(self) -> int:
        """The support size of the rows: ``top_k``, or the whole vocabulary when it is smaller (as the cache)."""
        if self.vocab_rows is None:
            raise ValueError("TeacherServer: the student's vocab_rows is unknown: call check() first")
        return min(self.top_k, self.vocab_rows)

    # ------------------------------------------------------------------------------------------------------------
    def check(self, tokenizer: Any, vocab_rows: int) -> dict[str, Any]:
        """Everything the run needs of the server, before the first step: it answers, serves ``model``, tokenizes as
        ``tokenizer`` (the student's), accepts every id of it, and returns ``top_k`` log-probabilities.

        Returns:
            ``{"max_model_len": int | None, "version": str | None}``.

        Raises:
            ConfigError: one line naming the key (``teacher.server.model``, ``teacher.server.top_k``,
                ``teacher.server.api_key_env``).
            ServerError: the server does not answer (the message names ``teacher.server.url``).
        """
        self.vocab_rows = vocab_rows
        try:
            served = served_models(self.endpoint)
        except Refusal as e:
            if e.status not in (401, 403):
                raise
            raise ConfigError(
                f"teacher.server.api_key_env: {self.endpoint.url} refuses the request (HTTP {e.status}: {e.detail}): "
                "set teacher.server.api_key_env to the environment variable holding its API key",
                key="teacher.server.api_key_env",
            ) from None
        names = [m.get("id") for m in served]
        if self.model not in names:
            raise ConfigError(
                f"teacher.server.model: {self.endpoint.url} serves {', '.join(map(str, names)) or 'no model'}, "
                f"not {self.model!r}",
                key="teacher.server.model",
            )
        self._check_tokenizer(tokenizer)
        self._completion([[len(tokenizer) - 1]], "the last token id of the student's tokenizer")
        self._completion([[0]], "teacher.server.top_k", logprobs=self.k)
        info = next(m for m in served if m.get("id") == self.model)
        version = None
        try:
            version = self.endpoint.get("/version").get("version")
        except (Refusal, ServerError, AttributeError):
            pass  # an older or another server: the version is only shown
        return {"max_model_len": info.get("max_model_len"), "version": version}

    def _check_tokenizer(self, tokenizer: Any) -> None:
        """The server's ``/tokenize`` of every probe equals the student tokenizer's ids."""
        try:
            found = tokenizer_mismatch(
                self.endpoint, self.model, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
            )
        except Refusal as e:
            raise ConfigError(
                f"teacher.server.model: /tokenize refused: {e.detail}", key="teacher.server.model"
            ) from None
        if found is not None:
            probe, theirs, ours = found
            raise ConfigError(
                f"teacher.server.model: {self.model!r} tokenizes {probe!r} as {_short(theirs)}, the student's "
                f"tokenizer as {_short(ours)}: the served model must use the student's tokenizer",
                key="teacher.server.model",
            )

    def _completion(self, prompts: list[list[int]], what: str, logprobs: int = 1) -> Any:
        """One ``/v1/completions`` request with ``prompt_logprobs``; a refusal as one ConfigError line (``what``: the
        check it serves)."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "prompt_logprobs": logprobs, "temperature": 0}
        try:
            return self.endpoint.post("/v1/completions", body)
        except Refusal as e:
            if e.param == "prompt_logprobs" or "logprobs" in e.detail:
                raise ConfigError(
                    f"teacher.server.top_k: the server refuses {logprobs} log-probabilities ({e.detail}): start vLLM "
                    f"with --max-logprobs {logprobs} or lower teacher.server.top_k",
                    key="teacher.server.top_k",
                ) from None
            if "vocabulary" in e.detail:
                raise ConfigError(
                    f"teacher.server.model: {self.model!r} refuses {what} ({e.detail}): its vocabulary is smaller "
                    "than the student's tokenizer",
                    key="teacher.server.model",
                ) from None
            message = f"teacher.server.model: {self.model!r} refuses {what} ({e.detail})"
            raise ConfigError(message, key="teacher.server.model") from None

    # ------------------------------------------------------------------------------------------------------------
    def rows(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor) -> SparseTeacher:
        """The teacher's top-k at every supervised position of a right-padded batch, flat in row-major (example,
        position) order: position t of example b when ``labels[b, t + 1] != -100`` (the contract of
        :func:`adakd.cache.writer.teacher_rows`).

        One request for the whole batch (vLLM batches the prompts itself; one round trip per step). Each example
        sends its tokens up to its last supervised label: nothing after it changes the rows asked for.

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``, 1 on the tokens (right padding), or None (every token).
            labels: ``[B, T]`` unshifted labels, -100 where unsupervised.

        Returns:
            A :class:`SparseTeacher` on the CPU: ``ids`` int64 ``[N, k]``, ``logprobs`` float32 ``[N, k]``, ``tail``
            float32 ``[N]`` = log(1 − Σ exp(logprobs)) (computed in float64; -inf when the support holds it all,
            or is the student's whole vocabulary).

        Raises:
            ServerError: the server stayed down, or its answer lacks rows (fewer than k, ids beyond the vocabulary).
            InputError: the server refused the request (:class:`adakd.serving.http.Refusal`, e.g. a prompt longer
                than its max_model_len).
        """
        k = self.k
        supervised = labels[:, 1:].cpu() != IGNORE_INDEX  # [B, T − 1]: position t predicts token t + 1
        ids_cpu = input_ids.cpu()
        mask = None if attention_mask is None else attention_mask.cpu()
        prompts, positions = [], []
        for b in range(ids_cpu.shape[0]):
            where = supervised[b].nonzero().squeeze(1).tolist()
            if not where:
                continue
            end = where[-1] + 2  # through the last supervised label
            if mask is not None and not bool(mask[b, :end].all()):
                raise ValueError(f"TeacherServer.rows: example {b} is not right-padded (mask 0 before its last label)")
            prompts.append(ids_cpu[b, :end].tolist())
            positions.append(where)
        if not prompts:
            empty = torch.empty(0, k)
            return SparseTeacher(empty.long(), empty, torch.empty(0))
        reply = self._ask(prompts)
        choices = sorted(reply.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise ServerError(f"{self.where}: {len(choices)} choices for {len(prompts)} prompts")
        all_ids, all_lp = [], []
        for choice, where in zip(choices, positions, strict=True):
            entries = choice.get("prompt_logprobs") or []
            row_ids, row_lp = parse_prompt_logprobs(entries, where, k, self.vocab_rows, self.where)
            all_ids += row_ids
            all_lp += row_lp
        logprobs = torch.tensor(all_lp, dtype=torch.float64)
        mass = logprobs.exp().sum(-1)
        tail = torch.log1p(-mass.clamp_max(1.0))  # -inf where the k tokens hold all the mass
        if k == self.vocab_rows:  # the whole vocabulary: what is left is float32 rounding, no tail (as the cache)
            tail = torch.full_like(tail, -torch.inf)
        return SparseTeacher(torch.tensor(all_ids, dtype=torch.int64), logprobs.float(), tail.float())

    def _ask(self, prompts: list[list[int]]) -> Any:
        """The completions request of :meth:`rows`; a refusal names the server (an InputError: retrying cannot help)."""
        # greedy: the one token generated is never used
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "prompt_logprobs": self.k, "temperature": 0}
        with self._lock:
            self.requests += 1
        try:
            return self.endpoint.post("/v1/completions", body)
        except Refusal as e:
            raise Refusal(f"{self.where}: the batch's request", e.status, e.detail, e.param) from None
