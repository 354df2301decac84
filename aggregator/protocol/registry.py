"""The closing half of a round: the masked evaluation's tally -> register the candidate -> promote it.

The evaluation's phases (``session``, ``keys``, ``relay``, ``evaluate``) are in ``secure_evaluation``."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager

from aggregator.evaluation import FederatedEvaluation, pooled_evaluation, pooled_metrics
from aggregator.protocol import records, secure_evaluation, traffic
from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.state import RoundState
from aggregator.tracking import zero_example
from fedfraud import model_json
from fedfraud.protocol import Tag

log = logging.getLogger("fedfraud.rounds")


@contextmanager
def tracked_round(r: RoundState):
    """The federation's parent run and this round's nested run (both resumed on a retry)."""
    plan = r.plan
    params = {"strategy": plan.strategy, "rounds": plan.rounds, "seed": plan.seed, "banks": ",".join(plan.banks),
              **plan.settings.as_params(), **{f"xgb.{k}": v for k, v in plan.consortium_params.items()}}
    tags = {Tag.STRATEGY: plan.strategy, Tag.EXCLUDED_BANKS: json.dumps(plan.excluded)}
    with r.tracker.federation(plan.federation_id, params, tags), r.tracker.round(r.round_id):
        yield


def register_and_promote(r: RoundState) -> tuple[int, FederatedEvaluation, list[dict[str, float]]]:
    """Combine the banks' evaluations; register the candidate (exactly once) and promote it.

    Returns (version, the federated evaluation, pooled metrics of every round so far)."""
    plan, ws, round_id, settings = r.plan, r.ws, r.round_id, r.plan.settings
    outcome = ws.read_json(r.path("outcome")) if r.path("outcome").exists() else {"accepted": False}
    if not outcome["accepted"]:
        raise RoundFailed(f"round {round_id} was not aggregated (below quorum or failed); nothing to register")
    tally = secure_evaluation.tally(r)  # pooled histograms from masked sums only (or a re-run, or RoundFailed)
    outcome["rejections"] = outcome["rejections"] + [{**x, "detail": f"evaluation: {x['detail']}"}
                                                     for x in tally.rejections]
    if len(tally.banks) < settings.min_banks:
        raise RoundFailed(f"round {round_id}: {len(tally.banks)} evaluation(s), quorum is {settings.min_banks}")
    evaluation = pooled_evaluation(*tally.histograms["candidate"], tally.metrics["candidate"], settings.alert_budget)
    champion_auprc = (pooled_metrics(*tally.histograms["champion"], settings.alert_budget)["auprc"]
                      if "champion" in tally.histograms else None)
    booster = model_json.to_booster(ws.read_json(r.path("model")))
    tags = {
        Tag.ROUND: str(round_id),
        Tag.STRATEGY: plan.strategy,
        Tag.PARTICIPATING_BANKS: ",".join(outcome["participants"]),
        Tag.REJECTED_BANKS: ",".join(sorted({x["bank"] for x in outcome["rejections"]})),
        Tag.FEATURE_CONTRACT_HASH: plan.contract_hash,
        Tag.FEDERATION_ID: plan.federation_id,
        Tag.DATA_WINDOWS: json.dumps(plan.data_windows),
        Tag.PARAMS: json.dumps({**settings.as_params(), **plan.consortium_params}, sort_keys=True),
        Tag.POOLED_AUPRC: f"{evaluation.pooled['auprc']:.6f}",
        Tag.EVALUATED_BY: ",".join(tally.banks),
        Tag.METRICS_SHARED_BY: ",".join(sorted(evaluation.per_bank)),
    }
    contributions = records.contributions(ws, round_id)
    privacy = records.privacy_epsilons(ws, round_id)  # each private bank's ε spent, as it declared
    wire = traffic.totals(ws.round_dir(round_id))  # bytes each bank sent and received this round
    floor = best_local(r)
    if floor is not None:
        tags[Tag.BEST_LOCAL_AUPRC] = f"{floor[1]:.6f} ({floor[0]})"
    with tracked_round(r):
        r.tracker.log_rejections(round_id, outcome["rejections"])
        r.tracker.log_round_metrics(round_id, evaluation.per_bank, evaluation.pooled)
        r.tracker.log_contributions(round_id, contributions)
        r.tracker.log_metrics(round_id, records.gate_metrics(ws, round_id))
        r.tracker.log_metrics(round_id, {f"privacy.epsilon.{bank}": eps for bank, eps in privacy.items()})
        r.tracker.log_metrics(round_id, traffic.metrics(wire))
        version = r.tracker.register_round_model(booster, plan.federation_id, round_id,
                                                 zero_example(plan.feature_names), tags)
        promoted = r.tracker.promote(version, evaluation.pooled["auprc"], champion_auprc, outcome["champion_stale"],
                                     best_local=floor)
        report = {"federation_id": plan.federation_id, "round": round_id, "version": version, **outcome,
                  "excluded_banks": plan.excluded, "pooled": evaluation.pooled, "per_bank": evaluation.per_bank,
                  "evaluated_by": tally.banks, "metrics_shared_by": sorted(evaluation.per_bank),
                  "secure_aggregation": _attempts(r),
                  "champion_auprc_before": champion_auprc, "promoted_to_champion": promoted,
                  "best_local_model": None if floor is None else {"bank": floor[0], "pooled_auprc": floor[1]},
                  "contributions": contributions, "acceptance": records.read_acceptance(ws, round_id)["stages"],
                  "privacy_epsilon": privacy, "trees": booster.num_boosted_rounds(), "bytes": wire,
                  "compaction": ws.read_json(r.path("compaction")) if r.path("compaction").exists() else None}
        earlier = [(n, ws.read_json(ws.path(n, "registered"))["pooled"]) for n in range(1, round_id)
                   if ws.path(n, "registered").exists()]
        history = [{"round": n, **{f"pooled.{k}": v for k, v in pooled.items()}}
                   for n, pooled in [*earlier, (round_id, evaluation.pooled)]]
        r.tracker.log_round_artifacts(round_id, evaluation.histograms, history, booster, plan.feature_names, report)
    ws.write_json(report, r.path("registered"))
    return version, evaluation, history


def _attempts(r: RoundState) -> list[dict]:
    """Each masked-evaluation attempt: its banks, who masked, who answered (no key material)."""
    state = secure_evaluation.record(r)
    return [*[{k: a.get(k) for k in ("attempt", "banks", "masking", "answered")} for a in state["history"]],
            {"attempt": state["attempt"], "banks": state["banks"], "masking": state["masking"]}]


def best_local(r: RoundState) -> tuple[str, float] | None:
    """The champion gate's floor: the best single-bank local model's pooled AUPRC on the round's
    evaluating banks' holdouts (from the cross-evaluation), when the gate is on."""
    crossval = records.read_crossval(r.ws)
    if not r.plan.settings.champion_gate or not crossval or not crossval.get("best_local"):
        return None
    best = crossval["best_local"]
    return best["bank"], float(best["pooled_auprc"])
