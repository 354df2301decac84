"""A bank's labelled feature table as training and time-based holdout matrices (stays at the bank)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

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


def read_features(features_dir: str | Path, feature_names: list[str]) -> pd.DataFrame:
    """The feature table (keys, label, features) sorted by time then id, for a stable row order."""
    table = pq.read_table(str(features_dir), columns=["transaction_id", "event_time", LABEL, *feature_names])
    frame = table.to_pandas()
    return frame.sort_values(["event_time", "transaction_id"], kind="mergesort").reset_index(drop=True)


def time_split(frame: pd.DataFrame, feature_names: list[str], holdout_fraction: float) -> BankDataset:
    """Labelled rows only; the latest ``holdout_fraction`` of them (by event time) is the holdout."""
    labelled = frame[frame[LABEL].notna()]
    cut = int(round(len(labelled) * (1.0 - holdout_fraction)))
    train, holdout = labelled.iloc[:cut], labelled.iloc[cut:]

    def matrix(part: pd.DataFrame) -> np.ndarray:
        return part[feature_names].to_numpy(dtype=np.float32, na_value=np.nan)

    return BankDataset(
        feature_names=list(feature_names),
        X_train=matrix(train),
        y_train=train[LABEL].to_numpy(dtype=np.int32),
        X_holdout=matrix(holdout),
        y_holdout=holdout[LABEL].to_numpy(dtype=np.int32),
        holdout_start=holdout["event_time"].iloc[0].isoformat() if len(holdout) else None,
        holdout_first_id=str(holdout["transaction_id"].iloc[0]) if len(holdout) else None,
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
