"""A tiny OpenAI-compatible completions server in a thread, for tests: ``/v1/models``, ``/v1/completions`` (token-id
prompts, answers from a function of the prompt, cut at ``max_tokens`` and after the first stop id, as vLLM cuts them)
and optionally vLLM's ``/tokenize``. Every request body is recorded."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeCompletions:
    """Serve ``models`` at ``url`` until :meth:`close`.

    Args:
        answer: the full answer (token ids) the model would write after a prompt, given the prompt and the request.
        models: the served names (``/v1/models``); the first one's ``max_model_len`` is ``max_model_len``.
        tokenize: text -> ids for ``/tokenize``; None: the route answers 404, as a server without it.
    """

    def __init__(
        self,
        answer: Callable[[list[int], dict[str, Any]], list[int]],
        models: tuple[str, ...] = ("tiny",),
        tokenize: Callable[[str], list[int]] | None = None,
        max_model_len: int = 1024,
    ) -> None:
        self.answer, self.models, self.tokenize, self.max_model_len = answer, models, tokenize, max_model_len
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    return self._send(404, {"detail": "Not Found"})
                data = [{"id": m, "object": "model", "max_model_len": fake.max_model_len} for m in fake.models]
                self._send(200, {"object": "list", "data": data})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append((self.path, body))
                status, reply = fake.route(self.path, body)
                self._send(status, reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def route(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The status and JSON reply of a POST."""
        if path == "/tokenize" and self.tokenize is not None:
            return 200, {"tokens": self.tokenize(body["prompt"]), "count": 0}
        if path != "/v1/completions":
            return 404, {"detail": "Not Found"}
        if body.get("model") not in self.models:
            message = f"The model `{body.get('model')}` does not exist."
            return 404, {"error": {"message": message, "param": "model", "code": 404}}
        prompts = body["prompt"]
        prompts = prompts if prompts and isinstance(prompts[0], list) else [prompts]
        choices = []
        for i, prompt in enumerate(prompts):
            full = self.answer(prompt, body)
            end = next((j for j, t in enumerate(full) if t in body.get("stop_token_ids", [])), None)
            ids = full if end is None else full[: end + 1]
            reason = "stop" if end is not None and end < body["max_tokens"] else "length"
            ids = ids[: body["max_tokens"]]
            choices.append({"index": i, "text": "", "token_ids": ids, "finish_reason": reason})
        return 200, {"object": "text_completion", "choices": choices}

    def completions(self) -> list[dict[str, Any]]:
        """The bodies of the ``/v1/completions`` requests, in arrival order."""
        return [b for p, b in self.requests if p == "/v1/completions"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
