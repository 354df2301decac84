"""A federation as separate, retryable steps over a file-backed workspace.

Airflow runs each step as its own task: the banks' steps (train, evaluate) and the
aggregator's (open, aggregate, finish) only meet through files in the workspace, which hold
exactly the messages of ``fedfraud.wire``. Every step can be re-run: it rewrites the same
files, and registration in MLflow is exactly-once per round.

    <work_dir>/federations/<model>/summaries/<bank>.json
    <work_dir>/federations/<model>/plan.json
    <work_dir>/federations/<model>/round-<r>/{tasks,updates,evaluations,champion_evaluations}/<bank>.json
    <work_dir>/federations/<model>/round-<r>/{model.json,champion.json,outcome.json}
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aggregator.checks import Rejection, RoundContext, screen
from aggregator.evaluation import FederatedEvaluation, combine
from aggregator.federation import RoundFailed, federation_id, select_banks
from aggregator.settings import FederationSettings, consortium_params
from aggregator.strategies import STRATEGIES
from aggregator.tracking import FederationTracker, zero_example
from fedfraud import model_json
from fedfraud.model_json import Doc
from fedfraud.wire import EvaluationReport
from pipelines.io import write_bytes

log = logging.getLogger("fedfraud.rounds")


class Workspace:
    def __init__(self, work_dir: str | Path, model_name: str):
        self.root = Path(work_dir) / "federations" / model_name

    def summary_path(self, bank: str) -> Path:
        return self.root / "summaries" / f"{bank}.json"

    @property
    def plan_path(self) -> Path:
        return self.root / "plan.json"

    def round_dir(self, round_id: int) -> Path:
        return self.root / f"round-{round_id}"

    def path(self, round_id: int, kind: str, bank: str | None = None) -> Path:
        """``kind`` is a folder (tasks, updates, evaluations, …) with ``bank``, else a file stem."""
        base = self.round_dir(round_id)
        return base / kind / f"{bank}.json" if bank else base / f"{kind}.json"

    def messages(self, round_id: int, kind: str) -> dict[str, bytes]:
        folder = self.round_dir(round_id) / kind
        return {p.stem: p.read_bytes() for p in sorted(folder.glob("*.json"))} if folder.exists() else {}

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_bytes())


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1, default=str).encode()


# ---- bank side -------------------------------------------------------------------------------


def record_summary(ws: Workspace, summary: dict[str, Any]) -> None:
    """A bank reports it is prepared: counts, contract hash, data window, readiness."""
    write_bytes(_dump(summary), ws.summary_path(summary["bank"]))


def bank_train(ws: Workspace, round_id: int, node) -> None:
    """A bank runs its task for ``round_id`` and leaves its update (bytes) in the workspace."""
    task = ws.path(round_id, "tasks", node.bank).read_bytes()
    write_bytes(node.train(task), ws.path(round_id, "updates", node.bank))


def bank_evaluate(ws: Workspace, round_id: int, node) -> None:
    """A bank evaluates the round's candidate (and the champion, if any) on its holdout."""
    write_bytes(node.evaluate(ws.path(round_id, "model").read_bytes()), ws.path(round_id, "evaluations", node.bank))
    champion = ws.path(round_id, "champion")
    if champion.exists():
        write_bytes(node.evaluate(champion.read_bytes()), ws.path(round_id, "champion_evaluations", node.bank))


# ---- aggregator side -------------------------------------------------------------------------


def open_federation(
    ws: Workspace,
    model_name: str,
    strategy: str,
    rounds: int,
    seed: int,
    settings: FederationSettings,
    contract: dict[str, Any],
    banks: list[str],
    run_id: str | None = None,
) -> dict[str, Any]:
    """Plan the federation from the summaries of the banks that prepared; check the quorum."""
    ws.plan_path.unlink(missing_ok=True)
    summaries = {b: ws.read_json(ws.summary_path(b)) for b in banks if ws.summary_path(b).exists()}
    missing = sorted(set(banks) - set(summaries))
    ready, excluded = select_banks(summaries, contract["hash"])
    excluded.update({b: "did not prepare (its task failed or timed out)" for b in missing})
    if len(ready) < settings.min_banks:
        raise RoundFailed(f"only {len(ready)} bank(s) ready, quorum is {settings.min_banks}; excluded: {excluded}")
    positives = sum(summaries[b]["counts"]["positives"] for b in ready)
    negatives = sum(summaries[b]["counts"]["negatives"] for b in ready)
    plan = {
        "model_name": model_name,
        "strategy": strategy,
        "rounds": rounds,
        "seed": seed,
        "settings": asdict(settings),
        "contract_hash": contract["hash"],
        "feature_names": contract["names"],
        "banks": ready,
        "excluded": excluded,
        "consortium_params": consortium_params(settings, positives, negatives),
        "federation_id": federation_id(model_name, strategy, rounds, seed, settings, summaries),
        "data_windows": {b: summaries[b]["data_window"] for b in ready},
        "run_id": run_id,
    }
    write_bytes(_dump(plan), ws.plan_path)
    return plan


def strategy_for(plan: dict[str, Any]):
    settings = FederationSettings(**plan["settings"])
    return STRATEGIES[plan["strategy"]](settings, plan["seed"], plan["consortium_params"]), settings


def trains_in_one_task(plan: dict[str, Any], round_id: int) -> bool:
    """True when one task must run the whole round: several stages in turn (cyclic) or banks
    that build every tree together (histogram)."""
    strategy = strategy_for(plan)[0]
    return getattr(strategy, "collective", False) or len(strategy.stages(round_id, plan["banks"])) > 1


def clear_round(ws: Workspace, round_id: int) -> None:
    """Forget a round's files from an earlier run before it is opened again."""
    import shutil

    shutil.rmtree(ws.round_dir(round_id), ignore_errors=True)


def global_model(ws: Workspace, round_id: int) -> Doc | None:
    """The model rounds before ``round_id`` produced (None before the first round)."""
    return ws.read_json(ws.path(round_id - 1, "model")) if round_id > 1 else None


def open_round(ws: Workspace, plan: dict[str, Any], round_id: int) -> list[str]:
    """Write every bank's task for a one-stage round (all banks train on the same model)."""
    strategy, _ = strategy_for(plan)
    if trains_in_one_task(plan, round_id):
        raise ValueError(f"{plan['strategy']} rounds run in one task: use train_in_process")
    stages = strategy.stages(round_id, plan["banks"])
    base = global_model(ws, round_id)
    for bank in stages[0]:
        task = strategy.configure(round_id, bank, plan["banks"].index(bank), base, plan["contract_hash"])
        write_bytes(task.to_bytes(), ws.path(round_id, "tasks", bank))
    return stages[0]


def _context(plan, round_id, stage, base, accepted_before) -> RoundContext:
    contract = {"hash": plan["contract_hash"], "names": plan["feature_names"]}
    settings = FederationSettings(**plan["settings"])
    return RoundContext.for_stage(round_id, contract, stage, model_json.model_id(base), settings, accepted_before)


def _close_round(ws, plan, round_id, doc, participants, rejections, tracker) -> dict[str, Any]:
    """Quorum check, then the candidate (and the champion to compare with) for the banks to evaluate."""
    settings = FederationSettings(**plan["settings"])
    ws.path(round_id, "model").unlink(missing_ok=True)
    outcome = {"participants": sorted(participants), "rejections": [r.as_dict() for r in rejections], "accepted": False}
    write_bytes(_dump(outcome), ws.path(round_id, "outcome"))
    if len(participants) < settings.min_banks or doc is None:
        with _tracked_round(tracker, plan, round_id):  # a failed round's rejections go to MLflow too
            tracker.log_rejections(round_id, outcome["rejections"])
        raise RoundFailed(
            f"round {round_id}: {len(participants)} accepted update(s), quorum is {settings.min_banks}; "
            f"rejected: {outcome['rejections']}"
        )
    champion, stale = tracker.champion(), False
    ws.path(round_id, "champion").unlink(missing_ok=True)
    if champion is not None:
        version, booster = champion
        stale = tracker.version_tags(version).get("fedfraud.feature_contract_hash") != plan["contract_hash"]
        if not stale:
            write_bytes(model_json.to_bytes(model_json.to_doc(booster)), ws.path(round_id, "champion"))
    outcome["champion_stale"], outcome["accepted"] = stale, True
    write_bytes(_dump(outcome), ws.path(round_id, "outcome"))
    write_bytes(model_json.to_bytes(doc), ws.path(round_id, "model"))  # last: banks may now evaluate
    return outcome


def aggregate_round(ws: Workspace, plan: dict[str, Any], round_id: int, tracker: FederationTracker) -> dict[str, Any]:
    """Check the updates that arrived, aggregate the accepted ones, enforce the quorum."""
    strategy, _ = strategy_for(plan)
    stage = strategy.stages(round_id, plan["banks"])[0]
    base = global_model(ws, round_id)
    received = ws.messages(round_id, "updates")
    accepted, rejections = screen(received, _context(plan, round_id, stage, base, ()))
    rejections += [_missing(b) for b in stage if b not in received]
    for r in rejections:
        log.warning("round %s: %s rejected by %s: %s", round_id, r.bank, r.check, r.detail)
    doc = strategy.aggregate(base, accepted) if accepted else None
    return _close_round(ws, plan, round_id, doc, {u.bank for u in accepted}, rejections, tracker)


def train_in_process(ws: Workspace, plan: dict[str, Any], round_id: int, nodes: dict, tracker: FederationTracker,
                     strategy=None, on_progress=lambda message: None) -> dict[str, Any]:
    """Train, check and aggregate a whole round in this process (cyclic's turns, histogram's
    collective training, the CLI's embedded federation), then close it like ``aggregate_round``."""
    from aggregator.federation import train_round

    strategy = strategy or strategy_for(plan)[0]
    contract = {"hash": plan["contract_hash"], "names": plan["feature_names"]}
    doc, participants, rejections = train_round(nodes, strategy, plan["banks"], round_id, global_model(ws, round_id),
                                                contract, FederationSettings(**plan["settings"]), on_progress)
    return _close_round(ws, plan, round_id, doc, participants, rejections, tracker)


def _missing(bank: str) -> Rejection:
    return Rejection(bank, "no_update", "no update arrived (the bank's task failed or timed out)")


@contextmanager
def _tracked_round(tracker: FederationTracker, plan: dict[str, Any], round_id: int):
    """The federation's parent run and this round's nested run (both resumed on a retry)."""
    params = {"strategy": plan["strategy"], "rounds": plan["rounds"], "seed": plan["seed"],
              "banks": ",".join(plan["banks"]), **plan["settings"],
              **{f"xgb.{k}": v for k, v in plan["consortium_params"].items()}}
    tags = {"fedfraud.strategy": plan["strategy"], "fedfraud.excluded_banks": json.dumps(plan["excluded"])}
    with tracker.federation(plan["federation_id"], params, tags), tracker.round(round_id):
        yield


def finish_round(ws: Workspace, plan: dict[str, Any], round_id: int, tracker: FederationTracker
                 ) -> tuple[int, FederatedEvaluation, list[dict[str, float]]]:
    """Combine the banks' evaluations; register the candidate (exactly once) and promote it.

    Returns (version, the federated evaluation, pooled metrics of every round so far)."""
    settings = FederationSettings(**plan["settings"])
    outcome_path = ws.path(round_id, "outcome")
    outcome = ws.read_json(outcome_path) if outcome_path.exists() else {"accepted": False}
    if not outcome["accepted"]:
        raise RoundFailed(f"round {round_id} was not aggregated (below quorum or failed); nothing to register")
    reports = [EvaluationReport.from_bytes(d) for d in ws.messages(round_id, "evaluations").values()]
    if len(reports) < settings.min_banks:
        raise RoundFailed(f"round {round_id}: {len(reports)} evaluation(s), quorum is {settings.min_banks}")
    evaluation = combine(reports, settings.alert_budget)
    champion_reports = [EvaluationReport.from_bytes(d) for d in ws.messages(round_id, "champion_evaluations").values()]
    champion_auprc = combine(champion_reports, settings.alert_budget).pooled["auprc"] if champion_reports else None
    doc = ws.read_json(ws.path(round_id, "model"))
    booster = model_json.to_booster(doc)
    names = plan["feature_names"]
    tags = {
        "fedfraud.round": str(round_id),
        "fedfraud.strategy": plan["strategy"],
        "fedfraud.participating_banks": ",".join(outcome["participants"]),
        "fedfraud.rejected_banks": ",".join(sorted({r["bank"] for r in outcome["rejections"]})),
        "fedfraud.feature_contract_hash": plan["contract_hash"],
        "fedfraud.federation_id": plan["federation_id"],
        "fedfraud.data_windows": json.dumps(plan["data_windows"]),
        "fedfraud.params": json.dumps({**plan["settings"], **plan["consortium_params"]}, sort_keys=True),
        "fedfraud.pooled_auprc": f"{evaluation.pooled['auprc']:.6f}",
    }
    with _tracked_round(tracker, plan, round_id):
        tracker.log_rejections(round_id, outcome["rejections"])
        tracker.log_round_metrics(round_id, evaluation.per_bank, evaluation.pooled)
        version = tracker.register_round_model(booster, plan["federation_id"], round_id, zero_example(names), tags)
        promoted = tracker.promote(version, evaluation.pooled["auprc"], champion_auprc, outcome["champion_stale"])
        report = {
            "federation_id": plan["federation_id"],
            "round": round_id,
            "version": version,
            **outcome,
            "excluded_banks": plan["excluded"],
            "pooled": evaluation.pooled,
            "per_bank": evaluation.per_bank,
            "champion_auprc_before": champion_auprc,
            "promoted_to_champion": promoted,
            "trees": booster.num_boosted_rounds(),
        }
        history = [
            {"round": r, **{f"pooled.{k}": v for k, v in ws.read_json(ws.path(r, "registered"))["pooled"].items()}}
            for r in range(1, round_id)
            if ws.path(r, "registered").exists()
        ]
        history.append({"round": round_id, **{f"pooled.{k}": v for k, v in evaluation.pooled.items()}})
        tracker.log_round_artifacts(round_id, evaluation.histograms, history, booster, names, report)
    write_bytes(_dump(report), ws.path(round_id, "registered"))
    return version, evaluation, history
