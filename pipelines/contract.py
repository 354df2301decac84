"""The raw-transaction contract every bank's input must follow.

One place names the columns, their Spark types and the allowed values; the validation gate,
the feature pipeline and the synthetic generator all read it from here.
"""

from __future__ import annotations

from pyspark.sql import types as T

CHANNELS: tuple[str, ...] = ("card_present", "ecommerce", "transfer", "atm")

RAW_COLUMNS: tuple[tuple[str, T.DataType, bool], ...] = (
    # (name, Spark type, nullable in the contract)
    ("transaction_id", T.StringType(), False),
    ("event_time", T.TimestampType(), False),
    ("account_id", T.StringType(), False),
    ("amount", T.DoubleType(), False),
    ("currency", T.StringType(), False),
    ("merchant_id", T.StringType(), False),
    ("merchant_category", T.StringType(), False),
    ("channel", T.StringType(), False),
    ("country", T.StringType(), False),
    ("device_id", T.StringType(), True),
    ("is_fraud", T.IntegerType(), True),
)

RAW_SCHEMA = T.StructType([T.StructField(name, dtype, True) for name, dtype, _ in RAW_COLUMNS])
COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _, _ in RAW_COLUMNS)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(name for name, _, nullable in RAW_COLUMNS if not nullable)
LABEL = "is_fraud"

CURRENCY_PATTERN = r"^[A-Z]{3}$"  # ISO 4217 alphabetic code
COUNTRY_PATTERN = r"^[A-Z]{2}$"  # ISO 3166-1 alpha-2
