"""One federation, round by round: configure -> train at banks -> check -> aggregate ->
evaluate at banks -> register -> promote. The aggregator holds only bytes the banks return.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import pandas as pd

from aggregator.checks import Rejection, RoundContext, screen
from aggregator.evaluation import FederatedEvaluation, combine
from aggregator.settings import FederationSettings, consortium_params
from aggregator.strategies import STRATEGIES
from aggregator.tracking import FederationTracker
from fedfraud import model_json
from fedfraud.model_json import Doc
from fedfraud.wire import EvaluationReport

log = logging.getLogger("fedfraud.federation")


class Node(Protocol):
    """What the aggregator may ask of a bank (embedded object or networked client).

    A collective strategy (histogram) also asks ``bin_counts``, ``train_histogram`` and
    ``abort_histogram`` (see ``bank_node.node.BankNode``).
    """

    bank: str

    def summary(self) -> dict[str, Any]: ...
    def train(self, task_bytes: bytes) -> bytes: ...
    def evaluate(self, model_bytes: bytes) -> bytes: ...


class RoundFailed(RuntimeError):
    """A round could not produce a model (below quorum); nothing was registered."""


@dataclass
class FederationResult:
    model_uri: str
    version: int
    federation_id: str
    evaluation: FederatedEvaluation
    history: list[dict[str, float]] = field(default_factory=list)
    rejections: list[dict[str, str]] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)


def select_banks(summaries: dict[str, dict[str, Any]], contract_hash: str) -> tuple[list[str], dict[str, str]]:
    """Banks fit to join (ready, same feature contract) and the named reason for each one left out."""
    ready, excluded = [], {}
    for bank, s in sorted(summaries.items()):
        if s["contract_hash"] != contract_hash:
            excluded[bank] = f"feature contract {s['contract_hash'][:12]} differs from {contract_hash[:12]}"
        elif not s["training_allowed"]:
            excluded[bank] = "declined to train: " + "; ".join(s["decline_reasons"])
        else:
            ready.append(bank)
    return ready, excluded


def federation_id(model_name: str, strategy: str, rounds: int, seed: int, settings: FederationSettings,
                  summaries: dict[str, dict[str, Any]]) -> str:
    """Same banks, data windows, settings and seed -> same id, so a retry is recognised."""
    key = {"model": model_name, "strategy": strategy, "rounds": rounds, "seed": seed,
           "settings": settings.as_params(),
           "banks": {b: [s["contract_hash"], s["data_window"], s["counts"]] for b, s in sorted(summaries.items())}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def evaluate_everywhere(nodes: dict[str, Node], banks: list[str], doc: Doc, budget: float) -> FederatedEvaluation:
    payload = model_json.to_bytes(doc)
    return combine([EvaluationReport.from_bytes(nodes[b].evaluate(payload)) for b in banks], budget)


def run_federation(
    nodes: dict[str, Node],
    strategy_name: str,
    rounds: int,
    tracker: FederationTracker,
    contract: dict[str, Any],
    settings: FederationSettings = FederationSettings(),
    seed: int = 0,
    on_progress: Callable[[str], None] = lambda message: None,
) -> FederationResult:
    """Run ``rounds`` rounds of ``strategy_name`` over ``nodes``; register every round's model."""
    summaries = {bank: node.summary() for bank, node in nodes.items()}
    banks, excluded = select_banks(summaries, contract["hash"])
    for bank, reason in excluded.items():
        log.warning("bank %s excluded: %s", bank, reason)
    if len(banks) < settings.min_banks:
        raise RoundFailed(f"only {len(banks)} bank(s) ready, quorum is {settings.min_banks}: {excluded}")
    positives = sum(summaries[b]["counts"]["positives"] for b in banks)
    negatives = sum(summaries[b]["counts"]["negatives"] for b in banks)
    strategy = STRATEGIES[strategy_name](settings, seed, consortium_params(settings, positives, negatives))
    fid = federation_id(tracker.model_name, strategy_name, rounds, seed, settings, summaries)
    params = {"strategy": strategy_name, "rounds": rounds, "seed": seed, "banks": ",".join(banks),
              **settings.as_params(), **{f"xgb.{k}": v for k, v in strategy.consortium_params.items()}}
    windows = {b: summaries[b]["data_window"] for b in banks}
    result: FederationResult | None = None
    history: list[dict[str, float]] = []
    all_rejections: list[dict[str, str]] = []
    with tracker.federation(fid, params, {"fedfraud.strategy": strategy_name,
                                          "fedfraud.excluded_banks": json.dumps(excluded)}):
        global_doc: Doc | None = None
        for round_id in range(1, rounds + 1):
            with tracker.round(round_id):
                global_doc, participants, rejections = train_round(nodes, strategy, banks, round_id, global_doc,
                                                                   contract, settings, on_progress)
                tracker.log_rejections(round_id, [r.as_dict() for r in rejections])
                all_rejections += [{"round": str(round_id), **r.as_dict()} for r in rejections]
                if len(participants) < settings.min_banks:
                    raise RoundFailed(f"round {round_id}: {len(participants)} accepted update(s), quorum is "
                                      f"{settings.min_banks}; rejected: {[r.as_dict() for r in rejections]}")
                on_progress(f"round {round_id}: evaluating at {len(banks)} banks")
                evaluation = evaluate_everywhere(nodes, banks, global_doc, settings.alert_budget)
                champion_auprc, champion_stale = _champion_auprc(tracker, nodes, banks, contract, settings)
                history.append({"round": round_id, **{f"pooled.{k}": v for k, v in evaluation.pooled.items()},
                                **{f"{b}.{k}": v for b, m in evaluation.per_bank.items() for k, v in m.items()}})
                tracker.log_round_metrics(round_id, evaluation.per_bank, evaluation.pooled)
                booster = model_json.to_booster(global_doc)
                tags = {
                    "fedfraud.round": str(round_id), "fedfraud.strategy": strategy_name,
                    "fedfraud.participating_banks": ",".join(sorted(participants)),
                    "fedfraud.rejected_banks": ",".join(sorted({r.bank for r in rejections})),
                    "fedfraud.feature_contract_hash": contract["hash"],
                    "fedfraud.data_windows": json.dumps(windows), "fedfraud.federation_id": fid,
                    "fedfraud.params": json.dumps(params, sort_keys=True, default=str),
                    "fedfraud.pooled_auprc": f"{evaluation.pooled['auprc']:.6f}",
                }
                example = pd.DataFrame([[0.0] * len(contract["names"])], columns=contract["names"])
                version = tracker.register_round_model(booster, fid, round_id, example, tags)
                promoted = tracker.promote(version, evaluation.pooled["auprc"], champion_auprc, champion_stale)
                report = {"federation_id": fid, "round": round_id, "strategy": strategy_name, "version": version,
                          "participating_banks": sorted(participants), "excluded_banks": excluded,
                          "rejections": [r.as_dict() for r in rejections], "pooled": evaluation.pooled,
                          "per_bank": evaluation.per_bank, "champion_auprc_before": champion_auprc,
                          "promoted_to_champion": promoted, "trees": booster.num_boosted_rounds()}
                tracker.log_round_artifacts(round_id, evaluation.histograms, history, booster,
                                            contract["names"], report)
                on_progress(f"round {round_id}: pooled AUPRC {evaluation.pooled['auprc']:.4f} -> version {version}")
                result = FederationResult(tracker.model_uri(version), version, fid, evaluation, list(history),
                                          all_rejections, excluded)
    assert result is not None
    return result


def train_round(nodes: dict[str, Node], strategy, banks: list[str], round_id: int, global_doc: Doc | None,
                contract: dict[str, Any], settings: FederationSettings,
                on_progress: Callable[[str], None] = lambda message: None):
    """Every stage of one round: tasks out, updates in, checks, aggregation.

    Returns (new global model, banks whose updates were accepted, named rejections).
    """
    participants: set[str] = set()
    rejections: list[Rejection] = []
    for stage in strategy.stages(round_id, banks):
        tasks = {b: strategy.configure(round_id, b, banks.index(b), global_doc, contract["hash"]) for b in stage}
        received: dict[str, bytes] = {}
        if getattr(strategy, "collective", False):  # the stage's banks build every tree together
            received, left_out = strategy.train_collective(nodes, tasks, round_id, on_progress)
            rejections += left_out
        else:
            for bank, task in tasks.items():
                on_progress(f"round {round_id}: {bank} trains {task.num_trees} trees")
                try:
                    received[bank] = nodes[bank].train(task.to_bytes())
                except Exception as exc:  # a bank failing must not sink the round while quorum holds
                    log.warning("bank %s failed in round %s: %s", bank, round_id, exc)
                    rejections.append(Rejection(bank, "bank_failed", f"{exc.__class__.__name__}: {exc}"))
        ctx = RoundContext(round_id=round_id, contract_hash=contract["hash"],
                           base_model_id=model_json.model_id(global_doc), num_feature=len(contract["names"]),
                           expected_banks=frozenset(stage), max_trees=settings.max_trees_per_update,
                           max_bytes=settings.max_update_bytes, accepted_before=frozenset(participants))
        accepted, rejected = screen(received, ctx)
        for r in rejected:
            log.warning("update from %s rejected by %s: %s", r.bank, r.check, r.detail)
        rejections += rejected
        if accepted:
            global_doc = strategy.aggregate(global_doc, accepted)
            participants |= {u.bank for u in accepted}
    return global_doc, participants, rejections


def _champion_auprc(tracker, nodes, banks, contract, settings) -> tuple[float | None, bool]:
    """(the champion's pooled AUPRC on the same holdouts, whether it is stale).

    A champion built on another feature contract cannot score today's features: it is stale.
    """
    champion = tracker.champion()
    if champion is None:
        return None, False
    version, booster = champion
    if tracker.version_tags(version).get("fedfraud.feature_contract_hash") != contract["hash"]:
        return None, True
    doc = model_json.to_doc(booster)
    return evaluate_everywhere(nodes, banks, doc, settings.alert_budget).pooled["auprc"], False
