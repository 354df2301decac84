"""Conform raw input to the contract's types, refusing input whose schema cannot be trusted.

A missing column or a column of an incompatible type refuses the whole input (ContractError).
Values that cannot be parsed (CSV text such as ``amount = "abc"``) are not refused here: they
become nulls whose original text is kept, and the row rules quarantine them by name.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.contract import COLUMN_NAMES, LABEL, RAW_COLUMNS

ORIGINAL_PREFIX = "__original__"

_NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType, T.DecimalType)
# Which stored types each contract column accepts (anything else refuses the input).
_ACCEPTED: dict[str, tuple[type, ...]] = {
    "event_time": (T.TimestampType, T.TimestampNTZType),
    "amount": _NUMERIC,
    LABEL: _NUMERIC + (T.NullType,),
    "device_id": (T.StringType, T.NullType),
}
# Types the typed columns take while rules run; the label stays double until it is checked.
_WORKING_TYPE: dict[str, T.DataType] = {name: dtype for name, dtype, _ in RAW_COLUMNS}
_WORKING_TYPE[LABEL] = T.DoubleType()


class ContractError(ValueError):
    """The input's columns do not follow the raw-transaction contract."""


def schema_problems(schema: T.StructType, fmt: str) -> list[str]:
    """Name every missing contract column and every column of an unacceptable type."""
    fields = {f.name: f.dataType for f in schema.fields}
    problems = [f"missing column '{name}'" for name in COLUMN_NAMES if name not in fields]
    if fmt == "csv":
        return problems
    for name, dtype, _ in RAW_COLUMNS:
        found = fields.get(name)
        if found is None:
            continue
        accepted = _ACCEPTED.get(name, (T.StringType,))
        if not isinstance(found, accepted):
            problems.append(f"column '{name}' has type {found.simpleString()}, expected {dtype.simpleString()}")
    return problems


def conform(df: DataFrame, fmt: str) -> DataFrame:
    """Return ``df`` with contract columns cast to their working types.

    Where a cast may change a value's text (every CSV column, widened Parquet numbers) the
    original is kept in ``__original__<name>`` so a quarantined row is written as it came.
    """
    problems = schema_problems(df.schema, fmt)
    if problems:
        raise ContractError("input refused, it does not follow the raw-transaction contract: " + "; ".join(problems))
    fields = {f.name: f.dataType for f in df.schema.fields}
    typed: list[Column] = []
    originals: list[Column] = []
    for name, _, _ in RAW_COLUMNS:
        target = _WORKING_TYPE[name]
        if fields[name] == target:
            typed.append(F.col(name))
            continue
        originals.append(F.col(name).alias(ORIGINAL_PREFIX + name))
        typed.append(F.col(name).try_cast(target).alias(name))
    extras = [F.col(c) for c in df.columns if c not in COLUMN_NAMES]
    return df.select(*typed, *extras, *originals)


def original_columns(df: DataFrame) -> list[Column]:
    """Columns as they were in the input: originals where kept, else the column itself."""
    kept = {c[len(ORIGINAL_PREFIX):] for c in df.columns if c.startswith(ORIGINAL_PREFIX)}
    input_columns = [c for c in df.columns if not c.startswith(ORIGINAL_PREFIX)]
    return [F.col(ORIGINAL_PREFIX + c).alias(c) if c in kept else F.col(c) for c in input_columns]


def unparseable(df: DataFrame, name: str) -> Column | None:
    """True where the input held a value for ``name`` that could not be cast (None if never)."""
    if ORIGINAL_PREFIX + name not in df.columns:
        return None
    original = F.col(ORIGINAL_PREFIX + name)
    if isinstance(df.schema[ORIGINAL_PREFIX + name].dataType, T.StringType):
        original = F.when(F.trim(original) != "", original)
    return original.isNotNull() & F.col(name).isNull()
