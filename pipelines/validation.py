"""The bank's validation gate: raw input -> valid rows + quarantined rows + report.

Nothing is lost: every input row ends in ``valid/`` or in ``quarantine/`` (with its reason),
and the gate checks the written counts add up before it reports. Rows it lets through must
pass the Great Expectations contract suite. Data-level checks decide whether the bank may train.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.config import PipelineConfig, ValidationConfig
from pipelines.conform import conform, original_columns
from pipelines.contract import COLUMN_NAMES, LABEL
from pipelines.expectations import contract_expectations, run_suite
from pipelines.io import read_input, write_json, write_parquet
from pipelines.rules import REASON, all_reasons, tag_reasons

VALID_DIR, QUARANTINE_DIR, REPORT_FILE = "valid", "quarantine", "report.json"


class GateError(RuntimeError):
    """The gate's own consistency checks failed; nothing it wrote may be trusted."""


def _utc_naive(moment: datetime | None) -> datetime:
    moment = moment or datetime.now(timezone.utc)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def split_rows(df: DataFrame, known_currencies: list[str], as_of: datetime) -> tuple[DataFrame, DataFrame, DataFrame]:
    """Return (tagged, valid, quarantine) for a conformed DataFrame; no I/O."""
    tagged = tag_reasons(df, known_currencies, as_of)
    extras = [c for c in df.columns if c not in COLUMN_NAMES and not c.startswith("__original__")]
    typed = [F.col(LABEL).cast("int").alias(LABEL) if c == LABEL else F.col(c) for c in COLUMN_NAMES]
    valid = tagged.filter(F.col(REASON).isNull()).select(*typed, *extras)
    quarantine = tagged.filter(F.col(REASON).isNotNull()).select(*original_columns(df), REASON)
    return tagged, valid, quarantine


def training_decision(labelled: int, fraud: int, rules: ValidationConfig) -> list[str]:
    """Reasons this bank must decline to train (empty when it may train)."""
    reasons = []
    if labelled < rules.min_labelled_rows:
        reasons.append(f"too few labelled rows: {labelled} < {rules.min_labelled_rows}")
    if labelled:
        rate = fraud / labelled
        if not rules.fraud_rate_min <= rate <= rules.fraud_rate_max:
            reasons.append(
                f"labelled fraud rate {rate:.5f} outside [{rules.fraud_rate_min}, {rules.fraud_rate_max}]"
            )
    return reasons


def validate(
    spark: SparkSession,
    input_path: str | Path,
    out_dir: str | Path,
    config: PipelineConfig,
    as_of: datetime | None = None,
) -> dict[str, Any]:
    """Run the gate on ``input_path``; write valid/, quarantine/, report.json and Data Docs to ``out_dir``.

    Raises ``ContractError`` (nothing written) when the input's columns break the contract.
    """
    out = Path(out_dir)
    as_of = _utc_naive(as_of)
    known = sorted(config.features.rates_to_base)
    raw, fmt = read_input(spark, input_path)
    conformed = conform(raw, fmt)
    tagged, valid, quarantine = split_rows(conformed, known, as_of)
    tagged.persist()
    try:
        input_rows = raw.count()
        suite = contract_expectations(known, as_of)
        on_input = run_suite(conformed.select(*COLUMN_NAMES), suite, out, "input")
        on_valid = run_suite(valid.select(*COLUMN_NAMES), suite, out, "valid")
        if not on_valid.success:
            raise GateError(f"rows the gate let through break the contract suite: {on_valid.failures}")
        write_parquet(valid, out / VALID_DIR)
        write_parquet(quarantine, out / QUARANTINE_DIR)
    finally:
        tagged.unpersist()

    written_valid = spark.read.parquet(str(out / VALID_DIR))
    written_quarantine = spark.read.parquet(str(out / QUARANTINE_DIR))
    valid_rows, quarantined_rows = written_valid.count(), written_quarantine.count()
    if valid_rows + quarantined_rows != input_rows:
        shutil.rmtree(out / VALID_DIR, ignore_errors=True)
        shutil.rmtree(out / QUARANTINE_DIR, ignore_errors=True)
        raise GateError(f"rows lost: input {input_rows} != valid {valid_rows} + quarantined {quarantined_rows}")

    per_reason = {r: 0 for r in all_reasons(conformed, known, as_of)}
    for row in written_quarantine.groupBy(REASON).count().collect():
        per_reason[row[REASON]] = row["count"]
    stats = written_valid.agg(
        F.count(LABEL).alias("labelled"),
        F.coalesce(F.sum(LABEL), F.lit(0)).alias("fraud"),
        F.min("event_time").alias("first"),
        F.max("event_time").alias("last"),
    ).first()
    decline = training_decision(stats["labelled"], stats["fraud"], config.validation)
    report = {
        "input": str(input_path),
        "input_format": fmt,
        "as_of": as_of.isoformat() + "Z",
        "input_rows": input_rows,
        "valid_rows": valid_rows,
        "quarantined_rows": quarantined_rows,
        "quarantine_reasons": per_reason,
        "labelled_rows": stats["labelled"],
        "fraud_rows": int(stats["fraud"]),
        "fraud_rate": (stats["fraud"] / stats["labelled"]) if stats["labelled"] else None,
        "event_time_min": stats["first"].isoformat() + "Z" if stats["first"] else None,
        "event_time_max": stats["last"].isoformat() + "Z" if stats["last"] else None,
        "training_allowed": not decline,
        "decline_reasons": decline,
        "expectations": {"input_failures": on_input.failures, "valid_passed": on_valid.success},
        "data_docs": on_input.data_docs,
    }
    write_json(report, out / REPORT_FILE)
    return report
