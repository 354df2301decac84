"""The contract as a Great Expectations suite, run on Spark DataFrames with Data Docs.

GX runs the suite once, on the valid rows the gate wrote: they must pass every expectation
(Data Docs show that run). What was wrong with the input is counted without a second GX pass
over the same rows: each expectation comes with the Spark condition that marks a row it would
count as unexpected, summed in the gate's one aggregation (a test checks the counts equal GX's).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipelines.contract import CHANNELS, COUNTRY_PATTERN, CURRENCY_PATTERN, LABEL, REQUIRED_COLUMNS

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
logging.getLogger("great_expectations").setLevel(logging.ERROR)


@dataclass(frozen=True)
class SuiteOutcome:
    success: bool
    failures: dict[str, int | None]  # "expectation(column)" -> unexpected count (None: not counted)
    data_docs: str | None


UNIQUE_ID = "expect_column_values_to_be_unique(transaction_id)"


def contract_checks(known_currencies: list[str], as_of: datetime) -> list[tuple]:
    """The raw-transaction contract as (GX expectation, Spark condition of an unexpected row) pairs.

    The condition follows GX's counting: null values are not unexpected except for the not-null
    expectations. Uniqueness has no row condition (``None``): it is counted from repeated ids.
    The max-event-time expectation counts the rows after ``as_of``.
    """
    import great_expectations.expectations as gxe

    col = F.col
    checks: list[tuple] = [(gxe.ExpectColumnValuesToNotBeNull(column=n), col(n).isNull()) for n in REQUIRED_COLUMNS]
    return checks + [
        (gxe.ExpectColumnValuesToBeUnique(column="transaction_id"), None),
        (gxe.ExpectColumnValuesToBeBetween(column="amount", min_value=0, strict_min=True), col("amount") <= 0),
        (gxe.ExpectColumnValuesToMatchRegex(column="currency", regex=CURRENCY_PATTERN),
         ~col("currency").rlike(CURRENCY_PATTERN)),
        (gxe.ExpectColumnValuesToBeInSet(column="currency", value_set=sorted(known_currencies)),
         ~col("currency").isin(sorted(known_currencies))),
        (gxe.ExpectColumnValuesToMatchRegex(column="country", regex=COUNTRY_PATTERN),
         ~col("country").rlike(COUNTRY_PATTERN)),
        (gxe.ExpectColumnValuesToBeInSet(column="channel", value_set=list(CHANNELS)),
         ~col("channel").isin(list(CHANNELS))),
        (gxe.ExpectColumnValuesToBeInSet(column=LABEL, value_set=[0, 1]), ~col(LABEL).isin(0, 1)),
        (gxe.ExpectColumnMaxToBeBetween(column="event_time", max_value=as_of.replace(tzinfo=None)),
         col("event_time") > F.lit(as_of.replace(tzinfo=None))),
    ]


def check_key(expectation) -> str:
    """``expectation(column)``, the name a failure is reported under."""
    return f"{expectation.expectation_type}({expectation.column})"


def contract_expectations(known_currencies: list[str], as_of: datetime) -> list:
    """The raw-transaction contract as GX expectations."""
    return [expectation for expectation, _ in contract_checks(known_currencies, as_of)]


def unexpected_counts(checks: list[tuple]) -> list[Column]:
    """One aggregate column per row condition, named by its expectation: rows it counts as unexpected."""
    return [
        F.count(F.when(condition, 1)).alias(check_key(expectation))
        for expectation, condition in checks
        if condition is not None
    ]


def run_suite(
    df: DataFrame, expectations: list, gx_root: Path, asset_name: str, result_format: str = "BOOLEAN_ONLY"
) -> SuiteOutcome:
    """Validate ``df`` against ``expectations`` in a file-backed GX project at ``gx_root``; build Data Docs.

    ``BOOLEAN_ONLY`` (the gate's) computes pass/fail only; ``BASIC`` also counts unexpected rows.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(gx_root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_or_update_spark(name="bank", persist=False)  # no second cache of df
    asset = next((a for a in source.assets if a.name == asset_name), None) or source.add_dataframe_asset(asset_name)
    batch = next((b for b in asset.batch_definitions if b.name == "whole"), None)
    batch = batch or asset.add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add_or_update(
        gx.ExpectationSuite(name="raw_transaction_contract", expectations=[copy.copy(e) for e in expectations])
    )
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"{asset_name}_vs_contract", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"{asset_name}_gate",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": result_format},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": df})
    failures = {
        f"{outcome.expectation_config.type}({outcome.expectation_config.kwargs.get('column', '')})":
            outcome.result.get("unexpected_count")
        for run in result.run_results.values()
        for outcome in run.results
        if not outcome.success
    }
    sites = context.get_docs_sites_urls()
    return SuiteOutcome(
        success=bool(result.success), failures=failures, data_docs=sites[0]["site_url"] if sites else None
    )
