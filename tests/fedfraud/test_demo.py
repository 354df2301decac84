"""`fedfraud demo` (what `make demo` runs) end to end, on a small consortium."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from fedfraud.cli import app

pytestmark = pytest.mark.slow


def test_demo_runs_and_registers_a_champion(spark, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the demo's default: sqlite in its work dir
    result = CliRunner().invoke(
        app, ["demo", "--work-dir", str(tmp_path), "--banks", "3", "--rows", "30000", "--rounds", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "local-only" in result.output and "histogram" in result.output and "mlflow ui" in result.output
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    assert len(client.search_model_versions("name='fedfraud-demo'")) == 2  # bagging and histogram, 1 round each
    assert client.get_model_version_by_alias("fedfraud-demo", "champion") is not None
