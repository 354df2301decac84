"""Give memory this process has freed back to the system between a bank's steps (issue 14).

Loading a bank's rows, scoring them and quantizing them free hundreds of MB at 10M rows that the
allocators keep for reuse: Arrow's pool (mimalloc) keeps the pages of the columns it read, and glibc's
per-thread arenas (numpy, XGBoost's threads) keep theirs. XGBoost's training then allocates its own per-row
state (gradients, prediction cache, row partition) next to them, and the process's peak is the sum. Handing
the free pages back first makes the peak the live memory, not the live memory plus what was once used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

import pyarrow as pa


@cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library: nothing to trim that way)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the free pages of Arrow's default pool and of every glibc arena to the system (live data stays)."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
