"""Shared fixtures: one real SparkSession per test session, small contract-shaped data."""

from __future__ import annotations

import json
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


def four_toy_banks(toy_banks) -> dict:
    """``toy_banks`` plus a fourth, ``delta`` (masked sums need three banks that answer, and one may drop)."""
    import numpy as np

    rng = np.random.default_rng(3)
    X = rng.normal(size=(450, 6)).astype(np.float32)
    y = (rng.random(450) < 1 / (1 + np.exp(-(2.0 * X[:, 3] - 3.0)))).astype(np.int32)
    return {**toy_banks, "delta": (X, y)}


def with_toy_data(node, X, y):
    """A ``BankNode`` on toy rows without Spark: the first 300 train, the rest are its holdout."""
    from bank_node.dataset import BankDataset

    node.__dict__["data"] = BankDataset(TOY_FEATURES, X[:300], y[:300], X[300:], y[300:], None)
    node.__dict__["contract"] = {"hash": "h", "names": TOY_FEATURES}
    node._require_training_allowed = lambda: None
    return node


def masked_toy_nodes(data: dict, root, banks: list[str], **node_options) -> dict:
    """A ``BankNode`` per bank on its toy rows, each with the consortium's masking credentials (issued under
    ``root/pki``); ``node_options(bank)`` values that are callables are asked per bank."""
    from aggregator.drivers.embedded import embedded_credentials
    from bank_node.node import BankNode

    credentials = embedded_credentials(root / "pki", banks)
    return {bank: with_toy_data(BankNode(bank, root / bank, root / "banks" / bank, config=None,
                                         secagg=credentials[bank],
                                         **{k: v(bank) if callable(v) else v for k, v in node_options.items()}),
                                *data[bank]) for bank in banks}


def toy_counts(nodes, banks) -> dict:
    """What each toy bank's summary would declare (row counts only), as a plan records it."""
    return {b: {"train_rows": len(nodes[b].data.y_train), "holdout_rows": len(nodes[b].data.y_holdout)}
            for b in banks}


def toy_label_sums(nodes, banks) -> dict:
    """The banks' label counts as the masked planning counts would sum them, as a settled plan records them."""
    return {"banks": sorted(banks), "sessions": ["fed0/plan/test"],
            "positives": sum(int(nodes[b].data.y_train.sum()) for b in banks),
            "holdout_positives": sum(int(nodes[b].data.y_holdout.sum()) for b in banks)}


def assert_masked(words, plain) -> None:
    """``words`` (uint64) look like noise next to the ``plain`` words they mask: no word left as its plain word,
    balanced bits and no correlation with the plain values, each within six standard deviations of what uniformly
    random words give (the bounds widen with fewer words, so a short vector cannot fail by chance)."""
    import numpy as np

    words, plain = np.asarray(words, dtype=np.uint64), np.asarray(plain).astype(np.uint64)
    assert words.shape == plain.shape and words.size > 0
    assert not np.any(words == plain), "a word went out unmasked"
    bits = np.unpackbits(words.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 6 * 0.5 / np.sqrt(bits.size), bits.mean()
    if words.size > 2 and np.ptp(plain.view(np.int64)) > 0:
        r = np.corrcoef(words.astype(np.float64), plain.view(np.int64).astype(np.float64))[0, 1]
        assert abs(r) < 6 / np.sqrt(words.size), (r, words.size)


def toy_cyclic_federation(root, nodes, banks, settings, rounds: int):
    """(plan, aggregator workspace) of a settled cyclic federation over the toy banks, their summaries written."""
    from aggregator.protocol.plan import Plan
    from aggregator.protocol.workspace import Workspace
    from fedfraud.settings import consortium_params

    counts = toy_counts(nodes, banks)
    plan = Plan(model_name="m", strategy="cyclic", rounds=rounds, seed=1, settings=settings, contract_hash="h",
                feature_names=TOY_FEATURES, banks=banks, excluded={},
                consortium_params=consortium_params(settings, 50, 500), federation_id="fed0", counts=counts,
                label_sums=toy_label_sums(nodes, banks))
    ws = Workspace(root / "aggregator", "m")
    for bank in banks:
        ws.write_json({"counts": counts[bank]}, ws.summary_path(bank))
    return plan, ws


def _e2e_settings():
    from fedfraud.settings import FederationSettings

    return FederationSettings(trees_per_round=15)


E2E_SETTINGS = _e2e_settings()


@pytest.fixture(scope="session")
def consortium(spark, config, tmp_path_factory):
    """Four small generated banks, validated and featurised once for every end-to-end test."""
    from aggregator.drivers.embedded import prepare_consortium
    from pipelines.synthetic import write_banks

    root = tmp_path_factory.mktemp("consortium")
    paths = write_banks(root / "raw", n_banks=4, total_rows=160_000, seed=5)
    return prepare_consortium(paths, root, config, E2E_SETTINGS, on_progress=lambda m: None)


@pytest.fixture(scope="session")
def uri(consortium):
    return f"sqlite:///{consortium.work_dir}/mlflow.db"


# ---- the aggregator service ------------------------------------------------------------------

SERVICE_BANKS = ("alpha", "beta", "gamma")


def make_coordinator(tmp_path: Path, **config):
    """The aggregator service's coordinator on a fresh sqlite state (no HTTP, no TLS needed)."""
    from aggregator.service.config import ServiceConfig, TLSFiles
    from aggregator.service.coordinator import Coordinator

    tls = TLSFiles(tmp_path / "ca.crt", tmp_path / "cert.pem", tmp_path / "key.pem")
    config = {"banks": SERVICE_BANKS, **config}
    return Coordinator(ServiceConfig(tls=tls, database_url=f"sqlite:///{tmp_path / 'state.db'}",
                                     tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", work_dir=tmp_path / "agg",
                                     **config))


def federation_request(**overrides):
    return {"model_name": "m", "strategy": "bagging", "rounds": 2, "seed": 0, "min_banks": 2,
            "trees_per_round": 5, "banks": list(SERVICE_BANKS), **overrides}


def bank_summary(bank: str, **overrides) -> bytes:
    """A bank's summary message as its agent would upload it."""
    from pipelines.config import load_config
    from pipelines.feature_contract import feature_contract

    body = {"bank": bank, "contract_hash": feature_contract(load_config().features)["hash"],
            "counts": {"train_rows": 7000, "holdout_rows": 2040},
            "training_allowed": True, "decline_reasons": [], "data_window": ["2026-01-01", "2026-03-01"],
            "holdout_start": "2026-02-20", **overrides}
    return json.dumps(body).encode()


class CountingBank:
    """A fake bank of the service's tests that answers round 0's masked planning counts (key offers, masked
    counts) with a consortium certificate, for the counts its ``bank_summary`` stands for."""

    def __init__(self, bank: str, credentials, folder: Path, positives: int = 40, holdout_positives: int = 12):
        from types import SimpleNamespace

        from bank_node.masked_evaluation import SessionStore

        self.bank, self.secagg, self.secagg_store = bank, credentials, SessionStore(folder, bank)
        self.data = SimpleNamespace(counts=lambda: {"train_rows": 7000, "positives": positives,
                                                    "negatives": 7000 - positives, "holdout_rows": 2040,
                                                    "holdout_positives": holdout_positives})

    def secagg_credentials(self):
        return self.secagg

    def offer(self, request_bytes: bytes) -> bytes:
        from bank_node.masked_evaluation import make_offer

        return make_offer(self, request_bytes)

    def masked_counts(self, task_bytes: bytes) -> bytes:
        from bank_node.masked_counts import masked_counts

        return masked_counts(self, task_bytes)


def settle_counts(c, key: str, tmp_path: Path, banks=SERVICE_BANKS, limit_s: float = 120) -> dict:
    """Answer the service's round 0 (the masked planning counts) as ``CountingBank``s; the federation's status
    once it is planned or failed."""
    import time

    from aggregator.drivers.embedded import embedded_credentials
    from aggregator.protocol.state import node_call

    credentials = embedded_credentials(tmp_path / "fake-pki", list(banks))
    fakes = {b: CountingBank(b, credentials[b], tmp_path / "fake-banks" / b) for b in banks}
    deadline = time.monotonic() + limit_s
    while c.federation_status(key)["state"] in ("counting", "cross-evaluating"):
        assert time.monotonic() < deadline, "round 0 did not finish"
        for bank, fake in fakes.items():
            while (task := c.next_task(bank)) is not None:
                data = c.task_input(bank, task["id"]) if task["has_input"] else b""
                c.accept_result(bank, task["id"], node_call(fake, task["kind"])(data))
        time.sleep(0.05)
    return c.federation_status(key)


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
