"""The offline teacher cache: the teacher's top-k tokens and log-probabilities at every supervised position of the
training data, computed once (``adakd cache``, :func:`build_cache`) and read at training time instead of running the
teacher (``teacher.cache``, :func:`open_cache`). See ``docs/cache.md``; the file format is in :mod:`.format`.

Needs the ``train`` extra (transformers, which brings safetensors and numpy).
"""

from __future__ import annotations

from .build import build_cache, check_cache_config
from .format import FORMAT
from .reader import CachedTeacherCollator, IndexedExamples, TeacherCache, open_cache

__all__ = [
    "FORMAT",
    "CachedTeacherCollator",
    "IndexedExamples",
    "TeacherCache",
    "build_cache",
    "check_cache_config",
    "open_cache",
]
