"""Point-in-time feature steps: pure ``DataFrame -> DataFrame`` functions, no I/O.

Every feature of a transaction uses only the same account's earlier events and the
transaction itself. Events are ordered by ``event_time``, ties broken by ``transaction_id``,
so the order (and every feature) is deterministic and never looks ahead.

Every window is per account and ordered by (event time, id), or by a prefix of that order, so
Spark sorts each account's rows once. A trailing window over ``[t - w, t]`` is split into the
account's events at earlier instants, ``[t - w, t)`` (a range frame), plus the events at the
same instant up to this one in id order: later same-instant events never count.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from pipelines.config import FeatureConfig
from pipelines.contract import CHANNELS, LABEL

MICROS = "_event_micros"  # event time in microseconds: the numeric order key of range frames
KEYS = ("transaction_id", "account_id", "event_time")
FIRST_USE_COLUMNS = {"device": "device_id", "merchant": "merchant_id", "country": "country", "channel": "channel"}


def _history() -> Window:
    """The account's events in point-in-time order."""
    return Window.partitionBy("account_id").orderBy(MICROS, "transaction_id")


def _trailing(column: str, seconds: int, agg) -> Column:
    """``agg`` (count or sum) of ``column`` over the account's events in ``[t - seconds, t]`` up to this one."""
    earlier = Window.partitionBy("account_id").orderBy(MICROS).rangeBetween(-seconds * 1_000_000, -1)
    same_instant = Window.partitionBy("account_id", MICROS).orderBy("transaction_id").rowsBetween(
        Window.unboundedPreceding, 0
    )
    return F.coalesce(agg(column).over(earlier), F.lit(0)) + agg(column).over(same_instant)


def _safe_ratio(numerator: Column, denominator: Column) -> Column:
    return F.when(denominator > 0, numerator / denominator)


def with_event_order(df: DataFrame) -> DataFrame:
    """Add the numeric event time (microseconds) every history window orders by."""
    return df.withColumn(MICROS, F.unix_micros("event_time"))


def with_base_amount(df: DataFrame, cfg: FeatureConfig) -> DataFrame:
    """Amount in the consortium's base currency (rates from config) and its log."""
    rates = F.create_map(*[F.lit(x) for pair in sorted(cfg.rates_to_base.items()) for x in pair])
    base = F.col("amount") * rates[F.col("currency")]
    return df.withColumn("amount_base", base).withColumn("log_amount_base", F.log1p(base))


def with_time_of_day(df: DataFrame) -> DataFrame:
    """Hour (UTC), weekday (Monday = 0) and a night flag."""
    hour = F.hour("event_time")
    return (
        df.withColumn("hour", hour)
        .withColumn("weekday", (F.dayofweek("event_time") + 5) % 7)
        .withColumn("is_night", (hour < 6).cast("int"))
    )


def with_account_history(df: DataFrame) -> DataFrame:
    """How this amount and timing compare with the account's prior transactions."""
    ordered = _history()
    micros = F.col(MICROS)
    prior = ordered.rowsBetween(Window.unboundedPreceding, -1)
    prior_mean = F.avg("amount_base").over(prior)
    prior_std = F.stddev_samp("amount_base").over(prior)
    return (
        df.withColumn("prior_txn_count", F.row_number().over(ordered) - 1)
        .withColumn("seconds_since_prev_txn", (micros - F.lag(micros).over(ordered)) / 1e6)
        .withColumn("amount_to_prior_mean", _safe_ratio(F.col("amount_base"), prior_mean))
        .withColumn("amount_to_prior_max", _safe_ratio(F.col("amount_base"), F.max("amount_base").over(prior)))
        .withColumn("amount_zscore", _safe_ratio(F.col("amount_base") - prior_mean, prior_std))
    )


def with_trailing_windows(df: DataFrame, cfg: FeatureConfig) -> DataFrame:
    """Count and base-currency sum of the account's transactions in each trailing window."""
    for name, seconds in cfg.windows_seconds.items():
        df = df.withColumn(f"txn_count_{name}", _trailing("amount_base", seconds, F.count)).withColumn(
            f"amount_sum_{name}", _trailing("amount_base", seconds, F.sum)
        )
    return df


def with_first_use_flags(df: DataFrame) -> DataFrame:
    """1 where the account uses a device, merchant/payee, country or channel for the first time.

    "Seen before" is the set of values in the account's earlier rows: one window with the
    history's ordering, instead of a sort per column (measured ~25% less CPU on 1M rows). The
    set grows with an account's distinct values, which stay small for real accounts.
    """
    earlier = _history().rowsBetween(Window.unboundedPreceding, -1)
    for name, column in FIRST_USE_COLUMNS.items():
        seen = F.coalesce(F.array_contains(F.collect_set(column).over(earlier), F.col(column)), F.lit(False))
        df = df.withColumn(f"first_{name}", (F.col(column).isNotNull() & ~seen).cast("int"))
    home = F.first("country").over(_history().rowsBetween(Window.unboundedPreceding, 0))
    return (
        df.withColumn("device_missing", F.col("device_id").isNull().cast("int"))
        .withColumn("new_merchants_24h", _trailing("first_merchant", 86_400, F.sum))
        .withColumn("new_devices_24h", _trailing("first_device", 86_400, F.sum))
        .withColumn("away_from_first_country", (F.col("country") != home).cast("int"))
    )


def with_burst_indicators(df: DataFrame, cfg: FeatureConfig) -> DataFrame:
    """Small payments in the burst window (card testing) and whether they form a burst."""
    df = df.withColumn("is_small_amount", (F.col("amount_base") < cfg.small_amount_base).cast("int"))
    return df.withColumn("small_count_burst", _trailing("is_small_amount", cfg.burst_window_seconds, F.sum)).withColumn(
        "small_burst", (F.col("small_count_burst") >= cfg.burst_min_count).cast("int")
    )


def with_categoricals(df: DataFrame, cfg: FeatureConfig) -> DataFrame:
    """One-hot channel and merchant category over fixed vocabularies (unknown -> other)."""
    for channel in CHANNELS:
        df = df.withColumn(f"channel_{channel}", (F.col("channel") == channel).cast("int"))
    known = F.col("merchant_category").isin(list(cfg.merchant_categories))
    for category in cfg.merchant_categories:
        df = df.withColumn(f"mcc_{category}", (F.col("merchant_category") == category).cast("int"))
    return df.withColumn("mcc_other", (~known).cast("int"))


CONTINUOUS = "float"  # the model reads float32: storing more precision buys nothing
COUNT = "int"
SMALL = "tinyint"  # flags (0/1), one-hot columns, hour and weekday


def feature_types(cfg: FeatureConfig) -> dict[str, str]:
    """Spark SQL type of each feature, in contract order."""
    counts = {"prior_txn_count", "new_merchants_24h", "new_devices_24h", "small_count_burst"}
    counts |= {f"txn_count_{w}" for w in cfg.windows_seconds}
    continuous = {"amount_base", "log_amount_base", "seconds_since_prev_txn", "amount_to_prior_mean",
                  "amount_to_prior_max", "amount_zscore"} | {f"amount_sum_{w}" for w in cfg.windows_seconds}
    return {n: CONTINUOUS if n in continuous else COUNT if n in counts else SMALL for n in feature_names(cfg)}


def feature_names(cfg: FeatureConfig) -> list[str]:
    """Ordered feature names the pipeline produces under ``cfg`` (the model's columns)."""
    names = ["amount_base", "log_amount_base", "hour", "weekday", "is_night", "prior_txn_count",
             "seconds_since_prev_txn", "amount_to_prior_mean", "amount_to_prior_max", "amount_zscore"]
    for window in cfg.windows_seconds:
        names += [f"txn_count_{window}", f"amount_sum_{window}"]
    names += [f"first_{n}" for n in FIRST_USE_COLUMNS]
    names += ["device_missing", "new_merchants_24h", "new_devices_24h", "away_from_first_country",
              "is_small_amount", "small_count_burst", "small_burst"]
    names += [f"channel_{c}" for c in CHANNELS]
    names += [f"mcc_{c}" for c in cfg.merchant_categories] + ["mcc_other"]
    return names


def build_features(validated: DataFrame, cfg: FeatureConfig) -> DataFrame:
    """Validated transactions -> keys, label and the ordered feature columns (types: ``feature_types``)."""
    featured = (
        validated.repartition("account_id")  # every window below is per account: one shuffle
        .transform(with_base_amount, cfg)
        .transform(with_time_of_day)
        .transform(with_event_order)
        .transform(with_account_history)
        .transform(with_trailing_windows, cfg)
        .transform(with_first_use_flags)
        .transform(with_burst_indicators, cfg)
        .transform(with_categoricals, cfg)
    )
    columns = [F.col(k) for k in KEYS] + [F.col(LABEL)]
    columns += [F.col(name).cast(dtype).alias(name) for name, dtype in feature_types(cfg).items()]
    return featured.select(*columns)
