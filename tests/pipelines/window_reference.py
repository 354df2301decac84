"""The history features as Spark window expressions: the definitions the numpy kernels must match.

This is the window plan ``pipelines.features`` ran before the Arrow pass (session 8), kept as
the executable specification the tests compare against, value for value.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from pipelines.config import FeatureConfig
from pipelines.contract import LABEL
from pipelines.features import (
    FIRST_USE_COLUMNS,
    KEYS,
    MICROS,
    feature_types,
    row_features,
    with_base_amount,
    with_event_order,
)


def _history() -> Window:
    return Window.partitionBy("account_id").orderBy(MICROS, "transaction_id")


def _before(lag_micros: int) -> Window:
    return Window.partitionBy("account_id").orderBy(MICROS).rangeBetween(Window.unboundedPreceding, -lag_micros)


def _trailing(column: str, seconds: int, agg) -> Column:
    """``[t - w, t)`` over a range frame plus the same instant's rows up to this one in id order."""
    earlier = Window.partitionBy("account_id").orderBy(MICROS).rangeBetween(-seconds * 1_000_000, -1)
    same_instant = Window.partitionBy("account_id", MICROS).orderBy("transaction_id").rowsBetween(
        Window.unboundedPreceding, 0
    )
    return F.coalesce(agg(column).over(earlier), F.lit(0)) + agg(column).over(same_instant)


def _trailing_count(column: str, seconds: int, agg) -> Column:
    upto = _history().rowsBetween(Window.unboundedPreceding, 0)
    before = agg(column).over(_before(seconds * 1_000_000 + 1))
    return agg(column).over(upto) - F.coalesce(before, F.lit(0))


def _safe_ratio(numerator: Column, denominator: Column) -> Column:
    return F.when(denominator > 0, numerator / denominator)


def history_columns(cfg: FeatureConfig) -> dict[str, Column]:
    ordered = _history()
    micros = F.col(MICROS)
    prior = ordered.rowsBetween(Window.unboundedPreceding, -1)
    prior_mean = F.avg("amount_base").over(prior)
    prior_std = F.stddev_samp("amount_base").over(prior)
    home = F.first("country").over(ordered.rowsBetween(Window.unboundedPreceding, 0))
    features = {
        "prior_txn_count": F.row_number().over(ordered) - 1,
        "seconds_since_prev_txn": (micros - F.lag(micros).over(ordered)) / 1e6,
        "amount_to_prior_mean": _safe_ratio(F.col("amount_base"), prior_mean),
        "amount_to_prior_max": _safe_ratio(F.col("amount_base"), F.max("amount_base").over(prior)),
        "amount_zscore": _safe_ratio(F.col("amount_base") - prior_mean, prior_std),
        "away_from_first_country": (F.col("country") != home).cast("int"),
    }
    for name, seconds in cfg.windows_seconds.items():
        features[f"txn_count_{name}"] = _trailing_count("amount_base", seconds, F.count)
        features[f"amount_sum_{name}"] = _trailing("amount_base", seconds, F.sum)
    features["small_count_burst"] = _trailing_count("is_small_amount", cfg.burst_window_seconds, F.sum)
    earlier = ordered.rowsBetween(Window.unboundedPreceding, -1)
    for name, column in FIRST_USE_COLUMNS.items():
        seen = F.collect_set(column).over(earlier)
        first = F.col(column).isNotNull() & ~F.coalesce(F.array_contains(seen, F.col(column)), F.lit(False))
        features[f"first_{name}"] = first.cast("int")
    return features


def reference_features(validated: DataFrame, cfg: FeatureConfig) -> DataFrame:
    """``build_features`` as Spark windows: same columns, types and values."""
    prepared = validated.transform(with_base_amount, cfg).transform(with_event_order)
    windowed = prepared.select("*", *[c.alias(n) for n, c in {**row_features(cfg), **history_columns(cfg)}.items()])
    upto = _history().rowsBetween(Window.unboundedPreceding, 0)
    day = {}
    for name, feature in {"merchant": "new_merchants_24h", "device": "new_devices_24h"}.items():
        before_day = F.sum(f"first_{name}").over(_before(86_400 * 1_000_000 + 1))
        day[feature] = F.sum(f"first_{name}").over(upto) - F.coalesce(before_day, F.lit(0))
    windowed = windowed.select("*", *[c.alias(n) for n, c in day.items()])
    windowed = windowed.withColumn("small_burst", F.col("small_count_burst") >= cfg.burst_min_count)
    columns = [F.col(k) for k in KEYS] + [F.col(LABEL)]
    columns += [F.col(name).cast(dtype).alias(name) for name, dtype in feature_types(cfg).items()]
    return windowed.select(*columns)
