"""FederationTracker against real sqlite MLflow stores (one shared store; new stores are slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import xgboost

from aggregator.tracking import (
    FederationTracker,
    default_tracking_uri,
    render_report_markdown,
)

FEATURES = ["amount", "hour", "velocity", "merchant_risk", "country_risk"]


def train_booster(seed: int, rounds: int = 3) -> xgboost.Booster:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] + 0.5 * x[:, 2] + rng.normal(scale=0.5, size=200) > 0).astype(int)
    return xgboost.train(
        {"objective": "binary:logistic", "max_depth": 2, "seed": seed},
        xgboost.DMatrix(x, label=y, feature_names=FEATURES),
        num_boost_round=rounds,
    )


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> FederationTracker:
    return FederationTracker(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}", "fraud-model")


@pytest.fixture(scope="module")
def booster() -> xgboost.Booster:
    return train_booster(seed=0)


@pytest.fixture(scope="module")
def example() -> pd.DataFrame:
    return pd.DataFrame(np.random.default_rng(1).normal(size=(5, 5)), columns=[f"f{i}" for i in range(5)])


def other_model(tracker: FederationTracker, name: str) -> FederationTracker:
    """Another tracker on the same (already migrated) store, with its own registered model."""
    return FederationTracker(tracker.tracking_uri, name)


def parent_runs(tracker: FederationTracker, federation_id: str):
    return tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.`fedfraud.federation_id` = '{federation_id}' and tags.`fedfraud.run_kind` = 'federation'",
    )


def test_registration_happens_once_per_round(tracker, booster, example):
    with tracker.federation("fed-register", {"rounds": 2}, {}):
        with tracker.round(1) as run_1:
            first = tracker.register_round_model(booster, "fed-register", 1, example, {"bank_count": "3"})
            again = tracker.register_round_model(booster, "fed-register", 1, example, {"bank_count": "3"})
        with tracker.round(2) as run_2:
            second = tracker.register_round_model(booster, "fed-register", 2, example, {"bank_count": "3"})
    # a retry after the federation ended returns the existing version without any active run
    assert tracker.register_round_model(booster, "fed-register", 1, example, {}) == first

    assert again == first and second == first + 1
    versions = tracker.client.search_model_versions("name = 'fraud-model'")
    assert sorted(int(v.version) for v in versions) == [first, second]
    logged = tracker.client.search_logged_models([tracker.experiment_id], f"source_run_id = '{run_1}'")
    assert len(logged) == 1
    assert tracker.version_tags(first) == {
        "bank_count": "3",
        "fedfraud.round_key": "fed-register:1",
        "fedfraud.run_id": run_1,
    }
    assert tracker.version_tags(second)["fedfraud.run_id"] == run_2
    assert tracker.model_uri(second) == f"models:/fraud-model/{second}"


def test_promotion_gate(tracker, booster, example):
    gate = other_model(tracker, "gate-model")
    with gate.federation("fed-gate", {}, {}):
        versions = []
        for round_id in range(1, 5):
            with gate.round(round_id):
                versions.append(gate.register_round_model(booster, "fed-gate", round_id, example, {}))
    v1, v2, v3, v4 = versions

    def aliases() -> dict[str, int]:
        return {alias: int(v) for alias, v in gate.client.get_registered_model("gate-model").aliases.items()}

    assert gate.promote(v1, 0.50, None) is True  # first model: champion
    assert aliases() == {"champion": v1, "challenger": v1}
    assert gate.promote(v2, 0.40, 0.50) is False  # worse: challenger only
    assert aliases() == {"champion": v1, "challenger": v2}
    assert gate.version_tags(v2)["fedfraud.promotion"] == "challenger"
    assert "candidate_auprc=0.400000 champion_auprc=0.500000" in gate.version_tags(v2)["fedfraud.promotion_detail"]
    assert gate.promote(v3, 0.50, 0.50) is True  # equal: champion moves
    assert aliases() == {"champion": v3, "challenger": v3}
    assert gate.version_tags(v3)["fedfraud.promotion"] == "champion"
    assert gate.promote(v4, 0.99, None) is False  # champion exists but its AUPRC is unknown: keep it
    assert aliases() == {"champion": v3, "challenger": v4}
    assert gate.promote(v4, 0.10, None, champion_stale=True) is True  # old contract: replaced
    assert aliases() == {"champion": v4, "challenger": v4}


def test_champion_loads_the_registered_booster(tracker, example):
    store = other_model(tracker, "champion-model")
    assert store.champion() is None
    weak, strong = train_booster(seed=2, rounds=1), train_booster(seed=3, rounds=5)
    with store.federation("fed-champion", {}, {}):
        with store.round(1):
            v1 = store.register_round_model(weak, "fed-champion", 1, example, {})
        with store.round(2):
            v2 = store.register_round_model(strong, "fed-champion", 2, example, {})
    store.promote(v1, 0.3, None)
    store.promote(v2, 0.6, 0.3)

    version, loaded = store.champion()
    data = xgboost.DMatrix(np.random.default_rng(4).normal(size=(50, 5)), feature_names=FEATURES)
    assert version == v2
    np.testing.assert_allclose(loaded.predict(data), strong.predict(data), rtol=1e-6)
    assert not np.allclose(loaded.predict(data), weak.predict(data))


def test_retried_federation_reuses_parent_and_round_runs(tracker):
    params = {"rounds": 3, "strategy": "fedavg"}
    with (
        pytest.raises(RuntimeError, match="bank timed out"),
        tracker.federation("fed-retry", params, {"trigger": "manual"}) as first,
        tracker.round(1) as round_first,
    ):
        tracker.log_round_metrics(1, {"bank_a": {"auprc": 0.25}}, {"auprc": 0.5})
        raise RuntimeError("bank timed out")
    assert tracker.client.get_run(first).info.status == "FAILED"
    assert tracker.client.get_run(round_first).info.status == "FAILED"

    with tracker.federation("fed-retry", params, {"trigger": "retry"}) as second, tracker.round(1) as round_second:
        tracker.log_round_metrics(1, {"bank_a": {"auprc": 0.25}}, {"auprc": 0.5})  # same values again
    assert (second, round_second) == (first, round_first)
    for run_id in (first, round_first):  # the retry did not duplicate metric points
        assert [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, "pooled.auprc")] == [(1, 0.5)]
    assert [run.info.run_id for run in parent_runs(tracker, "fed-retry")] == [first]
    run = tracker.client.get_run(first)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"rounds": "3", "strategy": "fedavg"}
    assert run.data.tags["trigger"] == "retry"
    assert tracker.client.get_run(round_first).info.status == "FINISHED"
    children = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{first}'")
    assert [child.info.run_name for child in children] == ["round-1"]

    with pytest.raises(ValueError, match="rounds"), tracker.federation("fed-retry", {"rounds": 5}, {}):
        pass


def test_metrics_by_round_in_round_and_parent_runs(tracker):
    with tracker.federation("fed-metrics", {}, {}) as parent:
        round_runs = {}
        for round_id in (1, 2, 3):
            with tracker.round(round_id) as run_id:
                round_runs[round_id] = run_id
                tracker.log_round_metrics(
                    round_id, {"bank_a": {"auprc": 0.1 * round_id, "recall": 0.5}}, {"auprc": 0.2 * round_id}
                )
    history = tracker.client.get_metric_history(parent, "pooled.auprc")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.2), (2, 0.4), (3, 0.6)]
    assert len(tracker.client.get_metric_history(parent, "bank_a.auprc")) == 3
    round_2 = tracker.client.get_metric_history(round_runs[2], "bank_a.auprc")
    assert [(m.step, round(m.value, 6)) for m in round_2] == [(2, 0.2)]
    assert tracker.client.get_run(round_runs[3]).data.metrics == pytest.approx(
        {"bank_a.auprc": 0.3, "bank_a.recall": 0.5, "pooled.auprc": 0.6}
    )


def test_rejections_logged_as_artifact_tag_and_metric(tracker, tmp_path):
    rejections = [
        {"bank": "bank_c", "check": "norm", "detail": "update norm 9.1 > 5.0"},
        {"bank": "bank_a", "check": "schema", "detail": "feature count 4 != 5"},
    ]
    with tracker.federation("fed-reject", {}, {}) as parent:
        with tracker.round(1) as run_1:
            tracker.log_rejections(1, rejections)
        with tracker.round(2) as run_2:
            tracker.log_rejections(2, [])
    assert tracker.client.get_run(run_1).data.tags["fedfraud.rejected_banks"] == "bank_a,bank_c"
    assert tracker.client.get_run(run_2).data.tags["fedfraud.rejected_banks"] == ""
    path = tracker.client.download_artifacts(run_1, "rejected_updates.json", str(tmp_path))
    assert json.loads(Path(path).read_text()) == rejections
    assert tracker.client.get_run(run_1).data.metrics["rejected_updates"] == 2
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(parent, "rejected_updates")] == [
        (1, 2),
        (2, 0),
    ]


def test_round_artifacts_in_round_run(tracker, booster, tmp_path):
    rng = np.random.default_rng(5)
    histograms = {bank: (rng.integers(0, 5, 100), rng.integers(0, 50, 100)) for bank in ("bank_a", "bank_b")}
    histograms["pooled"] = tuple(sum(h[i] for h in histograms.values()) for i in (0, 1))
    report = {
        "round": 1,
        "pooled_auprc": np.float64(0.42),
        "accepted": ["bank_a", "bank_b"],
        "banks": {"bank_a": {"auprc": 0.4, "rows": 100}, "bank_b": {"auprc": 0.45, "rows": 120}},
    }
    with tracker.federation("fed-artifacts", {}, {}), tracker.round(1) as run_id:
        tracker.log_round_artifacts(
            1, histograms, [{"round": 1, "pooled.auprc": 0.42, "bank_a.auprc": 0.4}], booster, FEATURES, report
        )
    names = {artifact.path for artifact in tracker.client.list_artifacts(run_id)}
    assert names == {
        "pr_curves.png",
        "metrics_by_round.png",
        "feature_importance.png",
        "round_report.json",
        "round_report.md",
    }
    local = tracker.client.download_artifacts(run_id, "round_report.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["pooled_auprc"] == 0.42
    markdown = Path(tracker.client.download_artifacts(run_id, "round_report.md", str(tmp_path))).read_text()
    assert markdown.startswith("# Round 1 report")
    assert "| bank_a | 0.4000 | 100 |" in markdown


def test_report_markdown_rendering():
    text = render_report_markdown(
        3, {"status": "ok", "banks": {"a": {"auprc": 0.5}}, "rejected": [], "updates": [{"bank": "a", "norm": 1.25}]}
    )
    assert text.splitlines()[:3] == ["# Round 3 report", "", "- **status**: ok"]
    assert "|  | auprc |" in text and "| a | 0.5000 |" in text
    assert "## rejected\n\n_(none)_" in text
    assert "| bank | norm |\n|---|---|\n| a | 1.2500 |" in text


def test_trackers_on_different_stores_are_independent(tracker, booster, example, tmp_path):
    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    other = FederationTracker(f"sqlite:///{tmp_path / 'other.db'}", "fraud-model")
    with other.federation("fed-other", {}, {}), other.round(1) as run_id:
        version = other.register_round_model(booster, "fed-other", 1, example, {})
    assert version == 1
    assert other.client.get_experiment(other.experiment_id).artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert (tmp_path / "mlartifacts").is_dir()
    assert other.client.get_run(run_id).info.experiment_id == other.experiment_id
    assert parent_runs(tracker, "fed-other") == []
    assert (
        mlflow.get_tracking_uri(),
        os.environ.get("MLFLOW_TRACKING_URI"),
        os.environ.get("MLFLOW_REGISTRY_URI"),
    ) == before
    assert mlflow.active_run() is None


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "work"
    assert default_tracking_uri(work) == f"sqlite:///{work.resolve()}/mlflow.db"
    assert work.is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert default_tracking_uri(work) == "http://mlflow:5000"
