"""A bank's node: validation gate, local training, local evaluation, scoring, the agent."""

import os

# Arrow's C++ allocations (the dataset scanner and Parquet reader that load a bank's rows) use the pool this
# variable names, read once at Arrow's first allocation; ``pyarrow.set_memory_pool`` does not reach them.
# mimalloc, the default, keeps what Arrow's reading threads freed in those threads' heaps, out of reach of
# ``release_free_memory``; jemalloc's release purges every arena (issue 14: training's peak at 10M rows).
# Set before pyarrow is first used in this process; an explicit choice is kept.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
