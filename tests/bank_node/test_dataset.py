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
