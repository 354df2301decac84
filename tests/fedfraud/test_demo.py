"""`fedfraud demo` (what `make demo` runs) end to end, on a small consortium."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from fedfraud.cli import app

pytestmark = pytest.mark.slow


def test_demo_runs_and_registers_a_champion_or_says_why_not(spark, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the demo's default: sqlite in its work dir
    result = CliRunner().invoke(
        app, ["demo", "--work-dir", str(tmp_path), "--banks", "4", "--rows", "40000", "--rounds", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "local-only" in result.output and "histogram" in result.output and "mlflow ui" in result.output
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions("name='fedfraud-demo'")
    assert len(versions) == 2  # bagging and histogram, 1 round each
    # The champion gate (issue 11): a first champion must beat the best single-bank local model; one round
    # on 30,000 rows may not, and then every version stays challenger with the gate's reason.
    champions = [v for v in versions if "champion" in client.get_model_version("fedfraud-demo", v.version).aliases]
    held_back = [v for v in versions if v.tags.get("fedfraud.promotion_reason") == "below_best_local_model"]
    assert len(champions) == 1 or len(held_back) == 2, [(v.version, v.aliases, v.tags) for v in versions]
