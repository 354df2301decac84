"""A real dag.test() of the federated round on the small generated banks, with sqlite MLflow."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def run(dagbag, **conf):
    dag = dagbag.get_dag("federated_round")
    return dag.test(run_conf=conf)


def conf(consortium, model, **extra):
    """Every param given: dag.test() runs tasks in this process, where a run's conf stays in the
    DAG's params for the runs after it (tests/aggregator runs this DAG in networked mode)."""
    banks = {b: str(n.raw_path) for b, n in consortium.nodes.items()}
    return {"banks": banks, "model_name": model, "rounds": 2, "min_banks": 2, "trees_per_round": 5,
            "mode": "embedded", "work_dir": str(consortium.work_dir), "crossval": True, "champion_gate": True,
            **extra}


def versions(uri, name):
    return sorted(int(v.version) for v in MlflowClient(uri, registry_uri=uri).search_model_versions(f"name='{name}'"))


@pytest.fixture(scope="module")
def first_run(dagbag, consortium, uri):
    return run(dagbag, **conf(consortium, "af"))


def test_rounds_register_versions_with_tags_and_alias(first_run, consortium, uri):
    assert first_run.state == "success"
    assert versions(uri, "af") == [1, 2]
    client = MlflowClient(uri, registry_uri=uri)
    latest = client.get_model_version("af", "2")
    assert latest.tags["fedfraud.round"] == "2" and latest.tags["fedfraud.strategy"] == "bagging"
    assert latest.tags["fedfraud.participating_banks"] == ",".join(sorted(consortium.nodes))
    assert str(client.get_model_version_by_alias("af", "challenger").version) == "2"


def test_rerun_registers_no_second_version(first_run, dagbag, consortium, uri):
    again = run(dagbag, **conf(consortium, "af"))
    assert again.state == "success" and versions(uri, "af") == [1, 2]


def test_failed_bank_does_not_sink_the_round(dagbag, consortium, uri, tmp_path):
    broken = tmp_path / "broken.csv"
    broken.write_text("transaction_id,amount\nx,1\n")  # refused by the contract at preparation
    settings = conf(consortium, "af-quorum", rounds=1, min_banks=3, strategy="cyclic")
    settings["banks"]["zz_broken"] = str(broken)
    result = run(dagbag, **settings)
    assert result.state == "success" and versions(uri, "af-quorum") == [1]
    tags = MlflowClient(uri, registry_uri=uri).get_model_version("af-quorum", "1").tags
    assert "zz_broken" not in tags["fedfraud.participating_banks"]


def test_below_quorum_fails_and_registers_nothing(first_run, dagbag, consortium, uri, tmp_path):
    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("af", "champion").version
    broken = tmp_path / "broken.csv"
    broken.write_text("transaction_id,amount\nx,1\n")
    settings = conf(consortium, "af", min_banks=len(consortium.nodes) + 1, seed=5)
    settings["banks"]["zz_broken"] = str(broken)
    result = run(dagbag, **settings)
    assert result.state == "failed"
    assert versions(uri, "af") == [1, 2]
    assert client.get_model_version_by_alias("af", "champion").version == champion


def test_bank_features_and_scoring_dags(first_run, dagbag, consortium, uri, tmp_path):
    banks = {b: str(n.raw_path) for b, n in consortium.nodes.items()}
    built = dagbag.get_dag("bank_features").test(run_conf={"banks": banks, "work_dir": str(consortium.work_dir)})
    assert built.state == "success"
    bank = sorted(consortium.nodes)[0]
    out = tmp_path / "scores.parquet"
    scored = dagbag.get_dag("score_transactions").test(run_conf={
        "model": "models:/af@champion", "input": banks[bank], "output": str(out), "work_dir": str(consortium.work_dir)})
    assert scored.state == "success"
    import pyarrow.parquet as pq

    assert pq.read_metadata(out).num_rows == consortium.nodes[bank].report["input_rows"]
