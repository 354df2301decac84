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


def tag_reasons(df: DataFrame, known_currencies: list[str], as_of: datetime) -> DataFrame:
    """Add ``reason``: null for a valid row, else the first rule it breaks."""
    first_broken = F.coalesce(*[F.when(bad, F.lit(name)) for name, bad in row_rules(df, known_currencies, as_of)])
    tagged = df.withColumn(REASON, first_broken)
    # Keep the earliest valid copy of each transaction_id; later copies are duplicates.
    copies = Window.partitionBy("transaction_id").orderBy(
        F.col(REASON).isNotNull(), "event_time", "account_id", "amount", "merchant_id", "device_id"
    )
    copy_number = F.row_number().over(copies)
    is_duplicate = F.col(REASON).isNull() & F.col("transaction_id").isNotNull() & (copy_number > 1)
    return tagged.withColumn(REASON, F.when(is_duplicate, F.lit(DUPLICATE)).otherwise(F.col(REASON)))


