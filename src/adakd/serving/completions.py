"""A client for an OpenAI-compatible ``/v1/completions`` server (vLLM's ``api_server``) that samples from token-id
prompts and returns token ids, for ``adakd eval --backend vllm-server``.

Prompts travel as token ids and answers come back as token ids (``return_token_ids``), so the caller encodes and
decodes with its own tokenizer and the texts are those the Hugging Face backend would decode. The server's own end of
sequence is switched off (``ignore_eos``) and the caller's stop ids are sent instead, so an answer ends at exactly the
tokens it ends at with ``generate`` (a model's ``generation_config`` may list more).

Per-prompt seeds need one request per prompt (a request's ``seed`` applies to all of its prompts): sampled prompts are
sent one per request, ``parallel`` at a time, which the server batches; greedy prompts need no seed and go as one
request with a list of prompts. Standard library only (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import InputError, ServerError
from .http import Endpoint, Refusal
from .served import served_models, tokenizer_mismatch

__all__ = ["Completion", "CompletionsClient", "Sampling"]


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. ``greedy`` overrides the rest; ``top_k`` 0 is off (vLLM's -1)."""

    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def body(self) -> dict[str, Any]:
        """The request fields (vLLM's greedy is temperature 0)."""
        if self.greedy:
            return {"temperature": 0.0, "top_p": 1.0, "top_k": -1}
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": -1 if self.top_k == 0 else self.top_k}


@dataclass
class Completion:
    """One prompt's answer: its token ids (with the stop token that ended it, if one did) and why it ended."""

    token_ids: list[int]
    finish_reason: str | None


class CompletionsClient:
    """The served model of a completions server, checked once: its name, its context length, its tokenizer.

    Args:
        endpoint: the server (its ``key`` names the URL flag in messages, e.g. ``--server-url``).
        model: the served model's name; None takes the only one the server serves.
        model_flag: the flag or key that names the model in messages.

    Raises:
        InputError: ``model`` is not served (the message lists the served names), or None and the server serves
            several.
        adakd.errors.ServerError: the server does not answer ``/v1/models``.
    """

    def __init__(self, endpoint: Endpoint, model: str | None = None, model_flag: str = "--server-model") -> None:
        self.endpoint, self.model_flag = endpoint, model_flag
        served = served_models(endpoint)
        names = [m["id"] for m in served]
        if model is None and len(names) != 1:
            raise InputError(f"{model_flag}: {self.where} serves {len(names)} models ({', '.join(names)}); name one")
        model = names[0] if model is None else model
        if model not in names:
            raise InputError(f"{model_flag}: {self.where} does not serve {model!r}; served: {', '.join(names)}")
        self.model = model
        info = served[names.index(model)]
        self.max_model_len: int | None = info.get("max_model_len")
        self.root: str | None = info.get("root")  # the folder or hub id the server loaded

    @property
    def where(self) -> str:
        """``--server-url http://...``, for messages."""
        return f"{self.endpoint.key} {self.endpoint.url}"

    def check_tokenizer(self, encode: Callable[[str], list[int]], tokenizer_flag: str) -> None:
        """Compare the server's encoding of :data:`adakd.serving.served.PROBES` (vLLM's ``/tokenize``) with
        ``encode``'s; a server without ``/tokenize`` is not checked.

        Raises:
            InputError: the ids differ (the message names ``tokenizer_flag`` and the served model).
        """
        try:
            found = tokenizer_mismatch(self.endpoint, self.model, encode)
        except Refusal:
            return  # not a vLLM server: nothing to compare with
        if found is not None:
            raise InputError(
                f"{tokenizer_flag}: its ids differ from those of the served model {self.model!r} at {self.where} "
                f"(on {found[0]!r}); give the served model's tokenizer"
            )

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: Sequence[int],
        sampling: Sampling,
        *,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[Completion]:
        """One request for ``prompts`` (token ids), one answer each in order, each cut to its own ``max_tokens``
        (the request asks for the largest: an answer that would have stopped earlier is cut where it would have).
        ``seed`` applies to every prompt of the request.

        Raises:
            InputError: the server refuses the request (its message, naming the URL flag).
            adakd.errors.ServerError: the server does not answer.
        """
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": [list(p) for p in prompts],
            "max_tokens": max(max_tokens),
            **sampling.body(),
            "ignore_eos": True,  # the caller's stop ids end an answer, not the model's generation_config
            "stop_token_ids": list(stop_token_ids),
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        if seed is not None and not sampling.greedy:
            body["seed"] = seed
        try:
            reply = self.endpoint.post("/v1/completions", body)
        except Refusal as e:
            raise InputError(f"{self.where}: the server refused the completion request: {e.detail}") from None
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts) or any(c.get("token_ids") is None for c in choices):
            raise ServerError(f"{self.where}: /v1/completions answered without token ids (a vLLM server needed)")
        out = []
        for choice, limit in zip(choices, max_tokens, strict=True):
            ids = list(choice["token_ids"])
            cut = len(ids) > limit
            out.append(Completion(ids[:limit], "length" if cut else choice.get("finish_reason")))
        return out

    def complete_each(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: Sequence[int],
        sampling: Sampling,
        seeds: Sequence[int],
        *,
        stop_token_ids: Sequence[int] = (),
        parallel: int = 8,
    ) -> list[Completion]:
        """One request per prompt, with its own seed and length, ``parallel`` in flight at a time (the server
        batches them); the answers in the prompts' order."""

        def one(i: int) -> Completion:
            one_prompt, room = [prompts[i]], [max_tokens[i]]
            return self.complete(one_prompt, room, sampling, seed=seeds[i], stop_token_ids=stop_token_ids)[0]

        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            return list(pool.map(one, range(len(prompts))))
