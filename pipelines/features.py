"""Point-in-time feature steps: pure ``DataFrame -> DataFrame`` functions, no I/O.

Every feature of a transaction uses only the same account's earlier events and the
transaction itself. Events are ordered by ``event_time``, ties broken by ``transaction_id``,
so the order (and every feature) is deterministic and never looks ahead.

Every window is per account and ordered by (event time, id), or by a prefix of that order, so
Spark sorts each account's rows once; the window operators stacked on that sort need no other.
A trailing sum over ``[t - w, t]`` is split into the account's events at earlier instants,
``[t - w, t)`` (a range frame), plus the events at the same instant up to this one in id order:
later same-instant events never count. Trailing counts are the running count up to this row
minus the count before ``t - w`` (exact for integers). First uses are flagged against the set of
earlier values; the new merchants/devices in 24 h are running counts of those flags.
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


def _before(lag_micros: int) -> Window:
    """The account's events at least ``lag_micros`` before this one's instant: ``(-inf, t - lag]``."""
    return Window.partitionBy("account_id").orderBy(MICROS).rangeBetween(Window.unboundedPreceding, -lag_micros)


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


def history_features(cfg: FeatureConfig) -> dict[str, Column]:
    """How this amount and timing compare with the account's prior transactions, and trailing
    counts and sums (windows and card-testing bursts); none depends on another window."""
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
    return features


def _trailing_count(column: str, seconds: int, agg) -> Column:
    """Like ``_trailing`` for an integer ``agg`` (count, or sum of a 0/1 flag): the running total up to
    this row minus the total before ``t - seconds``. Both frames grow by one row at a time, so no
    frame is re-aggregated and integer totals make the difference exact."""
    upto = _history().rowsBetween(Window.unboundedPreceding, 0)
    before = agg(column).over(_before(seconds * 1_000_000 + 1))
    return agg(column).over(upto) - F.coalesce(before, F.lit(0))


def first_use_features() -> dict[str, Column]:
    """First use of a device, merchant/payee, country or channel: a value absent from the set of
    values in the account's earlier rows (the history's ordering)."""
    earlier = _history().rowsBetween(Window.unboundedPreceding, -1)
    features: dict[str, Column] = {}
    for name, column in FIRST_USE_COLUMNS.items():
        seen = F.collect_set(column).over(earlier)
        first = F.col(column).isNotNull() & ~F.coalesce(F.array_contains(seen, F.col(column)), F.lit(False))
        features[f"first_{name}"] = first.cast("int")
    return features


def new_in_24h_features() -> dict[str, Column]:
    """New merchants/devices in ``[t - 24h, t]`` up to this row, over the ``first_*`` flags: the
    running count of first uses minus the count before ``t - 24h`` (exact integers). A second
    window operator over the same sort; set sizes over a range frame cost more."""
    upto = _history().rowsBetween(Window.unboundedPreceding, 0)
    features: dict[str, Column] = {}
    for name, feature in NEW_IN_24H.items():
        before_day = F.sum(f"first_{name}").over(_before(86_400 * 1_000_000 + 1))
        features[feature] = F.sum(f"first_{name}").over(upto) - F.coalesce(before_day, F.lit(0))
    return features


NEW_IN_24H = {"merchant": "new_merchants_24h", "device": "new_devices_24h"}


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
    """Validated transactions -> keys, label and the ordered feature columns (types: ``feature_types``).

    The window expressions sit in two ``select``s (the 24 h counts read the first-use flags), so
    Spark evaluates them in window operators stacked over one sort per account.
    """
    prepared = (
        validated.repartition("account_id")  # every window below is per account: one shuffle
        .transform(with_base_amount, cfg)
        .transform(with_event_order)
    )
    features = {**row_features(cfg), **history_features(cfg), **first_use_features()}
    windowed = prepared.select("*", *[c.alias(n) for n, c in features.items()])
    windowed = windowed.select("*", *[c.alias(n) for n, c in new_in_24h_features().items()])
    windowed = windowed.withColumn("small_burst", F.col("small_count_burst") >= cfg.burst_min_count)
    columns = [F.col(k) for k in KEYS] + [F.col(LABEL)]
    columns += [F.col(name).cast(dtype).alias(name) for name, dtype in feature_types(cfg).items()]
    return windowed.select(*columns)
