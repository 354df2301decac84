"""Point-in-time feature steps: pure ``DataFrame -> DataFrame`` functions, no I/O.

Every feature of a transaction uses only the same account's earlier events and the
transaction itself. Events are ordered by ``event_time``, ties broken by ``transaction_id``,
so the order (and every feature) is deterministic and never looks ahead.

The definitions, in Spark window terms (``pipelines.history_kernels`` computes them so):
prior count, mean, max and sample std over the account's earlier rows; the first country is the
account's first row's. A trailing sum over ``[t - w, t]`` is the account's events at earlier
instants, ``[t - w, t)``, plus the events at the same instant up to this one in id order: later
same-instant events never count. Trailing counts are the running count up to this row minus the
count before ``t - w`` (exact integers). A first use is a value absent from the account's earlier
rows; the new merchants/devices in 24 h are running counts of those flags over ``[t - 24h, t]``.

Shape: one shuffle by account and one sort by (account, time, id); the history features are
then computed on each partition's sorted Arrow batches by numpy (``mapInArrow``), not by window
operators. The row features stay Spark expressions.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipelines.config import FeatureConfig
from pipelines.contract import CHANNELS, LABEL
from pipelines.history_pass import history_pass

MICROS = "_event_micros"  # event time in microseconds: the order and the trailing windows' key
KEYS = ("transaction_id", "account_id", "event_time")
FIRST_USE_COLUMNS = {"device": "device_id", "merchant": "merchant_id", "country": "country", "channel": "channel"}


def with_event_order(df: DataFrame) -> DataFrame:
    """Add the numeric event time (microseconds) every history window orders by."""
    return df.withColumn(MICROS, F.unix_micros("event_time"))


def with_base_amount(df: DataFrame, cfg: FeatureConfig) -> DataFrame:
    """Amount in the consortium's base currency (rates from config), its log and the small flag."""
    rates = F.create_map(*[F.lit(x) for pair in sorted(cfg.rates_to_base.items()) for x in pair])
    base = F.col("amount") * rates[F.col("currency")]
    return df.select(
        "*",
        base.alias("amount_base"),
        F.log1p(base).alias("log_amount_base"),
        (base < cfg.small_amount_base).cast("int").alias("is_small_amount"),
    )


def row_features(cfg: FeatureConfig) -> dict[str, Column]:
    """Features of the row alone: time of day, small amount, one-hot channel and merchant category."""
    hour = F.hour("event_time")
    features = {
        "hour": hour,
        "weekday": (F.dayofweek("event_time") + 5) % 7,  # Monday = 0
        "is_night": (hour < 6).cast("int"),
        "device_missing": F.col("device_id").isNull().cast("int"),
    }
    features |= {f"channel_{c}": (F.col("channel") == c).cast("int") for c in CHANNELS}
    features |= {f"mcc_{c}": (F.col("merchant_category") == c).cast("int") for c in cfg.merchant_categories}
    features["mcc_other"] = (~F.col("merchant_category").isin(list(cfg.merchant_categories))).cast("int")
    return features


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




# Carried through the per-partition pass: the keys, the label and what the row features read.
CARRIED = (*KEYS, LABEL, "amount_base", "log_amount_base", "is_small_amount", "channel", "merchant_category",
           "device_id")


def build_features(validated: DataFrame, cfg: FeatureConfig, keep: tuple[str, ...] = ()) -> DataFrame:
    """Validated transactions -> keys, label, the ``keep`` columns as they are, then the ordered feature
    columns (types: ``feature_types``).

    One shuffle by account and one sort by (account, time, id); the history features come from
    ``history_pass`` on each sorted partition, the row features from Spark expressions after it.
    """
    types = feature_types(cfg)
    kept = tuple(c for c in keep if c not in (*KEYS, LABEL))
    carried = (*CARRIED, *(c for c in kept if c not in CARRIED))
    inputs = validated.transform(with_base_amount, cfg).transform(with_event_order)
    inputs = inputs.select(*carried, MICROS, *(c for c in ("merchant_id", "country") if c not in carried))
    ordered = inputs.repartition("account_id").sortWithinPartitions("account_id", MICROS, "transaction_id")
    windowed = history_pass(ordered, carried, MICROS, FIRST_USE_COLUMNS, cfg.windows_seconds,
                            cfg.burst_window_seconds, types)
    windowed = windowed.withColumn("small_burst", F.col("small_count_burst") >= cfg.burst_min_count)
    features = row_features(cfg)
    columns = [F.col(k) for k in (*KEYS, LABEL, *kept)]
    columns += [(features.get(name, F.col(name))).cast(dtype).alias(name) for name, dtype in types.items()]
    return windowed.select(*columns)
