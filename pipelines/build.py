"""The bank-side data path as one call: raw input -> validation gate -> features + contract."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from pipelines.config import PipelineConfig
from pipelines.feature_contract import feature_contract
from pipelines.features import build_features
from pipelines.io import write_json, write_parquet
from pipelines.validation import VALID_DIR, validate

VALIDATION_DIR, FEATURES_DIR, CONTRACT_FILE = "validation", "features", "feature_contract.json"


def build_bank_features(
    spark: SparkSession,
    input_path: str | Path,
    out_dir: str | Path,
    config: PipelineConfig,
    as_of: datetime | None = None,
) -> dict[str, Any]:
    """Validate ``input_path`` into ``out_dir/validation`` then write ``out_dir/features`` and the contract.

    Returns the validation report with the feature contract and features path added.
    """
    out = Path(out_dir)
    report = validate(spark, input_path, out / VALIDATION_DIR, config, as_of=as_of)
    valid = spark.read.parquet(str(out / VALIDATION_DIR / VALID_DIR))
    write_parquet(build_features(valid, config.features), out / FEATURES_DIR)
    contract = feature_contract(config.features)
    write_json(contract, out / CONTRACT_FILE)
    return {**report, "features_path": str(out / FEATURES_DIR), "feature_contract_hash": contract["hash"]}
