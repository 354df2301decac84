"""Batch scoring at the bank: every input row gets a score, or a null score if quarantined.

The registered model is read as JSON bytes and validated and rebuilt against the bank's own
feature contract and policy (``fedfraud.model_guard``) before XGBoost loads it."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bank_node.dataset import feature_rows
from bank_node.policy import TrainingPolicy
from bank_node.training import dmatrix
from fedfraud import model_json
from fedfraud.model_guard import parse_received_model
from fedfraud.protocol import Tag
from pipelines.build import CONTRACT_FILE, FEATURES_DIR, VALIDATION_DIR, build_bank_features
from pipelines.config import PipelineConfig
from pipelines.feature_contract import load_contract, require_same_contract
from pipelines.io import write_bytes
from pipelines.validation import QUARANTINE_DIR

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def resolve_model(model_uri: str, tracking_uri: str | None, max_bytes: int) -> tuple[bytes, dict[str, str]]:
    """A registered model (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``) as JSON bytes, not
    loaded, and its tags."""
    from mlflow import MlflowClient

    from fedfraud.logged_model import download_model_json

    match = _MODEL_URI.match(model_uri)
    if not match:
        raise ValueError(f"model URI must look like models:/NAME/VERSION or models:/NAME@ALIAS, got {model_uri!r}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if match["alias"]:
        version = client.get_model_version_by_alias(match["name"], match["alias"])
    else:
        version = client.get_model_version(match["name"], match["version"])
    # Read from the version's own artifact location: no global tracking URI is set or changed.
    location = client.get_model_version_download_uri(match["name"], version.version)
    return download_model_json(location, max_bytes, tracking_uri), dict(version.tags)


def write_scores(frame: pd.DataFrame, output: Path) -> None:
    """Write ``transaction_id, score`` Parquet atomically (temp file, then rename)."""
    schema = pa.schema([("transaction_id", pa.string()), ("score", pa.float64())])
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), buffer)
    write_bytes(buffer.getvalue().to_pybytes(), output)


def score_transactions(spark, model_uri: str, input_path: str | Path, output_path: str | Path,
                       config: PipelineConfig, tracking_uri: str | None = None,
                       policy: TrainingPolicy | None = None) -> dict[str, int]:
    """Validate and build features over the whole input (history included), score every valid row.

    Quarantined rows are listed with a null score, so the output has one row per input row. The
    model must pass ``model_guard`` under the bank's ``policy`` (a ``ModelRefused`` names why not).
    """
    limits = (policy or TrainingPolicy()).received_limits()
    model_bytes, tags = resolve_model(model_uri, tracking_uri, limits.max_bytes)
    with tempfile.TemporaryDirectory(prefix="fedfraud-score-") as tmp:
        work = Path(tmp)
        build_bank_features(spark, input_path, work, config)
        contract = load_contract(work / CONTRACT_FILE)
        expected = tags.get(Tag.FEATURE_CONTRACT_HASH)
        if expected:
            require_same_contract(expected, contract, "this bank")
        booster = model_json.to_booster(parse_received_model(model_bytes, limits, contract["names"]))
        ids, X = feature_rows(work / FEATURES_DIR, contract["names"])
        scores = booster.predict(dmatrix(X, None, contract["names"]))
        quarantined = pq.read_table(str(work / VALIDATION_DIR / QUARANTINE_DIR), columns=["transaction_id"]).to_pandas()
    scored = pd.DataFrame({"transaction_id": ids.to_pandas(), "score": scores.astype(np.float64)})
    unscored = pd.DataFrame({"transaction_id": quarantined["transaction_id"], "score": np.nan})
    write_scores(pd.concat([scored, unscored], ignore_index=True), Path(output_path))
    return {"scored": len(scored), "quarantined": len(unscored)}
