"""The HTTP transport of every server adakd talks to (a vLLM teacher, a vLLM generator): JSON in, JSON out, with a
timeout, an optional bearer token, and retries with exponential backoff on what a restart or an overload looks like
(no connection, a timeout, HTTP 429 and 5xx).

A refusal (any other 4xx: a wrong model name, too many log-probabilities) is not retried: it is raised at once as
:class:`Refusal`, with the server's own message, for the caller to turn into one line naming its key. A server that
stays down through every retry raises :class:`adakd.errors.ServerError`.

Standard library only (``urllib``): no client package to install, and no torch.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, ServerError

__all__ = ["RETRIED_STATUS", "Endpoint", "Refusal", "api_key_from_env"]

# Statuses a server answers while it restarts, sheds load or fails for a moment: worth another try.
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class Refusal(InputError):
    """The server understood the request and refused it (HTTP 4xx other than 408 and 429).

    Attributes:
        status: the HTTP status.
        detail: the server's own message (an OpenAI-style ``{"error": {"message": ...}}`` body), else the body.
        param: the parameter the server names as the cause (``prompt_logprobs``, ``model``), or None.
    """

    def __init__(self, url: str, status: int, detail: str, param: str | None = None) -> None:
        super().__init__(f"{url}: HTTP {status}: {detail}")
        self.url, self.status, self.detail, self.param = url, status, detail, param


def api_key_from_env(variable: str | None, key: str) -> str | None:
    """The API key held by the environment variable ``variable`` (None: no key).

    Raises:
        InputError: the variable is named but unset or empty; the message names the config ``key`` and the variable.
    """
    if variable is None:
        return None
    value = os.environ.get(variable, "")
    if not value:
        raise InputError(f"{key}: the environment variable {variable} is not set (it should hold the API key)")
    return value


def _reason(error: BaseException) -> str:
    """A short reason for a failed try, for the final message."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _detail(body: bytes) -> tuple[str, str | None]:
    """The message and parameter of an error body (OpenAI's ``{"error": {...}}``, vLLM's, FastAPI's), else the text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return (text.splitlines()[0] if text else "no message"), None
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or json.dumps(error)
        return str(message).splitlines()[0], error.get("param")
    return str(error).splitlines()[0], None


@dataclass
class Endpoint:
    """A server's base URL and how to talk to it.

    Attributes:
        url: the server's root (``http://host:8000``); a trailing ``/v1`` is accepted and dropped, since the server's
            own routes (``/tokenize``) sit beside ``/v1``.
        api_key: sent as ``Authorization: Bearer ...``; None sends none.
        timeout: seconds one try may take (connecting and reading the whole reply).
        retries: tries after the first, on no connection, a timeout, HTTP 408, 429 or 5xx.
        backoff: seconds before the first retry, doubling at each (capped at ``max_backoff``).
        key: the config key or flag that names this server in messages (``teacher.server.url``).
        sleep: how to wait between tries (tests replace it).
    """

    url: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    key: str = "server"
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        root = self.url.strip().rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        if not root.startswith(("http://", "https://")):
            raise InputError(f"{self.key}: {self.url!r} is not an http:// or https:// URL")
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0:
            raise InputError(f"{self.key}: need timeout > 0, retries >= 0 and backoff >= 0")
        self.url = root

    def get(self, path: str) -> Any:
        """``GET url + path``, the reply's JSON (retried as the class says)."""
        return self._call(path, None)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """``POST url + path`` with the JSON ``body``, the reply's JSON (retried as the class says)."""
        return self._call(path, json.dumps(body).encode())

    def _once(self, path: str, data: bytes | None) -> Any:
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as reply:
            return json.loads(reply.read())

    def _call(self, path: str, data: bytes | None) -> Any:
        started, wait, last = time.monotonic(), self.backoff, ""
        for attempt in range(self.retries + 1):
            try:
                return self._once(path, data)
            except urllib.error.HTTPError as e:
                if e.code not in RETRIED_STATUS:
                    detail, param = _detail(e.read())
                    raise Refusal(self.url + path, e.code, detail, param) from None
                last = f"HTTP {e.code} ({_detail(e.read())[0]})"
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
                # ValueError: a reply cut short is not JSON (a server killed mid-answer)
                last = _reason(e)
            if attempt < self.retries:
                self.sleep(wait)
                wait = min(self.max_backoff, wait * 2)
        seconds = time.monotonic() - started
        tries = self.retries + 1
        raise ServerError(
            f"{self.key} {self.url}: no answer to {path} after {tries} tr{'y' if tries == 1 else 'ies'} in "
            f"{seconds:.0f} s (last: {last})"
        )
