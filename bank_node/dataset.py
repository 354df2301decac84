"""A bank's labelled feature table as training and time-based holdout matrices (stays at the bank)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from bank_node.free_memory import release_free_memory
from pipelines.contract import LABEL


@dataclass(frozen=True)
class BankDataset:
    feature_names: list[str]
    X_train: np.ndarray
    y_train: np.ndarray
    X_holdout: np.ndarray
    y_holdout: np.ndarray
    holdout_start: str | None  # first event_time in the holdout (ISO, UTC)
    holdout_first_id: str | None = None  # its transaction_id (ties in time are ordered by id)

    def counts(self) -> dict[str, int]:
        """The only facts about its data a bank shares: row and class counts."""
        return {
            "train_rows": int(len(self.y_train)),
            "positives": int(self.y_train.sum()),
            "negatives": int(len(self.y_train) - self.y_train.sum()),
            "holdout_rows": int(len(self.y_holdout)),
            "holdout_positives": int(self.y_holdout.sum()),
        }


def _ordered(source: ds.Dataset) -> tuple[pa.Table, pa.Array]:
    """The keys and label of every row, and the row order by event time, then transaction id."""
    keys = source.to_table(columns=["transaction_id", "event_time", LABEL])
    return keys, pc.sort_indices(keys, sort_keys=[("event_time", "ascending"), ("transaction_id", "ascending")])


_TIE_CHUNK = 1 << 20  # sorted times compared per chunk when looking for ties


def _time_order(source: ds.Dataset) -> np.ndarray | None:
    """Row positions by event time, then transaction id, reading the ids only of rows that tie in time
    (a few in a million): the ids of every row took more memory than the bank's training (issue 14).
    None if an event time is null (``_ordered`` sorts those)."""
    times = source.to_table(columns=["event_time"]).column(0)
    if times.null_count:
        return None
    times = times.cast(pa.int64()).to_numpy()
    release_free_memory()  # the Arrow column, now copied: else its pages stay under everything that follows
    order = np.argsort(times, kind="stable")
    tied = np.zeros(len(order), dtype=bool)
    for start in range(0, len(order), _TIE_CHUNK):  # the sorted times a chunk at a time, not a copy of them all
        chunk = times[order[start:start + _TIE_CHUNK + 1]]
        same = chunk[1:] == chunk[:-1]
        tied[start + 1:start + len(chunk)] |= same
        tied[start:start + len(chunk) - 1] |= same
    if not tied.any():
        return order
    slots = np.flatnonzero(tied)
    rows = order[slots]
    tied_times = times[rows]
    del times
    ids = _take(source, rows, ["transaction_id"]).column(0)
    ties = pa.table({"t": tied_times, "id": ids})
    order[slots] = rows[pc.sort_indices(ties, sort_keys=[("t", "ascending"), ("id", "ascending")]).to_numpy()]
    return order


def _take(source: ds.Dataset, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """``columns`` of the rows at positions ``rows`` (as ``source.take``), read one row group at a time and
    only from the row groups that hold some of them: ``Dataset.take`` decodes every file's whole column
    (at 10M rows the ids alone are ~400 MB, for a few tied rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    by_position = np.argsort(rows, kind="stable")
    wanted = rows[by_position]
    pieces, offset = [], 0
    for fragment in source.get_fragments():
        for group in fragment.split_by_row_group():
            count = group.row_groups[0].num_rows
            low, high = np.searchsorted(wanted, [offset, offset + count])
            if high > low:
                table = group.to_table(schema=source.schema, columns=columns)
                pieces.append(table.take(pa.array(wanted[low:high] - offset)))
                del table
                release_free_memory()
            offset += count
    if len(wanted) and (wanted[0] < 0 or wanted[-1] >= offset):
        raise IndexError(f"row positions out of range for {offset} rows")
    table = pa.concat_tables(pieces) if pieces else source.schema.empty_table().select(columns)
    return table.take(pa.array(np.argsort(by_position)))


BATCH_ROWS = 131_072  # rows per batch (training matrices, predictions): ~23 MB of float32 at 44 features


def _float32_rows(source: ds.Dataset, feature_names: list[str], parts: dict[str, np.ndarray],
                  spill_dir: Path | None = None) -> dict[str, np.ndarray]:
    """One float32 matrix per part (its rows' positions in the table), filled one feature column at a time:
    memory is the matrices plus one column, never the whole table. Nulls become NaN.

    With ``spill_dir`` each matrix is written there instead, column after column, to an unnamed file (gone
    when the matrix is) and mapped read-only (``spilled``): memory is one column.
    """
    shapes = {part: (len(rows), len(feature_names)) for part, rows in parts.items()}
    if spill_dir is None:
        matrices = {part: np.empty(shape, dtype=np.float32) for part, shape in shapes.items()}
    else:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
        files = {part: tempfile.TemporaryFile(dir=spill_dir, prefix=f"{part}-") for part in parts}
    for j, name in enumerate(feature_names):
        values = _float32_column(source.to_table(columns=[name]).column(0))
        for part, rows in parts.items():
            if spill_dir is None:
                matrices[part][:, j] = values[rows]
            else:
                files[part].write(values[rows])
        del values
        release_free_memory()  # else Arrow's pool keeps the pages of every column read so far (~200 MB at 10M)
    if spill_dir is None:
        return matrices
    return {part: _mapped(files[part], shapes[part]) for part in parts}


_EXACT_IN_FLOAT32 = (pa.float32(), pa.int8(), pa.int16(), pa.int32(), pa.uint8(), pa.uint16(), pa.bool_())


def _float32_column(column: pa.ChunkedArray) -> np.ndarray:
    """A feature column as float32, nulls as NaN: the value of float32(float64(x)), without a float64 copy
    of the column where numpy's cast gives it directly (floats, small integers, booleans)."""
    if column.type in _EXACT_IN_FLOAT32 or column.type == pa.float64():
        return column.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float32)


def _mapped(handle, shape: tuple[int, int]) -> np.ndarray:
    """The column-major float32 matrix in ``handle``, mapped read-only; the file stays open with it."""
    handle.flush()
    if shape[0] * shape[1] == 0:
        handle.close()
        return np.empty(shape, dtype=np.float32)
    matrix = np.memmap(handle, dtype=np.float32, mode="r", shape=shape, order="F")
    matrix.spill_file = handle  # read by ``row_batches``; closed (and so removed) with the matrix
    return matrix


def spilled(X: np.ndarray) -> bool:
    """True for a matrix ``load_dataset`` mapped from a spill file (not a view of one)."""
    return getattr(X, "spill_file", None) is not None


def row_batches(X: np.ndarray, batch_rows: int = BATCH_ROWS) -> Iterator[np.ndarray]:
    """``X`` in consecutive batches of ``batch_rows`` rows, every row once and in order, as C-ordered float32.

    A spilled matrix is read from its file (``pread``, a column at a time), not through its mapping, so the
    rows never stay resident in this process: memory is one batch.
    """
    if not spilled(X):
        for start in range(0, len(X), batch_rows):
            yield np.ascontiguousarray(X[start:start + batch_rows], dtype=np.float32)
        return
    rows, columns = X.shape
    fd = X.spill_file.fileno()
    for start in range(0, rows, batch_rows):
        count = min(batch_rows, rows - start)
        batch, column = np.empty((count, columns), dtype=np.float32), np.empty(count, dtype=np.float32)
        for j in range(columns):
            offset = (j * rows + start) * 4
            if os.preadv(fd, [memoryview(column).cast("B")], offset) != count * 4:
                raise OSError(f"spill file of {rows} rows ended early at column {j}, row {start}")
            batch[:, j] = column
        yield batch


def feature_rows(features_dir: str | Path, feature_names: list[str]) -> tuple[pa.Array, np.ndarray]:
    """Every row's transaction id and float32 features (scoring), ordered by time then id."""
    source = ds.dataset(str(features_dir), format="parquet")
    keys, order = _ordered(source)
    rows = order.to_numpy()
    return keys.column("transaction_id").take(order), _float32_rows(source, feature_names, {"all": rows})["all"]


def _labelled(label: pa.ChunkedArray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions (in ``order``) of the rows with a label, and their labels as int32. One int32 copy of the
    labels, not float64 ones: at 10M rows the float64 copies made the load's peak."""
    known = None if label.null_count == 0 else pc.is_valid(label).to_numpy(zero_copy_only=False)
    values = label if known is None else pc.fill_null(label, pa.scalar(0).cast(label.type))
    if pa.types.is_floating(values.type):  # a float label: NaN is "no label" too
        nan = pc.is_nan(values)
        numbered = ~nan.to_numpy(zero_copy_only=False)
        known = numbered if known is None else known & numbered
        values = pc.if_else(nan, pa.scalar(0, values.type), values)
    values = values.to_numpy(zero_copy_only=False).astype(np.int32)
    labelled = order if known is None else order[known[order]]
    return labelled, values[labelled]


def load_dataset(features_dir: str | Path, feature_names: list[str], holdout_fraction: float,
                 spill_dir: str | Path | None = None) -> BankDataset:
    """Labelled rows only, ordered by time then id; the latest ``holdout_fraction`` of them is the holdout.

    Read column by column (``_float32_rows``): at 10M rows the two float32 matrices take ~1.8 GB, where
    a pandas table of the features took several times that. With ``spill_dir`` (a bank's workspace) the
    matrices are written there and mapped, not held: ``row_batches`` reads them a batch at a time.
    """
    source = ds.dataset(str(features_dir), format="parquet")
    order = _time_order(source)
    if order is None:
        order = _ordered(source)[1].to_numpy()
    labelled, y = _labelled(source.to_table(columns=[LABEL]).column(0), order)
    del order
    release_free_memory()
    cut = int(round(len(labelled) * (1.0 - holdout_fraction)))
    parts = {"train": labelled[:cut], "holdout": labelled[cut:]}
    y = {"train": y[:cut], "holdout": y[cut:]}
    del labelled
    holdout_start = holdout_first_id = None
    if len(parts["holdout"]):
        first = _take(source, parts["holdout"][:1], ["event_time", "transaction_id"])
        holdout_start = pd.Timestamp(first.column("event_time")[0].as_py()).isoformat()
        holdout_first_id = str(first.column("transaction_id")[0].as_py())
    matrices = _float32_rows(source, feature_names, parts, None if spill_dir is None else Path(spill_dir))
    data = BankDataset(
        feature_names=list(feature_names),
        X_train=matrices["train"],
        y_train=y["train"],
        X_holdout=matrices["holdout"],
        y_holdout=y["holdout"],
        holdout_start=holdout_start,
        holdout_first_id=holdout_first_id,
    )
    del parts, matrices, source
    release_free_memory()  # the columns read and the row order: ~200 MB kept by the allocators at 10M rows
    return data


def spark_training_rows(spark, features_dir: str | Path, data: BankDataset):
    """The same training rows as ``data.X_train`` as a Spark DataFrame (labelled, before the holdout)."""
    from pyspark.sql import functions as F

    rows = spark.read.parquet(str(features_dir)).filter(F.col(LABEL).isNotNull())
    if data.holdout_start is None:
        return rows
    start = F.lit(pd.Timestamp(data.holdout_start).tz_localize(None).to_pydatetime())
    before = (F.col("event_time") < start) | (
        (F.col("event_time") == start) & (F.col("transaction_id") < F.lit(data.holdout_first_id)))
    return rows.filter(before)
