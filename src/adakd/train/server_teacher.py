"""The teacher served by vLLM over HTTP (``teacher.server``), as the trainer's teacher source: the rows
:class:`adakd.serving.teacher.TeacherServer` fetches, scattered into the batch's ``[B, T − 1, k]`` like
:class:`adakd.cache.CachedTeacherCollator` scatters a cache's rows.

Bounded prefetch: :meth:`ServerTeacher.submit` starts a micro-batch's request in a background thread (the trainer's
lookahead, :mod:`.prefetch`, submits the next ``prefetch`` micro-batches as it pulls them), and
:meth:`ServerTeacher.sparse` takes the matching result, or asks now for a batch nobody submitted (evaluation). A
batch is matched by a digest of its ``input_ids``, ``attention_mask`` and ``labels`` bytes, so the device the trainer
moved it to does not matter. Under several processes each rank asks for its own batches.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from ..errors import ServerError
from ..labels import IGNORE_INDEX
from ..sparse import SparseTeacher
from .teacher import SparseSource

__all__ = ["ServerTeacher"]

_KEYS = ("input_ids", "attention_mask", "labels")


def _on_cpu(inputs: dict[str, Tensor]) -> tuple[str, tuple[Tensor, ...]]:
    """The batch's digest and its ``input_ids``, ``attention_mask``, ``labels`` on the CPU."""
    tensors = tuple(inputs[key].detach().cpu().contiguous() for key in _KEYS)
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest(), tensors


class ServerTeacher(SparseSource):
    """A sparse teacher from a vLLM server.

    Args:
        server: the checked server (:meth:`adakd.serving.teacher.TeacherServer.check` has run).
        prefetch: micro-batches asked for ahead of the step (``teacher.server.prefetch``; 0: each when needed).
    """

    name = "teacher.server"

    def __init__(self, server: Any, prefetch: int = 2) -> None:
        self.server, self.prefetch = server, max(0, int(prefetch))
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.waited = 0.0  # seconds the steps were blocked on the server
        self.positions = 0  # supervised positions fetched
        self._closed = threading.Event()
        endpoint = getattr(server, "endpoint", None)
        if endpoint is not None:  # a request retrying in the background stops when the run ends
            endpoint.sleep = self._interruptible(endpoint.sleep)

    def _interruptible(self, sleep: Any) -> Any:
        """``sleep`` between retries, cut short by :meth:`close`: a prefetch thread still retrying a dead server
        would otherwise keep the process alive for the whole backoff after the run has ended."""
        wait = self._closed.wait if sleep is time.sleep else sleep

        def between_tries(seconds: float) -> None:
            wait(seconds)
            if self._closed.is_set():
                raise ServerError(f"{self.name}: the run ended while a request was retried")

        return between_tries

    @property
    def pending(self) -> int:
        """Requests submitted and not yet taken by :meth:`sparse`."""
        return len(self._pending)

    def submit(self, inputs: dict[str, Tensor]) -> None:
        if self.prefetch <= 0:
            return
        key, tensors = _on_cpu(inputs)
        if key in self._pending:
            return
        if self._pool is None:  # one thread per batch in flight: the requests overlap on the server
            self._pool = ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="adakd-teacher")
        self._pending[key] = self._pool.submit(self._rows, *tensors)

    def _rows(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> SparseTeacher:
        rows = self.server.rows(input_ids, attention_mask, labels)
        with self._lock:
            self.positions += rows.tail.shape[0]
        return rows

    def sparse(self, inputs: dict[str, Tensor]) -> SparseTeacher:
        """The batch's teacher ``[B, T − 1, k]`` on its device: the rows at the positions t with
        ``labels[b, t + 1] != -100`` in row-major order, zeros elsewhere (never read)."""
        key, tensors = _on_cpu(inputs)
        started = time.monotonic()
        future = self._pending.pop(key, None)
        try:
            flat = future.result() if future is not None else self._rows(*tensors)
        finally:
            self.waited += time.monotonic() - started
        labels = tensors[2]
        supervised = labels[:, 1:] != IGNORE_INDEX  # [B, T − 1]
        shape, k = tuple(supervised.shape), flat.k
        ids = torch.zeros(*shape, k, dtype=torch.int64)
        logprobs = torch.zeros(*shape, k, dtype=torch.float32)
        tail = torch.zeros(shape, dtype=torch.float32)
        ids[supervised], logprobs[supervised], tail[supervised] = flat.ids, flat.logprobs, flat.tail
        return SparseTeacher(ids, logprobs, tail).to(inputs["input_ids"].device)

    def log_metrics(self) -> dict[str, float]:
        return {
            "teacher_server/requests": getattr(self.server, "requests", 0),
            "teacher_server/wait_seconds": round(self.waited, 3),
            "teacher_server/positions": self.positions,
        }

    def close(self) -> None:
        """Drop the requests in flight and release the threads (a request already sent finishes on its own, without
        retrying)."""
        self._closed.set()
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def serve_teacher(section: Any, tokenizer: Any, vocab_rows: int, max_length: int) -> tuple[ServerTeacher, str]:
    """The run's :class:`ServerTeacher` of the ``teacher.server`` section, checked against the student's tokenizer
    and ``vocab_rows`` and the run's ``data.max_length``, with the line the run logs about it.

    Raises:
        ConfigError: a server that serves another model or tokenizer, a smaller vocabulary, fewer log-probabilities
            than ``top_k`` or a shorter context than ``data.max_length``; the message names the key.
        InputError: ``teacher.server.api_key_env`` names an unset variable.
        ServerError: the server does not answer (the message names ``teacher.server.url``).
    """
    from ..errors import ConfigError
    from ..serving.teacher import TeacherServer

    server = TeacherServer.from_section(section)
    endpoint = server.endpoint
    info = server.check(tokenizer, vocab_rows)
    longest = info.get("max_model_len")
    if longest is not None and max_length + 1 > longest:  # the prompt and the one token generated
        raise ConfigError(
            f"data.max_length: {max_length} tokens (and one generated) do not fit the server's max_model_len "
            f"{longest} (teacher.server.url {endpoint.url}): lower data.max_length or start vLLM with a longer "
            "--max-model-len",
            key="data.max_length",
        )
    version = f", vLLM {info['version']}" if info.get("version") else ""
    line = f"teacher: served by {endpoint.url} ({section.model}, top-{server.k}{version}); no model loaded"
    return ServerTeacher(server, section.prefetch), line
