"""The bank's training and holdout matrices: loaded column by column, equal to a pandas reference."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bank_node.dataset import feature_rows, load_dataset
from pipelines.contract import LABEL

NAMES = ["amount", "count_24h", "is_new_merchant"]


def _sorted_table(folder) -> pd.DataFrame:
    frame = pq.read_table(str(folder)).to_pandas()
    return frame.sort_values(["event_time", "transaction_id"], kind="mergesort").reset_index(drop=True)


def _reference(frame: pd.DataFrame, holdout_fraction: float):
    """The split as a pandas table does it: labelled rows by (time, id), the latest share held out."""
    labelled = frame[frame[LABEL].notna()]
    cut = int(round(len(labelled) * (1.0 - holdout_fraction)))
    matrix = lambda part: part[NAMES].to_numpy(dtype=np.float32, na_value=np.nan)  # noqa: E731
    return labelled.iloc[:cut], labelled.iloc[cut:], matrix


def _write_parts(folder, seed: int = 3, rows: int = 997, files: int = 4) -> None:
    """Shuffled rows over several Parquet files: nulls in features and labels, ties in time, mixed types."""
    rng = np.random.default_rng(seed)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    table = pa.table({
        "transaction_id": [f"t{i:05d}" for i in rng.permutation(rows)],
        "event_time": pa.array([start + timedelta(minutes=int(m)) for m in rng.integers(0, 400, rows)],
                               pa.timestamp("us", tz="UTC")),
        LABEL: pa.array([None if r < 0.1 else int(r > 0.9) for r in rng.random(rows)], pa.int32()),
        "amount": pa.array([None if r < 0.05 else float(r * 1000.123456789) for r in rng.random(rows)]),
        "count_24h": pa.array([None if r < 0.05 else int(r * 50) for r in rng.random(rows)], pa.int64()),
        "is_new_merchant": pa.array([None if r < 0.05 else bool(r > 0.5) for r in rng.random(rows)]),
    })
    folder.mkdir()
    for k, part in enumerate(np.array_split(np.arange(rows), files)):
        pq.write_table(table.take(part), folder / f"part-{k:05d}.parquet")


def test_load_dataset_equals_the_pandas_split(tmp_path):
    _write_parts(tmp_path / "features")
    data = load_dataset(tmp_path / "features", NAMES, 0.2)
    train, holdout, matrix = _reference(_sorted_table(tmp_path / "features"), 0.2)

    assert data.X_train.dtype == np.float32 and data.X_train.shape == (len(train), len(NAMES))
    np.testing.assert_array_equal(data.X_train, matrix(train))  # NaN where NaN, bit for bit elsewhere
    np.testing.assert_array_equal(data.X_holdout, matrix(holdout))
    np.testing.assert_array_equal(data.y_train, train[LABEL].to_numpy(np.int32))
    np.testing.assert_array_equal(data.y_holdout, holdout[LABEL].to_numpy(np.int32))
    assert data.holdout_start == holdout["event_time"].iloc[0].isoformat()
    assert data.holdout_first_id == holdout["transaction_id"].iloc[0]
    assert data.counts()["train_rows"] + data.counts()["holdout_rows"] == train.shape[0] + holdout.shape[0]


def test_feature_rows_are_every_row_by_time_then_id(tmp_path):
    _write_parts(tmp_path / "features")
    ids, X = feature_rows(tmp_path / "features", NAMES)
    frame = _sorted_table(tmp_path / "features")
    assert ids.to_pylist() == frame["transaction_id"].tolist()  # unlabelled rows are scored too
    np.testing.assert_array_equal(X, frame[NAMES].to_numpy(dtype=np.float32, na_value=np.nan))


def test_load_dataset_without_labelled_rows_has_no_holdout(tmp_path):
    folder = tmp_path / "features"
    folder.mkdir()
    pq.write_table(pa.table({"transaction_id": ["a"], "event_time": pa.array([datetime(2026, 1, 1)]),
                             LABEL: pa.array([None], pa.int32()), "amount": [1.0], "count_24h": [2],
                             "is_new_merchant": [True]}), folder / "part-0.parquet")
    data = load_dataset(folder, NAMES, 0.2)
    assert data.X_train.shape == (0, 3) and data.X_holdout.shape == (0, 3)
    assert data.holdout_start is None and data.holdout_first_id is None


def test_every_column_type_the_features_use_loads_as_float32_of_its_float64(tmp_path):
    """The feature pipeline writes float32, int8 and int32 columns (read without a float64 copy where exact)
    and may write others; a float label's NaN is no label, as a null is. Spilled or not, the same matrices."""
    rng = np.random.default_rng(11)
    rows = 503
    nulls = lambda values: [None if r < 0.07 else v for r, v in zip(rng.random(rows), values)]  # noqa: E731
    columns = {
        "f32": pa.array(nulls(rng.normal(0, 1e6, rows).tolist()), pa.float32()),
        "f64": pa.array(nulls((rng.random(rows) * 1000.123456789).tolist()), pa.float64()),
        "i8": pa.array(nulls(rng.integers(-128, 128, rows).tolist()), pa.int8()),
        "i32": pa.array(nulls(rng.integers(-2**31, 2**31, rows).tolist()), pa.int32()),  # not exact in float32
        "u16": pa.array(nulls(rng.integers(0, 2**16, rows).tolist()), pa.uint16()),
        "i64": pa.array(nulls(rng.integers(-2**53, 2**53, rows).tolist()), pa.int64()),
        "flag": pa.array(nulls((rng.random(rows) > 0.5).tolist()), pa.bool_()),
    }
    labels = [None if r < 0.05 else float("nan") if r < 0.1 else float(r > 0.8) for r in rng.random(rows)]
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    table = pa.table({"transaction_id": [f"t{i:04d}" for i in range(rows)],
                      "event_time": pa.array([start + timedelta(minutes=int(m)) for m in rng.integers(0, 90, rows)],
                                             pa.timestamp("us", tz="UTC")),
                      LABEL: pa.array(labels, pa.float64()), **columns})
    (tmp_path / "features").mkdir()
    pq.write_table(table, tmp_path / "features" / "part-0.parquet")
    names = list(columns)
    frame = _sorted_table(tmp_path / "features")
    labelled = frame[frame[LABEL].notna()]  # pandas: NaN and null alike
    cut = int(round(len(labelled) * 0.75))
    expected = labelled[names].astype(np.float64).to_numpy(dtype=np.float32, na_value=np.nan)
    for spill in (None, tmp_path / "spill"):
        data = load_dataset(tmp_path / "features", names, 0.25, spill)
        np.testing.assert_array_equal(data.X_train, expected[:cut])
        np.testing.assert_array_equal(data.X_holdout, expected[cut:])
        np.testing.assert_array_equal(data.y_train, labelled[LABEL].to_numpy(np.int32)[:cut])
        np.testing.assert_array_equal(data.y_holdout, labelled[LABEL].to_numpy(np.int32)[cut:])
        assert data.y_train.dtype == np.int32


def test_ties_found_across_chunk_edges(tmp_path, monkeypatch):
    """Ties in time are looked for a chunk of sorted times at a time: runs of equal times across chunk edges
    are still ordered by id (chunks of 1, 2, 7 rows: every edge cuts a run somewhere)."""
    import bank_node.dataset as dataset

    _write_parts(tmp_path / "features")
    source = dataset.ds.dataset(str(tmp_path / "features"), format="parquet")
    expected = dataset._ordered(source)[1].to_numpy()
    for chunk in (1, 2, 7):
        monkeypatch.setattr(dataset, "_TIE_CHUNK", chunk)
        np.testing.assert_array_equal(dataset._time_order(source), expected)


def test_take_reads_row_groups_as_dataset_take(tmp_path):
    """``_take`` (one row group at a time, only those holding a wanted row) gives ``Dataset.take``'s rows in the
    order asked, across files and row groups, repeated rows included."""
    import pyarrow.dataset as ds

    from bank_node.dataset import _take

    _write_parts(tmp_path / "features")
    table = pq.read_table(tmp_path / "features" / "part-00001.parquet")
    (tmp_path / "features" / "part-00001.parquet").unlink()
    pq.write_table(table, tmp_path / "features" / "part-00001.parquet", row_group_size=60)  # several groups
    source = ds.dataset(str(tmp_path / "features"), format="parquet")
    rows = np.array([996, 0, 250, 249, 310, 249, 500, 7])
    columns = ["event_time", "transaction_id"]
    assert _take(source, rows, columns).equals(source.take(pa.array(rows), columns=columns))
    assert _take(source, rows[:0], columns).num_rows == 0
