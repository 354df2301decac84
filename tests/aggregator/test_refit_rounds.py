"""Leaf refit end to end: real banks (Spark-built features) answer the refit's masked sums through the embedded
driver; the refit round registers the cut, refitted model, records it in compaction.json and MLflow, and the
rounds before it are untouched."""

from __future__ import annotations

import dataclasses
import json

import pytest
from mlflow import MlflowClient

from aggregator.drivers.embedded import run_federation
from aggregator.tracking import FederationTracker
from conftest import E2E_SETTINGS
from fedfraud import model_json

pytestmark = pytest.mark.slow


def test_the_refit_round_registers_the_cut_refitted_model(consortium, uri, tmp_path):
    settings = dataclasses.replace(E2E_SETTINGS, trees_per_round=4, crossval=False, compaction_refit=True,
                                   compaction_refit_every=2, compaction_refit_keep=0.5, compaction_refit_steps=3)
    name = "e2e-refit"
    result = run_federation(consortium.nodes, "bagging", 2, FederationTracker(uri, name), consortium.contract,
                            settings, seed=2, work_dir=tmp_path)
    root, banks = tmp_path / "federations" / name, len(consortium.nodes)
    first = json.loads((root / "round-1" / "compaction.json").read_bytes())
    assert "refit" not in first and first["trees_after"] == 4 * banks  # not a refit round; provenance kept
    assert len(json.loads((root / "round-1" / "provenance.json").read_bytes())) == 4 * banks
    record = json.loads((root / "round-2" / "compaction.json").read_bytes())
    refit = record["refit"]
    assert refit["trees_before"] == 8 * banks and refit["trees_after"] == 4 * banks and refit["step"] == 3
    assert refit["banks"] == sorted(consortium.nodes) and refit["loss"][-1] < refit["loss"][0]
    model = json.loads((root / "round-2" / "model.json").read_bytes())
    assert len(model_json.trees(model)) == 4 * banks
    assert json.loads((root / "round-2" / "registered.json").read_bytes())["compaction"] == record
    assert result.version is not None
    client = MlflowClient(uri)
    [round_run] = client.search_runs([client.get_experiment_by_name("fedfraud").experiment_id],
                                     f"tags.`fedfraud.round` = '2' and tags.`fedfraud.federation_id` = "
                                     f"'{result.federation_id}'")
    assert round_run.data.metrics["compaction.refit_trees_after"] == 4 * banks
    for bank in consortium.nodes:  # the refit's exchanges crossed the in-process boundary and were counted
        answer = root / "round-2" / "refit" / "step-2" / f"{bank}.answer.json"
        counted = json.loads((root / "round-2" / "traffic" / f"refit__step-2__{bank}.answer.json").read_bytes())
        assert counted["sent"] == answer.stat().st_size
