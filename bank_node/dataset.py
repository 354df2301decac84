"""A bank's labelled feature table as training and time-based holdout matrices (stays at the bank)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

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


def _float32_rows(source: ds.Dataset, feature_names: list[str], parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One float32 matrix per part (its rows' positions in the table), filled one feature column at a time:
    memory is the matrices plus one column, never the whole table. Nulls become NaN."""
    matrices = {part: np.empty((len(rows), len(feature_names)), dtype=np.float32) for part, rows in parts.items()}
    for j, name in enumerate(feature_names):
        values = pc.cast(source.to_table(columns=[name]).column(0), pa.float64()).to_numpy(zero_copy_only=False)
        for part, rows in parts.items():
            matrices[part][:, j] = values[rows]
    return matrices


def feature_rows(features_dir: str | Path, feature_names: list[str]) -> tuple[pa.Array, np.ndarray]:
    """Every row's transaction id and float32 features (scoring), ordered by time then id."""
    source = ds.dataset(str(features_dir), format="parquet")
    keys, order = _ordered(source)
    rows = order.to_numpy()
    return keys.column("transaction_id").take(order), _float32_rows(source, feature_names, {"all": rows})["all"]


def load_dataset(features_dir: str | Path, feature_names: list[str], holdout_fraction: float) -> BankDataset:
    """Labelled rows only, ordered by time then id; the latest ``holdout_fraction`` of them is the holdout.

    Read column by column (``_float32_rows``): at 10M rows the two float32 matrices take ~1.8 GB, where
    a pandas table of the features took several times that.
    """
    source = ds.dataset(str(features_dir), format="parquet")
    keys, order = _ordered(source)
    labelled = pc.filter(order, pc.is_valid(keys.column(LABEL).take(order)))
    cut = int(round(len(labelled) * (1.0 - holdout_fraction)))
    parts = {"train": labelled.slice(0, cut).to_numpy(), "holdout": labelled.slice(cut).to_numpy()}
    matrices = _float32_rows(source, feature_names, parts)
    label = keys.column(LABEL).to_numpy(zero_copy_only=False)
    first = int(parts["holdout"][0]) if len(parts["holdout"]) else None
    return BankDataset(
        feature_names=list(feature_names),
        X_train=matrices["train"],
        y_train=label[parts["train"]].astype(np.int32),
        X_holdout=matrices["holdout"],
        y_holdout=label[parts["holdout"]].astype(np.int32),
        holdout_start=pd.Timestamp(keys.column("event_time")[first].as_py()).isoformat() if first is not None else None,
        holdout_first_id=str(keys.column("transaction_id")[first].as_py()) if first is not None else None,
    )


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
