"""A fake vLLM OpenAI-compatible server for tests, speaking the wire format of vLLM 0.32 (checked by hand against a
real server): ``GET /v1/models``, ``GET /version``, ``POST /tokenize``, ``POST /v1/completions`` with
``prompt_logprobs``, and vLLM's error bodies (404 for an unknown model, 400 for too many log-probabilities or a token
id out of vocabulary, 401 without the API key).

It is backed by a small torch causal LM and an HF tokenizer the test gives: the prompt's log-probabilities are
``log_softmax`` of the model's float32 logits, one prompt at a time; each ``prompt_logprobs`` entry holds the actual
token first when its rank is above k (as vLLM sends it), then the top k with ranks 1..k.

Fault knobs: ``delay`` (seconds slept before each answer), :meth:`FakeVLLM.fail_next` (the next n requests answer
an HTTP error), ``max_logprobs``, ``api_key``, :meth:`FakeVLLM.stop` (the server is gone) and :meth:`FakeVLLM.start`
again on the same port (a restart). ``requests`` counts every request, ``log`` records their paths.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

__all__ = ["FakeVLLM"]


def _error(message: str, kind: str, code: int, param: str | None = None) -> tuple[int, dict[str, Any]]:
    return code, {"error": {"message": message, "type": kind, "param": param, "code": code}}


class FakeVLLM:
    """A fake vLLM server in a thread (``with FakeVLLM(model, tokenizer) as server: server.url``).

    Args:
        model: a causal LM (``model(input_ids=[1, T]).logits`` ``[1, T, V]``), used under ``torch.no_grad``.
        tokenizer: an HF tokenizer (``/tokenize``, ``decoded_token``).
        name: the served model name.
        max_logprobs: the largest ``prompt_logprobs`` accepted (vLLM's ``--max-logprobs``).
        max_model_len: reported by ``/v1/models``.
        api_key: when set, a request without ``Authorization: Bearer <api_key>`` gets 401.
        port: 0 picks a free one (kept across :meth:`stop` / :meth:`start`).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str = "teacher", max_logprobs: int = 64,
                 max_model_len: int = 2048, api_key: str | None = None, port: int = 0) -> None:  # fmt: skip
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_logprobs, self.max_model_len, self.api_key = max_logprobs, max_model_len, api_key
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        self.delay = 0.0
        self.requests = 0
        self.log: list[str] = []
        self._fail: list[int] = []
        self._lock = threading.Lock()
        self._port = port
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> FakeVLLM:
        """Start serving (again, on the same port after :meth:`stop`)."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                fake._handle(self, None)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                fake._handle(self, self.rfile.read(length))

            def log_message(self, *args: Any) -> None:  # quiet
                return None

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = False  # stop() waits for the answers in progress (no thread left at exit)
        self._port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """The server is gone: connections are refused until :meth:`start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeVLLM:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def fail_next(self, n: int, status: int = 503) -> None:
        """The next ``n`` requests answer HTTP ``status`` (vLLM's error body)."""
        with self._lock:
            self._fail += [status] * n

    # -- requests ---------------------------------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, data: bytes | None) -> None:
        with self._lock:
            self.requests += 1
            self.log.append(handler.path)
            failing = self._fail.pop(0) if self._fail else None
        if self.delay:
            time.sleep(self.delay)
        if failing is not None:
            status, body = _error("Service Unavailable", "ServiceUnavailableError", failing)
        elif self.api_key and handler.headers.get("Authorization") != f"Bearer {self.api_key}":
            status, body = 401, {"error": "Unauthorized"}  # vLLM's --api-key middleware
        else:
            status, body = self._route(handler.command, handler.path, json.loads(data) if data else {})
        payload = json.dumps(body).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except OSError:
            pass  # the client gave up (a timeout) before the answer

    def _route(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        if method == "GET" and path == "/v1/models":
            card = {"id": self.name, "object": "model", "created": 0, "owned_by": "vllm", "root": "fake",
                    "parent": None, "max_model_len": self.max_model_len, "permission": []}  # fmt: skip
            return 200, {"object": "list", "data": [card]}
        if method == "GET" and path == "/version":
            return 200, {"version": "0.32.0-fake"}
        if method != "POST" or path not in ("/tokenize", "/v1/completions"):
            return 404, {"detail": "Not Found"}
        if body.get("model") != self.name:
            message = f"The model `{body.get('model')}` does not exist. Valid aliases: {self.name}."
            return _error(message, "NotFoundError", 404, "model")
        if path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
            return 200, {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": None}
        return self._completions(body)

    def _completions(self, body: dict[str, Any]) -> tuple[int, Any]:
        k = body.get("prompt_logprobs")
        if k is not None and k > self.max_logprobs:
            message = (f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs} "
                       f"(parameter=prompt_logprobs, value={k})")  # fmt: skip
            return _error(message, "BadRequestError", 400, "prompt_logprobs")
        prompts = body["prompt"]
        prompts = [prompts] if prompts and isinstance(prompts[0], int) else prompts
        for ids in prompts:
            if max(ids) >= self.vocab:
                return _error(f"Token id {max(ids)} is out of vocabulary", "BadRequestError", 400)
        choices = []
        for index, ids in enumerate(prompts):
            with torch.no_grad():
                lp = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            token = int(lp[-1].argmax())
            choice = {"index": index, "text": self.tokenizer.decode([token]), "logprobs": None,
                      "finish_reason": "length", "stop_reason": None}  # fmt: skip
            if k is not None:
                choice["prompt_logprobs"] = [None] + [self._entry(lp[j - 1], ids[j], k) for j in range(1, len(ids))]
            choices.append(choice)
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": len(prompts)}
        return 200, {"id": "cmpl-fake", "object": "text_completion", "model": self.name, "choices": choices,
                     "usage": usage}  # fmt: skip

    def _entry(self, lp: torch.Tensor, actual: int, k: int) -> dict[str, Any]:
        """One ``prompt_logprobs`` entry: the actual token when its rank is above k, then the top k, as vLLM."""
        top = lp.topk(min(k, lp.shape[0]))
        entry: dict[str, Any] = {}
        rank = int((lp > lp[actual]).sum()) + 1  # vLLM's rank: 1 + the tokens strictly more probable
        if actual not in top.indices.tolist():
            entry[str(actual)] = self._logprob(lp, actual, rank)
        for r, i in enumerate(top.indices.tolist(), 1):
            entry[str(i)] = self._logprob(lp, i, r)
        return entry

    def _logprob(self, lp: torch.Tensor, i: int, rank: int) -> dict[str, Any]:
        text = self.tokenizer.decode([i]) if i < len(self.tokenizer) else ""  # a padding row has no text
        return {"logprob": float(lp[i]), "rank": rank, "decoded_token": text}
