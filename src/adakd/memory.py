"""Process memory on the CPU: handing the memory that glibc's allocator keeps after tensors are freed back to the
system, which the trainers do every few optimizer steps (standard library only)."""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

__all__ = ["TRIM_EVERY", "release_freed_memory", "trim_interval"]


def _glibc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _glibc_trim()
TRIM_EVERY = 10  # optimizer steps; ADAKD_MALLOC_TRIM=N changes it, 0 turns trimming off


def trim_interval() -> int:
    """Every how many optimizer steps :func:`release_freed_memory` runs (``ADAKD_MALLOC_TRIM``; 0: never)."""
    value = os.environ.get("ADAKD_MALLOC_TRIM", str(TRIM_EVERY))
    return int(value) if value.isdigit() else TRIM_EVERY


def release_freed_memory() -> bool:
    """Give the memory that glibc's allocator holds free back to the system (``malloc_trim(0)``); whether it could.

    Why: on the CPU, tensors are allocated with malloc. After a large block is freed, glibc raises its threshold for
    serving blocks with mmap (up to 32 MB), so the next steps' activations come from its heaps, whose free space is
    kept, not returned, and fragments as sequence lengths vary from batch to batch: resident memory grows step after
    step. The trainer calls this every ``ADAKD_MALLOC_TRIM`` (10) optimizer steps: trimming after every step holds
    memory flat too, but the next step then faults every page back in (bench/RESULTS.md has both measurements).
    """
    return bool(_TRIM is not None and (_TRIM(0) or True))
