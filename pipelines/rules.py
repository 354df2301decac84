"""Row rules of the validation gate: each names the reason a row is quarantined.

A row gets the first reason that applies, in the order below; duplicates are decided last,
among rows that pass every other rule, so one bad copy never hides a good one.
"""

from __future__ import annotations

from datetime import datetime

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from pipelines.conform import unparseable
from pipelines.contract import CHANNELS, COUNTRY_PATTERN, CURRENCY_PATTERN, LABEL, REQUIRED_COLUMNS

REASON = "reason"
DUPLICATE = "duplicate_transaction_id"


def row_rules(df: DataFrame, known_currencies: list[str], as_of: datetime) -> list[tuple[str, Column]]:
    """(reason, violated) pairs for ``df`` after ``conform``, in priority order."""
    rules: list[tuple[str, Column]] = []
    for name in ("event_time", "amount", LABEL):
        bad = unparseable(df, name)
        if bad is not None:
            rules.append((f"unparseable_{name}", bad))
    rules += [(f"null_{name}", F.col(name).isNull()) for name in REQUIRED_COLUMNS]
    amount = F.col("amount")
    rules += [
        ("amount_not_positive", (amount <= 0) | F.isnan(amount) | (amount == float("inf"))),
        ("currency_malformed", ~F.col("currency").rlike(CURRENCY_PATTERN)),
        ("currency_without_rate", ~F.col("currency").isin(known_currencies)),
        ("country_malformed", ~F.col("country").rlike(COUNTRY_PATTERN)),
        ("channel_unknown", ~F.col("channel").isin(list(CHANNELS))),
        ("event_time_in_future", F.col("event_time") > F.lit(as_of)),
        ("is_fraud_not_0_1", F.col(LABEL).isNotNull() & ~F.col(LABEL).isin(0.0, 1.0)),
    ]
    return rules


def all_reasons(df: DataFrame, known_currencies: list[str], as_of: datetime) -> list[str]:
    """Every reason the gate can give for ``df``, in priority order."""
    return [name for name, _ in row_rules(df, known_currencies, as_of)] + [DUPLICATE]


def rule_reasons(df: DataFrame, known_currencies: list[str], as_of: datetime) -> DataFrame:
    """Add ``reason``: null where the row breaks no row rule, else the first rule it breaks."""
    first_broken = F.coalesce(*[F.when(bad, F.lit(name)) for name, bad in row_rules(df, known_currencies, as_of)])
    return df.withColumn(REASON, first_broken)


def repeated_ids(df: DataFrame) -> DataFrame:
    """``transaction_id, copies`` for every non-null id that occurs more than once.

    One hash aggregation over the id column alone (Parquet reads just that column; no sort, no
    shuffle of whole rows); the result is small for real data, so the duplicate resolution below
    can broadcast it.
    """
    return (
        df.select("transaction_id")
        .filter(F.col("transaction_id").isNotNull())
        .groupBy("transaction_id")
        .agg(F.count(F.lit(1)).alias("copies"))
        .filter(F.col("copies") > 1)
    )


def mark_duplicates(ruled: DataFrame, repeated: DataFrame) -> DataFrame:
    """Tag later valid copies of an id as duplicates; the earliest valid copy stays.

    Only the valid rows whose id is repeated are ordered (a window over those few rows; an id
    with a single valid copy keeps it); every other row passes through unchanged.
    """
    repeated_flag = repeated.select("transaction_id", F.lit(True).alias("_repeated"))
    joined = ruled.join(F.broadcast(repeated_flag), "transaction_id", "left")
    contested = F.coalesce(F.col("_repeated"), F.lit(False)) & F.col(REASON).isNull()
    copies = Window.partitionBy("transaction_id").orderBy(
        "event_time", "account_id", "amount", "merchant_id", "device_id"
    )
    resolved = joined.filter(contested).withColumn(
        REASON, F.when(F.row_number().over(copies) > 1, F.lit(DUPLICATE))
    )
    return joined.filter(~contested).unionByName(resolved).select(*ruled.columns)


def tag_reasons(df: DataFrame, known_currencies: list[str], as_of: datetime) -> DataFrame:
    """Add ``reason``: null for a valid row, else the first rule it breaks (duplicates decided last)."""
    return mark_duplicates(rule_reasons(df, known_currencies, as_of), repeated_ids(df))
