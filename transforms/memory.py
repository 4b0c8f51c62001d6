"""Hand memory that a shard's temporaries freed back to the operating system.

Arrow's allocator (mimalloc) and glibc's ``malloc`` keep freed pages for reuse, so a stage
that makes large short-lived copies per shard (joined texts, signature matrices, filtered
tables) holds them as resident memory long after it is done with them: near dedup's peak
at 200k rows was about 90 MiB of such pages (``bench/dedup.py``, #17). Releasing them
between shards costs a few milliseconds and changes no result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

import pyarrow as pa


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's ``malloc_trim``, or ``None`` on another C library."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> None:
    """Return freed pages of Arrow's memory pool and of ``malloc`` to the system."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
