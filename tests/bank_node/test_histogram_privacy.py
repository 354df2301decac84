"""Differential privacy in histogram rounds (bank_node/histogram_privacy.py): clipped gradients, the sidecar's
noise on gradient sums before masking, the ledger's charge, and private histogram federations of toy banks."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import xgboost as xgb
from conftest import TOY_FEATURES, with_toy_data

from aggregator.drivers.embedded import embedded_credentials, run_federation, train_round
from aggregator.strategies import Histogram
from aggregator.tracking import FederationTracker
from bank_node.exact_gradients import fixed_point_logistic
from bank_node.histogram_privacy import (
    HistogramNoise, HistogramPrivacyRefused, SumNoiser, charge_histogram, private_objective, total_bins,
)
from bank_node.node import BankNode
from bank_node.policy import TaskRefused
from bank_node.privacy import PrivacyPolicy
from bank_node.privacy_ledger import epsilon_spent
from bank_node.training import dmatrix, train_trees
from fedfraud import model_json
from fedfraud.binning import GlobalBins
from fedfraud.histogram_session import HistogramSession
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import ModelUpdate, TrainTask

SETTINGS = FederationSettings(trees_per_round=2, max_depth=3, max_bin=16, crossval=False, acceptance_delta=None)
CONTRACT = {"hash": "h", "names": TOY_FEATURES}
REPORT = {"training_allowed": True, "decline_reasons": [], "event_time_min": "2026-01-01T00:00:00",
          "event_time_max": "2026-03-01T00:00:00"}
NOISE = HistogramNoise(noise_multiplier=2.0, gradient_clip=1.0, hessian_clip=0.25, features=6, total_bins=40,
                       trees=2, max_depth=3)


def toy_nodes(root, toy_banks, privacy: PrivacyPolicy | None = None) -> dict[str, BankNode]:
    """Three real nodes on toy rows with consortium certificates, all on ``privacy``."""
    nodes = {}
    for bank, (X, y) in toy_banks.items():
        work = root / "banks" / bank
        (work / "validation").mkdir(parents=True, exist_ok=True)
        (work / "validation" / "report.json").write_text(json.dumps(REPORT))
        nodes[bank] = with_toy_data(BankNode(bank, work, work, config=None, privacy=privacy), X, y)
    for bank, credentials in embedded_credentials(root / "pki", sorted(nodes)).items():
        nodes[bank].secagg = credentials
    return nodes


def strategy_for(nodes, seed: int = 5) -> Histogram:
    y = np.concatenate([n.data.y_train for n in nodes.values()])
    return Histogram(SETTINGS, seed, consortium_params(SETTINGS, int(y.sum()), int(len(y) - y.sum())))


def one_round(nodes, seed: int = 5):
    """One histogram round of every node; (model, the strategy that ran it)."""
    strategy = strategy_for(nodes, seed)
    doc, participants, rejections = train_round(nodes, strategy, sorted(nodes), 1, None, CONTRACT, SETTINGS)
    assert participants == set(nodes) and rejections == []
    return doc, strategy


def pooled_predictions(nodes, strategy, doc) -> tuple[np.ndarray, np.ndarray]:
    """(the federated model's, a centralized fit's) predictions on the pooled binned rows."""
    X = np.concatenate([strategy.bins.apply(n.data.X_train) for n in nodes.values()])
    y = np.concatenate([n.data.y_train for n in nodes.values()])
    task = strategy.configure(1, "pooled", 0, None, CONTRACT["hash"])
    pooled = train_trees(task, X, y, TOY_FEATURES, obj=fixed_point_logistic(task.params))
    matrix = dmatrix(X, None, TOY_FEATURES)
    return model_json.to_booster(doc).predict(matrix), pooled.predict(matrix)


# ---------------------------------------------------------------------------- the sidecar's noise

def test_noise_goes_on_root_sums_and_node_histograms_at_their_scales_and_nothing_else_passes():
    noiser = SumNoiser(NOISE, seed=123)
    counts = np.array([300, 6, 1000], dtype=np.int32)
    assert noiser(counts, 6, 1) is counts  # INT32: the matrix shape, not a gradient sum
    root = noiser(np.zeros(2), 2, 2)
    levels = [noiser(np.zeros(2 * 40 * k), 2, 3 + k) for k in (1, 2, 4)]
    assert math.isclose(NOISE.root_scale, 2.0 * math.hypot(1.0, 0.25))
    assert math.isclose(NOISE.level_scale, NOISE.root_scale * math.sqrt(6))
    level_noise = np.concatenate(levels)
    assert abs(level_noise.std() / NOISE.level_scale - 1) < 0.1 and abs(level_noise.mean()) < 0.2 * NOISE.level_scale
    assert np.all(root != 0)
    again = SumNoiser(NOISE, seed=123)
    assert np.array_equal(again(np.zeros(2), 2, 2), root)  # the seed and the call's label fix the noise
    assert not np.array_equal(SumNoiser(NOISE, seed=124)(np.zeros(2), 2, 2), root)
    for values, data_type in ((np.zeros(6), 2), (np.zeros(80, np.float32), 1), (np.zeros(0), 2)):
        with pytest.raises(HistogramPrivacyRefused, match="privacy_unknown_sum"):
            SumNoiser(NOISE, 1)(values, data_type, 9)


def test_more_releases_than_charged_are_refused():
    noiser = SumNoiser(NOISE, seed=1)
    for label in range(NOISE.trees):
        noiser(np.zeros(2), 2, label)
    with pytest.raises(HistogramPrivacyRefused, match="privacy_unaccounted_release"):
        noiser(np.zeros(2), 2, 99)
    noiser = SumNoiser(NOISE, seed=1)
    for label in range(NOISE.trees * NOISE.max_depth):
        noiser(np.zeros(80), 2, label)
    with pytest.raises(HistogramPrivacyRefused, match="privacy_unaccounted_release"):
        noiser(np.zeros(80), 2, 99)
    with pytest.raises(HistogramPrivacyRefused, match="privacy_no_seed"):
        SumNoiser.from_job(NOISE.to_dict(), None)


def test_the_objective_clips_gradients_and_hessians(toy_banks):
    X, y = toy_banks["alpha"]
    params = {"scale_pos_weight": 30.0}
    objective = private_objective({"gradient_clip": 0.5}, params)
    margin = np.linspace(-8, 8, len(y))
    g, h = objective(margin, xgb.DMatrix(X, label=y))
    assert np.abs(g).max() <= 0.5 + 1e-12 and 0 <= h.min() and h.max() <= 0.5 + 1e-12
    assert np.abs(g).max() == pytest.approx(0.5)  # frauds weighted x30 reach the clip


# ---------------------------------------------------------------------------- charging a task

def session_for(node, strategy_bins: GlobalBins, nonce: str, secagg: bool = True) -> bytes:
    return HistogramSession(bank=node.bank, round_id=1, server_address="127.0.0.1:1", world_size=3, rank=0,
                            bins=strategy_bins.to_dict(), secagg=secagg, banks=[node.bank, "b", "c"],
                            secagg_session=nonce).to_bytes()


def charge(node, task: TrainTask, session: bytes):
    return charge_histogram(node, task, task.to_bytes(), HistogramSession.from_bytes(session), session)


@pytest.fixture
def private_alpha(tmp_path, toy_banks):
    policy = PrivacyPolicy(True, epsilon_budget=20.0, noise_multiplier=3.0)
    nodes = toy_nodes(tmp_path, toy_banks, policy)
    node, bins = nodes["alpha"], strategy_for(nodes).shared_bins(nodes, sorted(nodes))
    task = TrainTask("alpha", 1, "none", "h", 4, {"max_depth": 3, "eta": 0.3, "base_score": 0.3, "seed": 1})
    return node, bins, task


def test_a_task_is_charged_trees_times_levels_plus_root_and_over_budget_is_refused_by_name(private_alpha):
    node, bins, task = private_alpha
    first = charge(node, task, session_for(node, bins, "attempt-1"))
    assert first.epsilon == pytest.approx(epsilon_spent({3.0: 4 * (3 + 1)}, 1e-5))
    assert first.noise.total_bins == sum(len(e) + 1 for e in bins.edges) == total_bins(bins)
    assert (first.noise.trees, first.noise.max_depth, first.noise.features) == (4, 3, 6)
    assert charge(node, task, session_for(node, bins, "attempt-1")).epsilon == first.epsilon  # the same release
    second = charge(node, task, session_for(node, bins, "attempt-2"))  # a retry is a new release: charged
    assert second.epsilon == pytest.approx(epsilon_spent({3.0: 32}, 1e-5)) and second.seed != first.seed
    assert [e["releases"] for e in node.privacy_ledger.entries()] == [16, 16]
    big = dataclasses.replace(task, num_trees=40)
    with pytest.raises(TaskRefused, match="privacy_budget_exceeded") as refused:
        charge(node, big, session_for(node, bins, "attempt-3"))
    assert "40 trees (160 Gaussian releases)" in str(refused.value) and "budget 20" in str(refused.value)
    assert len(node.privacy_ledger.entries()) == 2  # nothing written for a refused task
    with pytest.raises(TaskRefused, match="privacy_budget_exceeded"):  # the node refuses before any worker starts
        node.train_histogram(big.to_bytes(), session_for(node, bins, "attempt-4"))
    assert not (node.work_dir / "histogram").exists()


def test_what_the_accounting_does_not_cover_is_refused(private_alpha):
    node, bins, task = private_alpha
    lossguide = dataclasses.replace(task, params={**task.params, "grow_policy": "lossguide"})
    with pytest.raises(TaskRefused, match="privacy_unsupported"):
        charge(node, lossguide, session_for(node, bins, "s"))
    with pytest.raises(TaskRefused, match="privacy_needs_secagg"):
        charge(node, task, session_for(node, bins, "s", secagg=False))
    assert node.privacy_ledger.entries() == []


def test_the_noise_seed_is_the_banks_secret(private_alpha):
    node, bins, task = private_alpha
    session = session_for(node, bins, "attempt-1")
    seed = charge(node, task, session).seed
    assert charge(node, task, session).seed == seed  # deterministic for the bank
    (node.work_dir / "privacy" / "noise.key").write_bytes(b"\x07" * 32)  # another bank's secret, same task
    (node.work_dir / "privacy" / "ledger.json").unlink()
    other = charge(node, task, session).seed
    assert other != seed and str(seed) not in task.to_bytes().decode() + session.decode()


# ---------------------------------------------------------------------------- federations

@pytest.mark.slow
def test_noise_changes_the_model_with_privacy_on_and_not_off(tmp_path, toy_banks):
    plain = toy_nodes(tmp_path / "plain", toy_banks)
    doc, strategy = one_round(plain)
    federated, centralized = pooled_predictions(plain, strategy, doc)
    assert np.array_equal(federated, centralized)  # privacy off: bit-identical to the centralized fit
    private = toy_nodes(tmp_path / "private", toy_banks, PrivacyPolicy(True, epsilon_budget=50.0, noise_multiplier=1.0))
    doc, strategy = one_round(private)
    federated, centralized = pooled_predictions(private, strategy, doc)
    assert not np.allclose(federated, centralized, atol=1e-4)  # on: the noise moves it
    for node in private.values():
        lines = (node.work_dir / "histogram" / "collectives.jsonl").read_text().splitlines()
        audit = [json.loads(line) for line in lines]
        sums = [a for a in audit if a.get("op") == "SUM"]
        assert all(a["noised"] == (a["dtype"] == "DOUBLE") for a in sums)
        assert sum(a["dtype"] == "DOUBLE" and a["values"] == 2 for a in sums) == SETTINGS.trees_per_round  # roots


@pytest.mark.slow
def test_a_private_histogram_federation_reports_each_banks_epsilon(tmp_path, toy_banks):
    policy = PrivacyPolicy(True, epsilon_budget=50.0, noise_multiplier=4.0)
    nodes = toy_nodes(tmp_path, toy_banks, policy)
    aggregator = tmp_path / "aggregator"
    tracker = FederationTracker(f"sqlite:///{aggregator / 'mlflow.db'}", "private-histogram")
    result = run_federation(nodes, "histogram", 2, tracker, CONTRACT, SETTINGS, seed=3, work_dir=aggregator)
    assert result.version == 2
    per_round = SETTINGS.trees_per_round * (SETTINGS.max_depth + 1)
    expected = [epsilon_spent({4.0: per_round * r}, 1e-5) for r in (1, 2)]
    runs = tracker.client.search_runs([tracker.experiment_id])
    parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    last_round = aggregator / "federations" / "private-histogram" / "round-2"
    report = json.loads((last_round / "registered.json").read_text())
    for bank, node in nodes.items():
        history = tracker.client.get_metric_history(parent.info.run_id, f"privacy.epsilon.{bank}")
        assert [(m.step, m.value) for m in history] == [(r, pytest.approx(expected[r - 1])) for r in (1, 2)]
        assert node.privacy_ledger.spent() == pytest.approx(expected[1])
        assert report["privacy_epsilon"][bank] == pytest.approx(expected[1])
        update = ModelUpdate.from_bytes((last_round / "updates" / f"{bank}.json").read_bytes())
        assert update.privacy_epsilon == pytest.approx(expected[1])
