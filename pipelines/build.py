"""The bank-side data path as one call: raw input -> validation gate -> features + contract.

One Spark job reads the input, splits it (the gate's rules) and writes the valid rows with their
features as one dataset, ``features/``: the keys and label, every valid column as the gate let it
through, then the contract's feature columns. There is no separate ``valid/`` copy to write and
read back: the gate reconciles its row counts against ``features/`` and runs the GX suite on the
valid columns as written there. ``fedfraud validate`` (the gate alone) still writes ``valid/``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from pipelines.config import PipelineConfig
from pipelines.feature_contract import feature_contract
from pipelines.features import build_features, feature_types
from pipelines.io import write_json, write_parquet
from pipelines.validation import Gate

VALIDATION_DIR, FEATURES_DIR, CONTRACT_FILE = "validation", "features", "feature_contract.json"


def feature_write_options(config: PipelineConfig) -> dict[str, str]:
    """Parquet writer options for ``features/``: no dictionary pages for the continuous columns, whose
    values rarely repeat (the writer would build a dictionary, then fall back to plain pages)."""
    continuous = [name for name, dtype in feature_types(config.features).items() if dtype == "float"]
    return {f"parquet.enable.dictionary#{name}": "false" for name in continuous}


def build_bank_features(
    spark: SparkSession,
    input_path: str | Path,
    out_dir: str | Path,
    config: PipelineConfig,
    as_of: datetime | None = None,
) -> dict[str, Any]:
    """Gate ``input_path`` (quarantine, report and Data Docs in ``out_dir/validation``) and write its valid
    rows with their features to ``out_dir/features`` in one job, then the contract.

    Returns the validation report with the feature contract and features path added.
    """
    out = Path(out_dir)
    with Gate(spark, input_path, out / VALIDATION_DIR, config, as_of) as gate:
        features = build_features(gate.valid, config.features, keep=tuple(gate.valid.columns))
        write_parquet(features, out / FEATURES_DIR, feature_write_options(config))
        report = gate.finish(out / FEATURES_DIR)
    contract = feature_contract(config.features)
    write_json(contract, out / CONTRACT_FILE)
    return {**report, "features_path": str(out / FEATURES_DIR), "feature_contract_hash": contract["hash"]}
