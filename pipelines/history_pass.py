"""The history features as one Arrow pass over each sorted partition (Spark ``mapInArrow``).

The partition's rows arrive sorted by (account, event time, id). Batches are gathered into
chunks of whole accounts (the account still arriving is carried into the next chunk), so every
account is computed from all its rows at once and memory stays bounded by a chunk plus the
largest account. No per-row Python: ``pipelines.history_kernels`` works on the chunk's arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from pipelines.history_kernels import Column, history

CHUNK_ROWS = 200_000
_ARROW = {"float": pa.float32(), "int": pa.int32(), "tinyint": pa.int8()}
_NUMPY = {"float": np.float32, "int": np.int32, "tinyint": np.int8}
_SPARK = {"float": T.FloatType(), "int": T.IntegerType(), "tinyint": T.ByteType()}


def history_names(windows: dict[str, int], value_columns: dict[str, str]) -> list[str]:
    """The features ``history`` computes, in the order the pass appends them."""
    names = ["prior_txn_count", "seconds_since_prev_txn", "amount_to_prior_mean", "amount_to_prior_max",
             "amount_zscore"]
    for window in windows:
        names += [f"txn_count_{window}", f"amount_sum_{window}"]
    names += ["small_count_burst", *[f"first_{n}" for n in value_columns]]
    return names + ["new_merchants_24h", "new_devices_24h", "away_from_first_country"]


def history_pass(
    ordered: DataFrame,
    carried: tuple[str, ...],
    micros: str,
    value_columns: dict[str, str],
    windows: dict[str, int],
    burst_seconds: int,
    types: dict[str, str],
) -> DataFrame:
    """``ordered`` (one partition per set of accounts, sorted) -> the ``carried`` columns plus every
    history feature, typed as the contract says (``types``)."""
    names = history_names(windows, value_columns)
    fields = [ordered.schema[c] for c in carried] + [T.StructField(n, _SPARK[types[n]]) for n in names]
    compute = partial(
        history_batches, carried=tuple(carried), micros=micros, value_columns=dict(value_columns),
        windows=dict(windows), burst_seconds=burst_seconds, types={n: types[n] for n in names},
    )
    return ordered.mapInArrow(compute, T.StructType(fields))


def history_batches(
    batches: Iterator[pa.RecordBatch], chunk_rows: int = CHUNK_ROWS, **spec
) -> Iterator[pa.RecordBatch]:
    """Sorted batches in, the same rows (carried columns) with their history features out."""
    pending: list[pa.RecordBatch] = []
    pending_rows, wanted = 0, chunk_rows
    for batch in batches:
        pending.append(batch)
        pending_rows += batch.num_rows
        if pending_rows < wanted:
            continue
        table = pa.Table.from_batches(pending).combine_chunks()
        cut = _last_account_start(table.column("account_id").chunk(0))
        if cut == 0:  # one account fills the chunk: wait for its end
            wanted = 2 * pending_rows
            continue
        yield _features(table.slice(0, cut), **spec)
        rest = table.slice(cut)
        pending, pending_rows, wanted = rest.to_batches(), rest.num_rows, chunk_rows
    if pending_rows:
        yield _features(pa.Table.from_batches(pending).combine_chunks(), **spec)


def _last_account_start(accounts: pa.Array) -> int:
    """Index of the first row of the last account (rows are grouped by account)."""
    if not accounts[-1].is_valid:  # nulls sort first: every row has a null account (one run)
        return 0
    same = pc.fill_null(pc.equal(accounts, accounts[-1]), False)
    other = np.flatnonzero(~same.to_numpy(zero_copy_only=False))
    return int(other[-1]) + 1 if len(other) else 0


def _features(table: pa.Table, carried, micros, value_columns, windows, burst_seconds, types) -> pa.RecordBatch:
    columns = {name: table.column(name).chunk(0) if table.column(name).num_chunks else
               pa.array([], table.schema.field(name).type) for name in table.column_names}
    accounts = _codes(columns["account_id"])[0]
    out = history(
        accounts,
        columns[micros].to_numpy(zero_copy_only=False),
        _numbers(columns["amount_base"]),
        _numbers(columns["is_small_amount"]),
        {name: _codes(columns[column]) for name, column in value_columns.items()},
        windows,
        burst_seconds,
    )
    arrays = [columns[c] for c in carried] + [_to_arrow(out[n], t) for n, t in types.items()]
    return pa.RecordBatch.from_arrays(arrays, names=[*carried, *types])


def _numbers(array: pa.Array) -> Column:
    valid = array.is_valid().to_numpy(zero_copy_only=False) if array.null_count else None
    return pc.fill_null(array, 0).to_numpy(zero_copy_only=False), valid


def _codes(array: pa.Array) -> Column:
    """Dictionary codes of a string column: equal strings, equal codes; nulls are -1 and masked."""
    indices = pc.dictionary_encode(array).indices
    valid = indices.is_valid().to_numpy(zero_copy_only=False) if indices.null_count else None
    return pc.fill_null(indices, -1).to_numpy(zero_copy_only=False).astype(np.int64), valid


def _to_arrow(column: Column, dtype: str) -> pa.Array:
    values, valid = column
    with np.errstate(invalid="ignore", over="ignore"):
        typed = values.astype(_NUMPY[dtype])
    return pa.array(typed, type=_ARROW[dtype], mask=None if valid is None else ~valid)
