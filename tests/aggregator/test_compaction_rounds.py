"""Compaction end to end: real banks score the variants in the accept phase; the round registers
the compacted model, the one whose pooled AUPRC the banks reported for the chosen variant."""

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
TOLERANCE = 0.02


def test_bagging_rounds_register_the_compacted_model_within_tolerance(consortium, uri, tmp_path):
    settings = dataclasses.replace(E2E_SETTINGS, trees_per_round=5, crossval=False, compaction=True,
                                   compaction_tolerance=TOLERANCE)
    name = "e2e-compaction"
    result = run_federation(consortium.nodes, "bagging", 3, FederationTracker(uri, name), consortium.contract,
                            settings, seed=2, work_dir=tmp_path)
    root = tmp_path / "federations" / name
    first = json.loads((root / "round-1" / "compaction.json").read_bytes())
    assert first["trees_before"] == first["trees_after"] and "answered" not in first  # nothing earlier: not asked
    assert first["budget"] and first["spent"] == 0.0
    records = {n: json.loads((root / f"round-{n}" / "compaction.json").read_bytes()) for n in (2, 3)}
    pooled = {row["round"]: row["pooled.auprc"] for row in result.history}
    for n, record in records.items():
        model = json.loads((root / f"round-{n}" / "model.json").read_bytes())
        assert len(model_json.trees(model)) == record["trees_after"]
        assert record["answered"] == sorted(consortium.nodes) and record["faults"] == []
        chosen = record["chosen"]
        assert record["pooled"][chosen] == pytest.approx(pooled[n], abs=1e-3)  # what the banks then evaluated
        assert record["pooled"]["full"] - record["pooled"][chosen] <= TOLERANCE
        # the budget: a round may lose what the earlier rounds left of the federation's tolerance
        spent_before = (first if n == 2 else records[n - 1])["spent"]
        assert record["allowance"] == pytest.approx(max(0.0, TOLERANCE - spent_before))
        assert record["worst_loss"].get(chosen, 0.0) <= record["allowance"]
        assert record["spent"] == pytest.approx(spent_before + max(0.0, record["worst_loss"].get(chosen, 0.0)))
        origins = json.loads((root / f"round-{n}" / "provenance.json").read_bytes())
        assert len(origins) == record["trees_after"] and n in {o[0] for o in origins} <= set(range(1, n + 1))
    assert any(r["trees_after"] < r["trees_before"] for r in records.values()), records
    client = MlflowClient(uri)
    [round_run] = client.search_runs([client.get_experiment_by_name("fedfraud").experiment_id],
                                     f"tags.`fedfraud.round` = '3' and tags.`fedfraud.federation_id` = "
                                     f"'{result.federation_id}'")
    assert round_run.data.metrics["compaction.trees_after"] == records[3]["trees_after"]
    report = json.loads((root / "round-3" / "registered.json").read_bytes())
    assert report["compaction"] == records[3]
    size = lambda *parts: (root / "round-3" / "/".join(parts)).stat().st_size  # noqa: E731
    for bank in consortium.nodes:  # bytes on the wire: the exchanges' payloads, counted where they crossed
        train = json.loads((root / "round-3" / "traffic" / f"updates__{bank}.json").read_bytes())
        assert train == {"bank": bank, "received": size("tasks", f"{bank}.json"),
                         "sent": size("updates", f"{bank}.json")}
        counted = report["bytes"][bank]
        assert counted["sent"] >= train["sent"] + size("compaction", "answers", f"{bank}.json")
        assert counted["received"] >= train["received"] + size("compaction", "question.json") + size("model.json")
        assert round_run.data.metrics[f"bytes.{bank}.sent"] == counted["sent"]
        assert round_run.data.metrics[f"bytes.{bank}.received"] == counted["received"]
