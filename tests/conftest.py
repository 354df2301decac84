"""Shared fixtures: one real SparkSession per test session, small contract-shaped data."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("FEDFRAUD_SHUFFLE_PARTITIONS", "2")

from pipelines.contract import RAW_SCHEMA  # noqa: E402


@pytest.fixture(scope="session")
def spark():
    from pipelines.spark import get_spark

    session = get_spark("fedfraud-tests", cores="2")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def config():
    from pipelines.config import load_config

    return load_config()


def ts(text: str) -> datetime:
    """Naive UTC timestamp from 'YYYY-MM-DD HH:MM:SS'."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S")


def txn(tid, when, account="a1", amount=10.0, currency="EUR", merchant="m1", category="grocery",
        channel="card_present", country="DE", device="d1", is_fraud=0):
    """One raw transaction in contract column order."""
    return (tid, ts(when) if isinstance(when, str) else when, account, amount, currency, merchant,
            category, channel, country, device, is_fraud)


@pytest.fixture(scope="session")
def make_raw(spark):
    """Build a contract-typed DataFrame from ``txn`` tuples."""

    def build(rows):
        return spark.createDataFrame(rows, RAW_SCHEMA)

    return build


@pytest.fixture(scope="session")
def toy_banks():
    """Three tiny numeric 'banks' (X, y) sharing 6 features, for training and aggregation tests."""
    import numpy as np

    rng = np.random.default_rng(11)
    banks = {}
    for index, bank in enumerate(["alpha", "beta", "gamma"]):
        X = rng.normal(size=(400 + 100 * index, 6)).astype(np.float32)
        logit = 2.0 * X[:, index] - 3.0 + 0.5 * X[:, 5]
        y = (rng.random(len(X)) < 1 / (1 + np.exp(-logit))).astype(np.int32)
        banks[bank] = (X, y)
    return banks


TOY_FEATURES = [f"x{i}" for i in range(6)]


def _e2e_settings():
    from aggregator.settings import FederationSettings

    return FederationSettings(trees_per_round=15)


E2E_SETTINGS = _e2e_settings()


@pytest.fixture(scope="session")
def consortium(spark, config, tmp_path_factory):
    """Four small generated banks, validated and featurised once for every end-to-end test."""
    from aggregator.runner import prepare_consortium
    from pipelines.synthetic import write_banks

    root = tmp_path_factory.mktemp("consortium")
    paths = write_banks(root / "raw", n_banks=4, total_rows=160_000, seed=5)
    return prepare_consortium(paths, root, config, E2E_SETTINGS, on_progress=lambda m: None)


@pytest.fixture(scope="session")
def uri(consortium):
    return f"sqlite:///{consortium.work_dir}/mlflow.db"


# ---- Airflow: its own AIRFLOW_HOME, a migrated sqlite metadata DB, short retries -------------

DAGS = Path(__file__).resolve().parents[1] / "dags"


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "FEDFRAUD_RETRY_DELAY_SECONDS": "1",
    }
    os.environ.update(env)
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                   capture_output=True, env={**os.environ, **env})
    return home


@pytest.fixture(scope="session")
def dagbag(airflow_home):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))
