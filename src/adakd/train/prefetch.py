"""Fetching the teacher's part of the next micro-batches while the student trains on this one.

``transformers.Trainer`` pulls each optimizer step's micro-batches from the epoch iterator in one call
(``get_batch_samples``), then sets gradient synchronisation itself for each of them; pulling further ahead changes
neither the batches nor their order. :class:`LookAhead` wraps the epoch iterator: it keeps ``depth`` micro-batches
pulled beyond the ones handed to the trainer and hands each to the teacher's :meth:`~.teacher.Teacher.submit` as it
pulls it, so that a server's answer for the next step is under way while this step's forward and backward run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ServerError

__all__ = ["LookAhead", "Prefetcher", "stopped_by_server"]


class LookAhead(Iterator):
    """The micro-batches of ``source`` in their order, ``depth`` of them pulled (and ``submit``-ted) ahead."""

    def __init__(self, source: Iterator, depth: int, submit: Callable[[Any], None]) -> None:
        self.source, self.depth, self.submit = source, depth, submit
        self._buffer: deque = deque()
        self._done = False

    def __next__(self) -> Any:
        # the batch handed out now, and `depth` beyond it, each submitted when pulled
        while not self._done and len(self._buffer) < self.depth + 1:
            try:
                batch = next(self.source)
            except StopIteration:
                self._done = True
                break
            self.submit(batch)
            self._buffer.append(batch)
        if not self._buffer:
            raise StopIteration
        return self._buffer.popleft()


class Prefetcher:
    """The trainer's lookahead over its current epoch iterator (one :class:`LookAhead` per epoch iterator object:
    the Trainer makes a new one each epoch and hands the same one to every step of it)."""

    def __init__(self, teacher: Any) -> None:
        self.teacher = teacher
        self._source: Iterator | None = None
        self._ahead: LookAhead | None = None

    def wrap(self, epoch_iterator: Iterator) -> Iterator:
        """The iterator to pull this step's micro-batches from."""
        depth = getattr(self.teacher, "prefetch", 0)
        if self.teacher is None or depth <= 0:
            return epoch_iterator
        if epoch_iterator is not self._source:
            self._source, self._ahead = epoch_iterator, LookAhead(epoch_iterator, depth, self.teacher.submit)
        return self._ahead


def stopped_by_server(error: ServerError, step: int, checkpoints: list[str]) -> ServerError:
    """The one line that ends a run whose teacher server stopped answering: the server's error, the optimizer
    ``step`` the run stopped at, the last complete checkpoint (``checkpoints``, newest first) and how to go on."""
    kept = f"the last complete checkpoint is {checkpoints[0]}" if checkpoints else "no checkpoint was saved yet"
    return ServerError(
        f"{error}; training stopped at step {step} ({kept}): rerun the same command with --resume once the "
        "server is back"
    )
