"""What a vLLM server serves, asked the same way by every client (the served teacher, the completions backend): the
model list of ``/v1/models``, and whether its tokenizer is the caller's (``/tokenize`` of fixed probe strings).
Standard library only (no torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ServerError
from .http import Endpoint

__all__ = ["PROBES", "served_models", "tokenizer_mismatch"]

# Strings whose token ids must be the same on the server and in the run's tokenizer: plain ASCII, accents, digits,
# code, runs of whitespace, CJK and an emoji (bytes a byte-level BPE splits), so that another vocabulary, another
# normalisation or another pre-tokenizer shows in at least one.
PROBES = (
    "Hello world, this is a test.",
    "Café naïve façade — déjà vu",
    "3.14159 + 2718 = 12345678",
    "def f(x):\n    return x ** 2  # square",
    "  two  spaces\tand\ttabs\n\n",
    "日本語のテキスト 🙂👍",
)


def served_models(endpoint: Endpoint) -> list[dict[str, Any]]:
    """The entries of ``GET /v1/models`` (each with its ``id``, and on vLLM ``max_model_len`` and ``root``).

    Raises:
        adakd.errors.ServerError: the server does not answer, or answers something that is not a model list.
        adakd.serving.http.Refusal: the server refuses the request (e.g. HTTP 401 without its API key).
    """
    reply = endpoint.get("/v1/models")
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
        raise ServerError(
            f"{endpoint.key} {endpoint.url}: /v1/models did not answer a model list (not an OpenAI server?)"
        )
    return data


def tokenizer_mismatch(
    endpoint: Endpoint, model: str, encode: Callable[[str], list[int]]
) -> tuple[str, list[int], list[int]] | None:
    """The first of :data:`PROBES` that the server's ``/tokenize`` (for ``model``) and ``encode`` (the caller's
    tokenizer, without special tokens) split differently, as ``(probe, server's ids, caller's ids)``; None when every
    probe agrees.

    Raises:
        adakd.serving.http.Refusal: the server has no ``/tokenize`` or refuses it (the caller decides what that means).
    """
    for probe in PROBES:
        body = {"model": model, "prompt": probe, "add_special_tokens": False}
        theirs = list(endpoint.post("/tokenize", body).get("tokens") or [])
        ours = list(encode(probe))
        if theirs != ours:
            return probe, theirs, ours
    return None
