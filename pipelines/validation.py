"""The bank's validation gate: raw input -> valid rows + quarantined rows + report.

Nothing is lost: every input row ends in ``valid/`` or in ``quarantine/`` (with its reason),
and the gate checks the written counts add up before it reports. Rows it lets through, as
written, must pass the Great Expectations contract suite. Data-level checks decide whether the
bank may train.

Cost: no cache and no aggregation pass over whole rows. The input's rows come from the Parquet
footers, repeated ids from a pass over the id column alone; the training statistics, the rows per
reason and what the contract's expectations flag among the quarantined rows are observed (Spark
``Observation``) while valid/ and quarantine/ are written. Clean input (every row valid) is read
once: quarantine/ is then written empty without a second pass. GX runs once, on the written
valid rows (so the expectations are not also counted over them).
"""

from __future__ import annotations

import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from pipelines.config import PipelineConfig, ValidationConfig
from pipelines.conform import conform, original_columns
from pipelines.contract import COLUMN_NAMES, LABEL
from pipelines.expectations import UNIQUE_ID, check_key, contract_checks, run_suite, unexpected_counts
from pipelines.io import parquet_rows, read_input, write_json, write_parquet
from pipelines.rules import REASON, all_reasons, mark_duplicates, repeated_ids, rule_reasons

VALID_DIR, QUARANTINE_DIR, REPORT_FILE = "valid", "quarantine", "report.json"


class GateError(RuntimeError):
    """The gate's own consistency checks failed; nothing it wrote may be trusted."""


def _utc_naive(moment: datetime | None) -> datetime:
    moment = moment or datetime.now(timezone.utc)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def split_rows(tagged: DataFrame, seen: dict[str, Observation], reasons: list[str], checks: list[tuple]):
    """Return (valid, quarantine) for a conformed DataFrame tagged with ``reason``; no I/O.

    ``seen["valid"]`` and ``seen["quarantine"]`` observe each side's metrics (``valid_metrics``,
    ``quarantine_metrics``, on the conformed columns) when it is written.
    """
    extras = [c for c in tagged.columns if c not in COLUMN_NAMES and c != REASON and not c.startswith("__original__")]
    typed = [F.col(LABEL).cast("int").alias(LABEL) if c == LABEL else F.col(c) for c in COLUMN_NAMES]
    valid = tagged.filter(F.col(REASON).isNull()).observe(seen["valid"], *valid_metrics())
    quarantine = tagged.filter(F.col(REASON).isNotNull()).observe(
        seen["quarantine"], *quarantine_metrics(reasons, checks)
    )
    return valid.select(*typed, *extras), quarantine.select(*original_columns(tagged.drop(REASON)), REASON)


def valid_metrics() -> list[Column]:
    """What the gate reports about its valid rows, observed while they are written. What the
    contract's expectations flag among them is not counted here: GX runs the suite on the
    written valid rows and the gate fails unless none is flagged."""
    return [
        F.count(F.lit(1)).alias("rows"),
        F.count(LABEL).alias("labelled"),
        F.coalesce(F.sum(LABEL), F.lit(0)).alias("fraud"),
        F.min("event_time").alias("first"),
        F.max("event_time").alias("last"),
    ]


def quarantine_metrics(reasons: list[str], checks: list[tuple]) -> list[Column]:
    """Rows per reason and the expectations' counts on the quarantined rows, observed while written."""
    per_reason = [F.count(F.when(F.col(REASON) == r, 1)).alias(f"reason:{r}") for r in reasons]
    return [F.count(F.lit(1)).alias("rows"), *per_reason, *unexpected_counts(checks)]


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


_SHAREABLE = (  # (what the gate wrote, what may leave the bank): the rule, never the bank's own figure
    (re.compile(r"too few labelled rows: \d+ < (\d+)"), "too few labelled rows (fewer than {0})"),
    (re.compile(r"labelled fraud rate \S+ outside (\[[^\]]*\])"), "labelled fraud rate outside {0}"),
)


def shareable_reasons(reasons: list[str]) -> list[str]:
    """The gate's decline reasons as a bank's summary may carry them: the rule that failed with the
    consortium's bound, not the bank's labelled row count or fraud rate (those stay in its report)."""
    shared = []
    for reason in reasons:
        for pattern, text in _SHAREABLE:
            if match := pattern.fullmatch(reason):
                shared.append(text.format(*match.groups()))
                break
        else:
            shared.append("declined by the validation gate")
    return shared


class Gate:
    """One gate run in two steps, so that its valid rows can be written alone or inside a wider dataset.

    Building it plans the split (lazy ``valid`` rows, observed while written); the caller writes
    ``valid`` (or a DataFrame built from it, one job) to a directory, then ``finish(valid_at)``
    writes the quarantine, reconciles every row, runs the GX suite on the written valid rows and
    writes the report. Use it as a context manager: it releases the repeated ids it holds.
    """

    def __init__(self, spark: SparkSession, input_path: str | Path, out_dir: str | Path, config: PipelineConfig,
                 as_of: datetime | None = None):
        self.spark, self.input_path, self.out, self.config = spark, input_path, Path(out_dir), config
        self.as_of = _utc_naive(as_of)
        known = sorted(config.features.rates_to_base)
        raw, self.fmt = read_input(spark, input_path)
        conformed = conform(raw, self.fmt)
        self.checks = contract_checks(known, self.as_of)
        self.reasons = all_reasons(conformed, known, self.as_of)
        self.input_rows = raw.count()  # Parquet: read from the footers
        self._repeated = repeated_ids(conformed).persist()  # a pass over the id column alone; small
        try:
            repeated_count, self.repeated_rows = self._repeated.agg(
                F.count(F.lit(1)), F.coalesce(F.sum("copies"), F.lit(0))).first()
        except BaseException:
            self._repeated.unpersist()
            raise
        ruled = rule_reasons(conformed, known, self.as_of)
        tagged = mark_duplicates(ruled, self._repeated) if repeated_count else ruled
        self.seen = {"valid": Observation("valid"), "quarantine": Observation("quarantine")}
        self.valid, self._quarantine = split_rows(tagged, self.seen, self.reasons, self.checks)

    def __enter__(self) -> "Gate":
        return self

    def __exit__(self, *exc) -> None:
        self._repeated.unpersist()

    def finish(self, valid_at: str | Path) -> dict[str, Any]:
        """After ``valid`` was written at ``valid_at`` (its columns, perhaps among others): the quarantine,
        the row reconciliation, the GX suite on the written valid rows, ``report.json``. On any
        inconsistency every output is removed and ``GateError`` names the problem."""
        out, valid_at = self.out, Path(valid_at)
        stats = self.seen["valid"].get
        counted = [check_key(e) for e, c in self.checks if c is not None]
        if stats["rows"] == self.input_rows:  # every row is valid: no second pass for an empty quarantine
            write_parquet(self._quarantine.limit(0), out / QUARANTINE_DIR)
            quarantined = {"rows": 0} | {k: 0 for k in counted} | {f"reason:{r}": 0 for r in self.reasons}
        else:
            write_parquet(self._quarantine, out / QUARANTINE_DIR)
            quarantined = self.seen["quarantine"].get

        def discard(problem: str) -> GateError:
            shutil.rmtree(valid_at, ignore_errors=True)
            shutil.rmtree(out / QUARANTINE_DIR, ignore_errors=True)
            return GateError(problem)

        per_reason = {r: quarantined[f"reason:{r}"] for r in self.reasons}
        # Reconcile what was written (the Parquet footers' row counts) with the input, per side.
        valid_rows, quarantined_rows = parquet_rows(valid_at), parquet_rows(out / QUARANTINE_DIR)
        if valid_rows != stats["rows"] or quarantined_rows != quarantined["rows"] or (
            valid_rows + quarantined_rows != self.input_rows or sum(per_reason.values()) != quarantined_rows
        ):
            raise discard(f"rows lost: input {self.input_rows} != valid {valid_rows} + quarantined {quarantined_rows}")
        written_valid = self.spark.read.parquet(str(valid_at)).select(*COLUMN_NAMES)
        on_valid = run_suite(written_valid, [e for e, _ in self.checks], out, "valid")
        if not on_valid.success:
            raise discard(f"rows the gate let through break the contract suite: {on_valid.failures}")

        # The suite passed on every valid row, so what the input broke is what the quarantine holds.
        input_failures = {key: quarantined[key] for key in counted}
        input_failures[UNIQUE_ID] = int(self.repeated_rows)
        decline = training_decision(stats["labelled"], stats["fraud"], self.config.validation)
        report = {
            "input": str(self.input_path),
            "input_format": self.fmt,
            "as_of": self.as_of.isoformat() + "Z",
            "input_rows": self.input_rows,
            "valid_rows": valid_rows,
            "valid_path": str(valid_at),
            "quarantined_rows": quarantined_rows,
            "quarantine_reasons": per_reason,
            "labelled_rows": stats["labelled"],
            "fraud_rows": int(stats["fraud"]),
            "fraud_rate": (stats["fraud"] / stats["labelled"]) if stats["labelled"] else None,
            "event_time_min": stats["first"].isoformat() + "Z" if stats["first"] else None,
            "event_time_max": stats["last"].isoformat() + "Z" if stats["last"] else None,
            "training_allowed": not decline,
            "decline_reasons": decline,
            "expectations": {
                "input_failures": {k: v for k, v in sorted(input_failures.items()) if v},
                "valid_passed": on_valid.success,
            },
            "data_docs": on_valid.data_docs,
        }
        write_json(report, out / REPORT_FILE)
        return report


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
    with Gate(spark, input_path, out_dir, config, as_of) as gate:
        write_parquet(gate.valid, Path(out_dir) / VALID_DIR)
        return gate.finish(Path(out_dir) / VALID_DIR)
