"""Benchmark baselines beside federation: each bank alone (``local``) and everyone's rows pooled
(``centralized``). Centralized training copies raw feature rows out of the banks: it exists
only to measure what federation gives up, never for production.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from aggregator.evaluation import FederatedEvaluation, combine
from aggregator.drivers.result import FederationResult
from aggregator.protocol.plan import federation_id, select_banks
from aggregator.tracking import FederationTracker, zero_example
from bank_node.exact_gradients import fixed_point_logistic
from bank_node.node import BankNode
from bank_node.training import train_trees
from fedfraud import model_json
from fedfraud.protocol import StrategyName, Tag
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import EvaluationReport, TrainTask


def _register(tracker: FederationTracker, fid: str, booster, evaluation: FederatedEvaluation, contract, tags) -> int:
    with tracker.round(1):
        tracker.log_round_metrics(1, evaluation.per_bank, evaluation.pooled)
        version = tracker.register_round_model(booster, fid, 1, zero_example(contract["names"]), {
            Tag.FEATURE_CONTRACT_HASH: contract["hash"], Tag.FEDERATION_ID: fid,
            Tag.POOLED_AUPRC: f"{evaluation.pooled['auprc']:.6f}", **tags})
        tracker.promote(version, evaluation.pooled["auprc"], None)
    return version


def _evaluate(nodes: dict[str, BankNode], banks: list[str], booster, budget: float) -> FederatedEvaluation:
    payload = model_json.to_bytes(model_json.to_doc(booster))
    return combine([EvaluationReport.from_bytes(nodes[b].evaluate(payload)) for b in banks], budget)


def run_local(nodes: dict[str, BankNode], rounds: int, tracking_uri: str, model_name: str, contract: dict[str, Any],
              settings: FederationSettings = FederationSettings(), seed: int = 0) -> dict[str, FederationResult]:
    """Each bank trains alone with the same number of trees; one registered model per bank."""
    summaries = {b: n.summary() for b, n in nodes.items()}
    banks, excluded = select_banks(summaries, contract["hash"])
    results = {}
    for index, bank in enumerate(banks):
        counts = nodes[bank].data.counts()  # the bank's own counts, inside the bank: nothing leaves
        params = {**consortium_params(settings, counts["positives"], counts["negatives"]), "seed": seed + index}
        booster = nodes[bank].fit_local(params, rounds * settings.trees_per_round)
        evaluation = _evaluate(nodes, [bank], booster, settings.alert_budget)
        tracker = FederationTracker(tracking_uri, f"{model_name}-{bank}")
        fid = federation_id(tracker.model_name, StrategyName.LOCAL, rounds, seed, settings, {bank: summaries[bank]})
        with tracker.federation(fid, {"strategy": StrategyName.LOCAL, "rounds": rounds, **settings.as_params()},
                                {Tag.STRATEGY: StrategyName.LOCAL}):
            version = _register(tracker, fid, booster, evaluation, contract,
                                {Tag.STRATEGY: StrategyName.LOCAL, Tag.PARTICIPATING_BANKS: bank})
        results[bank] = FederationResult(tracker.model_uri(version), version, fid, evaluation, excluded=excluded)
    return results


def run_centralized(nodes: dict[str, BankNode], rounds: int, tracker: FederationTracker, contract: dict[str, Any],
                    settings: FederationSettings = FederationSettings(), seed: int = 0) -> FederationResult:
    """BENCHMARK ONLY: pool every bank's training rows in one place and fit one model."""
    summaries = {b: n.summary() for b, n in nodes.items()}
    banks, excluded = select_banks(summaries, contract["hash"])
    X = np.concatenate([nodes[b].data.X_train for b in banks])
    y = np.concatenate([nodes[b].data.y_train for b in banks])
    params = {**consortium_params(settings, int(y.sum()), int(len(y) - y.sum())), "seed": seed}
    task = TrainTask(bank="pooled", round_id=1, base_model_id="none", contract_hash=contract["hash"],
                     num_trees=rounds * settings.trees_per_round, params=params)
    booster = train_trees(task, X, y, contract["names"], obj=fixed_point_logistic(params))
    evaluation = _evaluate(nodes, banks, booster, settings.alert_budget)
    fid = federation_id(tracker.model_name, StrategyName.CENTRALIZED, rounds, seed, settings, summaries)
    run_params = {"strategy": StrategyName.CENTRALIZED, "rounds": rounds, "banks": ",".join(banks),
                  **settings.as_params()}
    with tracker.federation(fid, run_params, {Tag.STRATEGY: StrategyName.CENTRALIZED,
                                              Tag.BENCHMARK_ONLY: "pools raw rows"}):
        version = _register(tracker, fid, booster, evaluation, contract, {
            Tag.STRATEGY: StrategyName.CENTRALIZED, Tag.PARTICIPATING_BANKS: ",".join(banks),
            Tag.BENCHMARK_ONLY: "pools raw rows", Tag.PARAMS: json.dumps(params, sort_keys=True)})
    return FederationResult(tracker.model_uri(version), version, fid, evaluation, excluded=excluded)
