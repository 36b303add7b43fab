"""The judge's HTTP client: the official ``openai`` SDK pointed at any OpenAI-compatible ``/chat/completions``
server (OpenAI, vLLM, SGLang, llama.cpp's server, TGI, ...) through ``base_url``.

The SDK does the retrying: connection errors, timeouts, HTTP 408, 409, 429 and 5xx are retried up to ``retries``
times, waiting what the server's ``Retry-After`` / ``retry-after-ms`` header asks (up to two minutes), or else an
exponential backoff (0.5 s, 1 s, 2 s, ... up to 8 s). This module turns what is left into one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from collections.abc import Sequence
from typing import Any

from ...errors import AdakdError, InputError
from .defaults import DEFAULT_MAX_TOKENS, DEFAULT_RETRIES, DEFAULT_TEMPERATURE, DEFAULT_TIMEOUT
from .prompts import one_line

__all__ = ["ChatClient", "JudgeRequestError", "chat_completions_url"]

_SUFFIX = "/chat/completions"


class JudgeRequestError(AdakdError, OSError):
    """The judge server refused a request (a 4xx other than 408/409/429), sent something that is not a chat
    completion, or stayed unreachable after all retries. ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0])


def chat_completions_url(endpoint: str) -> str:
    """``{endpoint}/chat/completions`` for a base URL such as ``http://host:8000/v1``.

    A URL that already ends in ``/chat/completions`` is taken as is; anything but an http(s) URL is an
    :class:`~adakd.errors.InputError` naming ``--endpoint``.
    """
    url = endpoint.strip().rstrip("/")
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InputError(f"--endpoint {endpoint!r}: expected an http(s) base URL such as http://localhost:8000/v1")
    return url if url.endswith(_SUFFIX) else url + _SUFFIX


def _error_detail(body: bytes) -> str:
    """The server's own explanation of an HTTP error, from OpenAI's ``{"error": {"message": ...}}`` when present."""
    text = body.decode("utf-8", "replace")
    try:
        payload = json.loads(text)
    except ValueError:
        return one_line(text)
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail", payload.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return one_line(error if isinstance(error, str) else json.dumps(error))
    return one_line(text)


def _message_content(completion: Any) -> str:
    """``choices[0].message.content``; a list of content parts is joined and a null content is an empty reply.

    Servers differ in what they put there, and the SDK does not validate replies, so each step is checked here.
    """
    content = completion.choices[0].message.content
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    if not isinstance(content, str):
        raise TypeError(f"content is a {type(content).__name__}")
    return content


def _is_retried(status: int) -> bool:
    # The statuses the openai SDK retries by itself.
    return status in (408, 409, 429) or status >= 500


class ChatClient:
    """A thread-safe client for an OpenAI-compatible ``/chat/completions`` endpoint, with the judge's settings.

    ``timeout`` (seconds) bounds each connect and each read of one attempt; ``retries`` is the number of retries
    the SDK makes after a first failed attempt (see the module docstring). Other 4xx answers are the caller's
    mistake (wrong model name, missing key) and fail at once. ``api_key=None`` sends no ``Authorization`` header
    (a local vLLM or llama.cpp server needs none), whatever the environment holds. ``http_requests`` counts every
    attempt sent, retries included. Needs the ``openai`` package, imported when the client is made.
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        for ok, message in (
            (bool(model), "--model: the judge model name must not be empty"),
            (timeout > 0, f"--timeout {timeout}: must be > 0 seconds"),
            (retries >= 0, f"--retries {retries}: must be >= 0"),
            (temperature >= 0, f"--temperature {temperature}: must be >= 0"),
            (max_tokens >= 1, f"--max-tokens {max_tokens}: must be >= 1"),
        ):
            if not ok:
                raise InputError(message)
        self.url = chat_completions_url(endpoint)
        self.model = model
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._api_key = api_key or None
        self._lock = threading.Lock()
        # The attempts and the stop event of the request running in this thread, read by the request hook.
        self._local = threading.local()
        self.http_requests = 0
        self._sdk = self._make_sdk_client()

    def _make_sdk_client(self) -> Any:
        import openai  # lazily: importing adakd.eval must not need the judge's dependency

        # An httpx event hook is the SDK's public way to see each attempt (retries included) as it is sent.
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [self._on_request]})
        # The SDK insists on a key; without one, each request omits the Authorization header (see complete).
        return openai.OpenAI(
            base_url=self.url.removesuffix(_SUFFIX),
            api_key=self._api_key or "no-key",
            timeout=self.timeout,
            max_retries=self.retries,
            http_client=http_client,
        )

    def __repr__(self) -> str:
        # Never shows the key: the client ends up in logs and tracebacks.
        key = "set" if self._api_key else "none"
        return f"ChatClient(url={self.url!r}, model={self.model!r}, temperature={self.temperature}, api_key={key})"

    def close(self) -> None:
        """Close the connection pool."""
        self._sdk.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _on_request(self, request: Any) -> None:
        """The httpx request hook, called in the requesting thread before each attempt goes out."""
        stop = getattr(self._local, "stop", None)
        if stop is not None and stop.is_set():
            # Not an httpx error, so the SDK (3.x) lets it through at once; 1.x retries it without sending anything,
            # and complete() reports the abandon either way.
            raise JudgeRequestError(f"{self.url}: request abandoned, the run was stopped")
        if not self._api_key and "authorization" in request.headers:
            # The SDK insists on a key and sends the placeholder as a bearer token; a keyless server gets none.
            del request.headers["authorization"]
        self._local.attempts = getattr(self._local, "attempts", 0) + 1
        with self._lock:
            self.http_requests += 1

    def complete(self, messages: Sequence[dict[str, str]], stop: threading.Event | None = None) -> str:
        """The judge's reply (``choices[0].message.content``) to ``messages``.

        ``stop`` (optional) abandons the request before its next attempt, e.g. when another request of the same
        run failed fatally. Raises :class:`JudgeRequestError` with a one-line message naming the URL.
        """
        import openai

        if stop is not None and stop.is_set():
            raise JudgeRequestError(f"{self.url}: request abandoned, the run was stopped")
        self._local.stop, self._local.attempts = stop, 0
        try:
            completion = self._sdk.chat.completions.create(
                model=self.model,
                messages=list(messages),
                temperature=self.temperature,
                max_tokens=self.max_tokens,
            )
            return _message_content(completion)
        except openai.APIError as e:
            if stop is not None and stop.is_set():
                raise JudgeRequestError(f"{self.url}: request abandoned, the run was stopped") from e
            raise self._request_error(e) from e
        except (ValueError, AttributeError, IndexError, TypeError) as e:
            # A 200 that is not a chat completion: the endpoint is some other server, retrying will not help.
            raise self._not_chat(f"{e.__class__.__name__}: {e}") from e
        finally:
            self._local.stop = None

    def _request_error(self, error: Exception) -> JudgeRequestError:
        """The one-line :class:`JudgeRequestError` for an ``openai.APIError`` the SDK gave up on."""
        import openai

        attempts = getattr(self._local, "attempts", 0)
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            detail = f"HTTP {status}: {_error_detail(error.response.content)}"
            if _is_retried(status) or attempts > 1:
                return JudgeRequestError(self._giving_up(attempts, detail), status=status)
            hint = " (check --api-key-env)" if status in (401, 403) else ""
            hint = hint or (" (check --model and --endpoint)" if status in (400, 404, 422) else "")
            return JudgeRequestError(f"{self.url}: {detail}{hint}", status=status)
        if isinstance(error, openai.APITimeoutError):
            return JudgeRequestError(self._giving_up(attempts, f"timed out after {self.timeout:g} s"))
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error
            return JudgeRequestError(self._giving_up(attempts, f"connection failed: {one_line(str(cause))}"))
        if isinstance(error, openai.APIResponseValidationError):
            return self._not_chat(str(error))
        return JudgeRequestError(f"{self.url}: {type(error).__name__}: {one_line(str(error))}")

    def _giving_up(self, attempts: int, last_error: str) -> str:
        plural = "" if attempts == 1 else "s"
        return f"{self.url}: giving up after {attempts} attempt{plural}, last error: {last_error}"

    def _not_chat(self, detail: str) -> JudgeRequestError:
        return JudgeRequestError(
            f"{self.url}: not an OpenAI chat-completions reply ({one_line(detail)}); "
            "--endpoint should be the API base URL, e.g. http://host:8000/v1"
        )
