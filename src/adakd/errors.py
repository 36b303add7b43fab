"""The project's own exceptions, in one module that imports nothing (the torch-only math modules use it too).

The command line turns an :class:`AdakdError` into one line, ``adakd: error: ...``, and a non-zero exit: status 2
for an :class:`InputError` (the user can fix the file, key, flag or value it names), 1 for the others. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "AdakdError",
    "ConfigError",
    "InputError",
    "NonFiniteLossError",
    "OptionError",
    "ServerError",
    "StorageError",
]


class AdakdError(Exception):
    """Base of the errors adakd raises on purpose; the message is one line that names what went wrong."""


class InputError(AdakdError, ValueError):
    """Bad input: a file, line, key, flag or value, named in the message. A ``ValueError``, so that callers of the
    Python API can catch it as one."""


class OptionError(InputError):
    """A bad option value. ``option`` names it as the config does (``c``, ``base_params.lam``, ...) and ``reason``
    says what is wrong, so that a config layer can name the key without re-checking the value."""

    def __init__(self, option: str, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"{option} {reason}")
        self.option, self.reason = option, reason


class ConfigError(InputError):
    """A bad configuration. The message names the file (when known) and the dotted key; ``key`` and ``reason``
    carry them apart (None when the error is about the file as a whole), so that a caller never parses the text."""

    def __init__(self, message: str, key: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.key, self.reason = key, reason


class NonFiniteLossError(AdakdError, ValueError):
    """The loss of a micro-batch is NaN or inf (bad logits); raised before any state (LATF, stats) is updated."""


class StorageError(AdakdError, OSError):
    """The file system refused a write (no space left, quota, read-only). The message names the path, what was kept
    and how to go on; an ``OSError``, so that callers of the Python API can catch it as one."""


class ServerError(AdakdError, ConnectionError):
    """A server adakd talks to over HTTP (a teacher or a generator served by vLLM) stayed unreachable, kept timing out
    or kept failing after every retry. The message names the URL, the tries and the last reason; a ``ConnectionError``,
    so that callers of the Python API can catch it as one."""
