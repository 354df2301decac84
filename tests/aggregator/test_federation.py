"""End to end on small generated banks: real Spark + GX preparation, real XGBoost, real MLflow."""

from __future__ import annotations

import dataclasses

import pytest
from mlflow import MlflowClient

from aggregator.drivers.embedded import federate, run_federation
from aggregator.protocol.errors import RoundFailed
from aggregator.tracking import FederationTracker
from conftest import E2E_SETTINGS as SETTINGS

pytestmark = pytest.mark.slow
ROUNDS = 3


@pytest.fixture(scope="session")
def local_and_bagging(consortium, uri):
    local = federate(consortium, "local", ROUNDS, "e2e", uri, SETTINGS, seed=1, on_progress=lambda m: None)
    bagging = federate(consortium, "bagging", ROUNDS, "e2e", uri, SETTINGS, seed=1, on_progress=lambda m: None)[""]
    return local, bagging


def versions(uri, name):
    return MlflowClient(uri, registry_uri=uri).search_model_versions(f"name='{name}'")


def test_federated_model_beats_small_banks_alone(consortium, local_and_bagging):
    local, bagging = local_and_bagging
    small = sorted(consortium.nodes, key=lambda b: consortium.nodes[b].data.counts()["train_rows"])[:2]
    alone = [local[b].evaluation.per_bank[b]["auprc"] for b in small]
    together = [bagging.evaluation.per_bank[b]["auprc"] for b in small]
    assert all(t >= a for t, a in zip(together, alone)), f"{small}: federated {together} vs local-only {alone}"
    assert sum(together) > sum(alone), f"{small}: federated {together} vs local-only {alone}"


def test_every_round_registered_with_lineage(consortium, uri, local_and_bagging):
    _, bagging = local_and_bagging
    registered = {int(v.version): v for v in versions(uri, "e2e")}
    assert len(registered) == ROUNDS and bagging.model_uri == f"models:/e2e/{ROUNDS}"
    tags = registered[ROUNDS].tags
    assert tags["fedfraud.round"] == str(ROUNDS) and tags["fedfraud.strategy"] == "bagging"
    assert tags["fedfraud.participating_banks"] == ",".join(sorted(consortium.nodes))
    assert tags["fedfraud.feature_contract_hash"] == consortium.contract["hash"]
    assert set(eval(tags["fedfraud.data_windows"].replace("null", "None"))) == set(consortium.nodes)
    client = MlflowClient(uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("e2e", "challenger").version) == str(ROUNDS)
    assert client.get_model_version_by_alias("e2e", "champion") is not None


def test_local_baseline_registers_one_model_per_bank(consortium, uri, local_and_bagging):
    local, _ = local_and_bagging
    assert set(local) == set(consortium.nodes)
    for bank, result in local.items():
        assert result.model_uri == f"models:/e2e-{bank}/1" and len(versions(uri, f"e2e-{bank}")) == 1


def test_retrying_registers_no_second_version(consortium, uri, local_and_bagging):
    _, first = local_and_bagging
    again = federate(consortium, "bagging", ROUNDS, "e2e", uri, SETTINGS, seed=1, on_progress=lambda m: None)[""]
    assert again.model_uri == first.model_uri and len(versions(uri, "e2e")) == ROUNDS


class FailingNode:
    """A bank whose training call fails (a node dead by round 1, seen from the aggregator); it answered round 0
    (its summary, the masked planning counts, cross-evaluation) and answers everything else."""

    def __init__(self, node):
        self.node, self.bank = node, node.bank

    def __getattr__(self, name):
        return getattr(self.node, name)

    def train(self, task_bytes):
        raise ConnectionError(f"{self.bank} is unreachable")


def test_quorum_holds_without_a_failed_bank(consortium, uri):
    nodes = dict(consortium.nodes)
    lost = sorted(nodes)[0]
    nodes[lost] = FailingNode(nodes[lost])
    settings = dataclasses.replace(SETTINGS, trees_per_round=5, min_banks=len(nodes) - 1)
    result = run_federation(nodes, "bagging", 1, FederationTracker(uri, "e2e-quorum"), consortium.contract, settings)
    [version] = versions(uri, "e2e-quorum")
    assert version.tags["fedfraud.rejected_banks"] == lost and lost not in version.tags["fedfraud.participating_banks"]
    assert result.rejections[0]["check"] == "bank_failed"


def test_below_quorum_registers_nothing_and_keeps_champion(consortium, uri, local_and_bagging):
    client = MlflowClient(uri, registry_uri=uri)
    champion_before = client.get_model_version_by_alias("e2e", "champion").version
    nodes = {b: FailingNode(n) if i < 2 else n for i, (b, n) in enumerate(sorted(consortium.nodes.items()))}
    settings = dataclasses.replace(SETTINGS, trees_per_round=5, min_banks=3)
    with pytest.raises(RoundFailed, match="quorum is 3"):
        run_federation(nodes, "bagging", 1, FederationTracker(uri, "e2e"), consortium.contract, settings, seed=99)
    assert len(versions(uri, "e2e")) == ROUNDS
    assert client.get_model_version_by_alias("e2e", "champion").version == champion_before


def test_a_bank_with_another_contract_is_excluded_by_name(consortium, uri):
    class OtherContract(FailingNode):
        def summary(self):
            return {**self.node.summary(), "contract_hash": "f" * 64}

        def train(self, task_bytes):
            return self.node.train(task_bytes)

    nodes = dict(consortium.nodes)
    odd = sorted(nodes)[-1]
    nodes[odd] = OtherContract(nodes[odd])
    settings = dataclasses.replace(SETTINGS, trees_per_round=3)
    result = run_federation(nodes, "cyclic", 1, FederationTracker(uri, "e2e-contract"), consortium.contract, settings)
    assert "feature contract" in result.excluded[odd] and odd not in result.evaluation.per_bank
