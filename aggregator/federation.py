"""One federation, round by round: configure -> train at banks -> check -> aggregate ->
evaluate at banks -> register -> promote. The aggregator holds only bytes the banks return.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from aggregator.checks import Rejection, RoundContext, screen
from aggregator.evaluation import FederatedEvaluation
from aggregator.settings import FederationSettings
from aggregator.tracking import FederationTracker
from fedfraud import model_json
from fedfraud.model_json import Doc

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


def run_federation(
    nodes: dict[str, Node],
    strategy_name: str,
    rounds: int,
    tracker: FederationTracker,
    contract: dict[str, Any],
    settings: FederationSettings = FederationSettings(),
    seed: int = 0,
    on_progress: Callable[[str], None] = lambda message: None,
    work_dir: str | Path | None = None,
) -> FederationResult:
    """Run ``rounds`` rounds of ``strategy_name`` over ``nodes``; register every round's model.

    The same steps as the Airflow DAG (``aggregator.rounds``), run in this process over a
    workspace in ``work_dir`` (a temporary folder when not given).
    """
    from aggregator import rounds as steps

    with (nullcontext(work_dir) if work_dir else tempfile.TemporaryDirectory(prefix="fedfraud-")) as root:
        ws = steps.Workspace(root, tracker.model_name)
        for node in nodes.values():
            steps.record_summary(ws, node.summary())
        plan = steps.open_federation(ws, tracker.model_name, strategy_name, rounds, seed, settings, contract,
                                     sorted(nodes))
        for bank, reason in plan["excluded"].items():
            log.warning("bank %s excluded: %s", bank, reason)
        strategy = steps.strategy_for(plan)[0]  # one instance per federation (histogram keeps its bins)
        rejections: list[dict[str, str]] = []
        result = None
        for round_id in range(1, rounds + 1):
            steps.clear_round(ws, round_id)
            outcome = steps.train_in_process(ws, plan, round_id, nodes, tracker, strategy, on_progress)
            rejections += [{"round": str(round_id), **r} for r in outcome["rejections"]]
            on_progress(f"round {round_id}: evaluating at {len(plan['banks'])} banks")
            for bank in plan["banks"]:
                try:
                    steps.bank_evaluate(ws, round_id, nodes[bank])
                except Exception as exc:  # a bank that cannot evaluate is left out of the pooled figures
                    log.warning("bank %s could not evaluate round %s: %s", bank, round_id, exc)
            version, evaluation, history = steps.finish_round(ws, plan, round_id, tracker)
            on_progress(f"round {round_id}: pooled AUPRC {evaluation.pooled['auprc']:.4f} -> version {version}")
            result = FederationResult(tracker.model_uri(version), version, plan["federation_id"], evaluation,
                                      history, list(rejections), plan["excluded"])
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
        ctx = RoundContext.for_stage(round_id, contract, stage, model_json.model_id(global_doc), settings, participants)
        accepted, rejected = screen(received, ctx)
        for r in rejected:
            log.warning("update from %s rejected by %s: %s", r.bank, r.check, r.detail)
        rejections += rejected
        if accepted:
            global_doc = strategy.aggregate(global_doc, accepted)
            participants |= {u.bank for u in accepted}
    return global_doc, participants, rejections
