"""``release_free_memory``: pages freed but kept by glibc's allocator go back to the system (RSS drops)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = r"""
import sys
from pathlib import Path
import numpy as np
from bank_node.free_memory import release_free_memory

def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

blocks = [np.ones(12_000, dtype=np.float64) for _ in range(6_000)]  # 96 KB each: glibc's heap, not mmap
del blocks[::2]  # every other block freed: holes the heap keeps (the live blocks pin them)
before = rss_mib()
if sys.argv[1] == "release":
    release_free_memory()
print(before, rss_mib())
"""


def _rss(mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], check=True, capture_output=True, text=True)
    before, after = map(float, out.stdout.split())
    return before, after


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc; malloc_trim is glibc's")
def test_freed_heap_pages_are_returned():
    kept_before, kept_after = _rss("keep")
    before, after = _rss("release")
    assert kept_before - kept_after < 30  # without it the ~275 MB freed stay resident
    assert before - after > 200, (before, after)  # most of them leave


POOL = r"""
import bank_node.node  # what a bank's process imports before it loads its rows
import pyarrow as pa
import pyarrow.dataset as ds
table = ds.dataset(__import__("sys").argv[1], format="parquet").to_table()  # the C++ reader's allocations
print(pa.default_memory_pool().backend_name, pa.total_allocated_bytes() > 0)
"""


def test_bank_process_reads_with_jemalloc(tmp_path):
    """A bank's process allocates Arrow's C++ buffers from jemalloc, not mimalloc (its reading threads' freed
    pages stay out of reach of ``release_free_memory``: ~60 MiB more after a 10M-row load); an explicit
    ``ARROW_DEFAULT_MEMORY_POOL`` is kept."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    if "jemalloc" not in pa.supported_memory_backends():
        pytest.skip("this pyarrow has no jemalloc")
    pq.write_table(pa.table({"x": list(range(1000))}), tmp_path / "part-0.parquet")
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    run = lambda extra: subprocess.run([sys.executable, "-c", POOL, str(tmp_path)], check=True,  # noqa: E731
                                       capture_output=True, text=True, env={**env, **extra}).stdout.split()
    assert run({}) == ["jemalloc", "True"]
    assert run({"ARROW_DEFAULT_MEMORY_POOL": "system"}) == ["system", "True"]
