"""The contract as a Great Expectations suite, run on Spark DataFrames with Data Docs.

The gate runs the suite twice: on the conformed input (what was wrong, for the Data Docs and
the report) and on the rows it lets through, which must pass every expectation.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pyspark.sql import DataFrame

from pipelines.contract import CHANNELS, COUNTRY_PATTERN, CURRENCY_PATTERN, LABEL, REQUIRED_COLUMNS

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
logging.getLogger("great_expectations").setLevel(logging.ERROR)


@dataclass(frozen=True)
class SuiteOutcome:
    success: bool
    failures: dict[str, int]  # "expectation(column)" -> unexpected count, failing ones only
    data_docs: str | None


def contract_expectations(known_currencies: list[str], as_of: datetime) -> list:
    """The raw-transaction contract as GX expectations."""
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToNotBeNull(column=name) for name in REQUIRED_COLUMNS] + [
        gxe.ExpectColumnValuesToBeUnique(column="transaction_id"),
        gxe.ExpectColumnValuesToBeBetween(column="amount", min_value=0, strict_min=True),
        gxe.ExpectColumnValuesToMatchRegex(column="currency", regex=CURRENCY_PATTERN),
        gxe.ExpectColumnValuesToBeInSet(column="currency", value_set=sorted(known_currencies)),
        gxe.ExpectColumnValuesToMatchRegex(column="country", regex=COUNTRY_PATTERN),
        gxe.ExpectColumnValuesToBeInSet(column="channel", value_set=list(CHANNELS)),
        gxe.ExpectColumnValuesToBeInSet(column=LABEL, value_set=[0, 1]),
        gxe.ExpectColumnMaxToBeBetween(column="event_time", max_value=as_of.replace(tzinfo=None)),
    ]


def run_suite(df: DataFrame, expectations: list, gx_root: Path, asset_name: str) -> SuiteOutcome:
    """Validate ``df`` against ``expectations`` in a file-backed GX project at ``gx_root``; build Data Docs."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(gx_root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_or_update_spark(name="bank")
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
            result_format={"result_format": "SUMMARY"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": df})
    failures: dict[str, int] = {}
    for run in result.run_results.values():
        for outcome in run.results:
            if not outcome.success:
                config = outcome.expectation_config
                key = f"{config.type}({config.kwargs.get('column', '')})"
                failures[key] = int(outcome.result.get("unexpected_count") or 0)
    sites = context.get_docs_sites_urls()
    return SuiteOutcome(
        success=bool(result.success), failures=failures, data_docs=sites[0]["site_url"] if sites else None
    )
