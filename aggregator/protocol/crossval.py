"""Cross-evaluation before round 1: every bank's local model is scored at the other banks' holdouts.

After planning, each bank trains a model on its own rows alone (the consortium's parameters,
``rounds x trees_per_round`` trees up to ``crossval_max_trees``, round 0, no base model) and sends
it (``local_model``: its trees leave the bank, so a bank may refuse). The models are checked like any
update (3. a bank whose local model failed a check is excluded, ``crossval_<check>``, and, with
``crossval_require_model``, one that did not send a model, ``crossval_no_model``). Then every bank scores
every model on its holdout (``crossval``), and the aggregator excludes by name:

**Masked** (``crossval_masked``, the default; ``decide_masked``, ``secure_crossval``): the aggregator learns
each model's score histograms pooled at every other bank, never one bank's (each bank answers ONE masked
vector, zeros in its own model's slot).

1. a bank whose model contradicts the others' holdouts: pooled ROC-AUC below ``crossval_max_contradiction_auc``
   (``crossval_contradicts``: the label-swapped bank, whose model is inverted at the others); the other models
   are then asked again without its holdout (a second masked session);
2. a bank whose model is no better than no-skill at the others: pooled AUPRC below ``crossval_min_lift`` x
   their share of positives (``crossval_no_skill``).

**In the clear** (``crossval_masked: false``, a consortium's choice; ``decide``): per-bank reports, and rule 1
judges holdouts: a bank whose holdout contradicts every other model (each of at least two other models has a
ROC-AUC below ``crossval_max_contradiction_auc`` there); rule 2 on the remaining holdouts.

Excluded banks leave the plan by name (``plan.excluded``); the plan returned is then unsettled, and
the drivers sum the kept banks' label counts again (``secure_planning``) for the consortium parameters;
the best remaining local model's pooled AUPRC is the champion gate's floor (``registry.best_local``;
masked: at the other banks). Everything is written to ``crossval/crossval.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable

from aggregator.checks import RoundContext, screen
from aggregator.protocol import records, secure_crossval
from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.plan import Plan, make_plan
from aggregator.protocol.state import Exchange, Node, asking, strategy_for
from aggregator.protocol.workspace import Workspace
from fedfraud import crosscheck
from fedfraud.crosscheck import ScoreAnswer, ScoreQuestion
from fedfraud.protocol import TaskKind
from fedfraud.settings import derive_seed
from fedfraud.wire import EvaluationReport, WireFormatError
from pipelines.io import write_bytes

log = logging.getLogger("fedfraud.crossval")


def _path(ws: Workspace, kind: str, bank: str | None = None) -> Path:
    folder = records.crossval_dir(ws)
    return folder / kind / f"{bank}.json" if bank else folder / f"{kind}.json"


def configure(ws: Workspace, plan: Plan) -> None:
    """Every planned bank's local-model task (round 0: no base model)."""
    strategy = strategy_for(plan)
    for bank in plan.banks:
        task = strategy.configure(0, bank, plan.bank_index(bank), None, plan.contract_hash)
        trees = min(plan.rounds * plan.settings.trees_per_round, plan.settings.crossval_max_trees)
        task = dataclasses.replace(task, num_trees=trees,
                                   params={**task.params, "seed": derive_seed(plan.seed, 0, plan.bank_index(bank))})
        write_bytes(task.to_bytes(), _path(ws, "tasks", bank))


def model_exchanges(ws: Workspace, bank: str) -> list[Exchange]:
    return [Exchange(TaskKind.LOCAL_MODEL, bank, _path(ws, "tasks", bank), _path(ws, "models", bank))]


def propose(ws: Workspace, plan: Plan) -> dict[str, str]:
    """Check the local models like updates; write the question. Returns {bank: why it has no model}."""
    received = {b: _path(ws, "models", b).read_bytes() for b in plan.banks if _path(ws, "models", b).exists()}
    ctx = dataclasses.replace(RoundContext.for_stage(0, plan, plan.banks, "none"), limits=plan.model_limits)
    accepted, rejections = screen(received, ctx)
    missing = {x.bank: f"crossval_{x.check}: {x.detail}" for x in rejections}
    missing.update({b: "crossval_no_model: no local model (refused or failed)" for b in plan.banks
                    if b not in received})
    question = ScoreQuestion(0, "crossval", {u.bank: {"model": u.bank, "drop": []} for u in accepted},
                             {u.bank: u.model for u in accepted})
    write_bytes(question.to_bytes(), _path(ws, "question"))
    return missing


def score_exchanges(ws: Workspace, bank: str) -> list[Exchange]:
    return [Exchange(TaskKind.CROSSVAL, bank, _path(ws, "question"), _path(ws, "answers", bank))]


def _answers(ws: Workspace, plan: Plan, labels: list[str]) -> tuple[dict[str, dict[str, EvaluationReport]], dict]:
    answers, faults = {}, {}
    for bank in plan.banks:
        path = _path(ws, "answers", bank)
        if not path.exists():
            continue
        try:
            answer = ScoreAnswer.from_bytes(path.read_bytes())
            if answer.bank != bank or answer.round_id != 0 or answer.purpose != "crossval":
                raise WireFormatError(f"answer names {answer.bank}/round {answer.round_id}/{answer.purpose}")
            reports = answer.parsed(labels)
            declared = getattr(plan, "counts", {}).get(bank, {})
            first = next(iter(reports.values()), None)
            if first and declared and first.positives + first.negatives != declared.get("holdout_rows"):
                raise WireFormatError(f"scored {first.positives + first.negatives} rows, planned "
                                      f"{declared.get('holdout_rows')}")
            answers[bank] = reports
        except (WireFormatError, ValueError, TypeError) as exc:
            faults[bank] = f"crossval_answer_invalid: {exc}"
    return answers, faults


def decide(ws: Workspace, plan: Plan, summaries: dict[str, dict[str, Any]], no_model: dict[str, str]) -> Plan:
    """In the clear: exclude by name from every bank's reports; write crossval.json and the plan without the
    excluded banks."""
    s = plan.settings
    models = sorted(ScoreQuestion.from_bytes(_path(ws, "question").read_bytes()).variants)
    answers, faults = _answers(ws, plan, models)
    excluded = dict(faults)
    figures: dict[str, Any] = {"masked": False, "holdouts": {}, "models": {}}
    for holdout, reports in answers.items():  # 1. holdouts that contradict every other model
        aucs = {m: crosscheck.roc_auc(reports[m].hist_pos, reports[m].hist_neg) for m in models if m != holdout}
        aucs = {m: a for m, a in aucs.items() if not math.isnan(a)}
        figures["holdouts"][holdout] = {"roc_auc_of_others": aucs}
        if len(aucs) >= 2 and all(a < s.crossval_max_contradiction_auc for a in aucs.values()):
            excluded[holdout] = (f"crossval_contradicts: every other bank's model scores below ROC-AUC "
                                 f"{s.crossval_max_contradiction_auc} on its holdout ({_fmt(aucs)})")
    sound = [b for b in answers if b not in excluded]
    for model in models:  # 2. models no better than no-skill on the other (sound) holdouts
        others = [answers[b][model] for b in sound if b != model]
        if not others:
            continue
        auprc, noskill = crosscheck.auprc(others), crosscheck.prevalence(others)
        figures["models"][model] = {"others_auprc": auprc, "others_no_skill": noskill}
        if auprc < s.crossval_min_lift * noskill:
            excluded.setdefault(model, f"crossval_no_skill: pooled AUPRC {auprc:.4f} at {len(others)} other "
                                       f"bank(s), no-skill {noskill:.4f} (needs {s.crossval_min_lift}x)")
    excluded.update({b: r for b, r in _without_model(plan, no_model).items() if b not in excluded})  # 3.
    kept = [b for b in plan.banks if b not in excluded]
    for model in kept:  # the champion gate's floor: each kept local model on every kept holdout
        reports = [answers[b][model] for b in kept if b in answers and model in answers[b]]
        if reports:
            figures["models"].setdefault(model, {})["pooled_auprc"] = crosscheck.auprc(reports)
    return _conclude(ws, plan, summaries, excluded, figures)


def decide_masked(ws: Workspace, plan: Plan, summaries: dict[str, dict[str, Any]], no_model: dict[str, str],
                  ask: Callable[[list[Exchange]], None]) -> Plan:
    """Masked (the default): every model's histograms pooled at the other banks only (``secure_crossval``).

    1. a model whose pooled ROC-AUC at the others is below ``crossval_max_contradiction_auc`` contradicts their
       holdouts (``crossval_contradicts``: a label-swapped bank's model is inverted there). The lowest leaves
       first and the others' models are asked again without its holdout (a new masked session), which its
       labels dragged down too; until no model is below;
    2. a model whose pooled AUPRC at the others is below ``crossval_min_lift`` x their share of positives
       (``crossval_no_skill``); 3. as in the clear. The champion gate's floor is the best kept model's pooled
    AUPRC at the other banks."""
    s = plan.settings
    plain = ScoreQuestion.from_bytes(_path(ws, "question").read_bytes())
    excluded = _without_model(plan, no_model)  # 3. known before scoring: such banks are not asked to score
    folder = records.crossval_dir(ws) / "secagg"
    scoring = [b for b in plan.banks if b not in excluded]
    pools = secure_crossval.pooled(ws, plan, folder, "pass-1", plain, scoring, ask)
    figures: dict[str, Any] = {"masked": True, "models": {}, "passes": [_pass("pass-1", pools)]}
    while True:  # 1. the model that contradicts the others' holdouts most, one at a time
        aucs = {m: crosscheck.roc_auc(r.hist_pos, r.hist_neg) for m, r in pools.reports.items()}
        figures["passes"][-1]["others_roc_auc"] = aucs
        for model, auc in aucs.items():
            figures["models"].setdefault(model, {})["others_roc_auc"] = auc
        below = {m: a for m, a in aucs.items() if not math.isnan(a) and a < s.crossval_max_contradiction_auc}
        if not below:
            break
        worst = min(below, key=below.get)
        excluded[worst] = (f"crossval_contradicts: its model scores ROC-AUC {below[worst]:.3f} on the other "
                           f"{len(pools.pooled_at(worst))} banks' holdouts pooled (below "
                           f"{s.crossval_max_contradiction_auc}): its labels contradict theirs")
        name = f"pass-{len(figures['passes']) + 1}"  # the others asked again without its holdout
        pools = secure_crossval.pooled(ws, plan, folder, name, plain, [b for b in pools.banks if b != worst], ask)
        figures["passes"].append(_pass(name, pools))
    for model, report in pools.reports.items():  # 2. models no better than no-skill at the others
        auprc, noskill = crosscheck.auprc([report]), crosscheck.prevalence([report])
        figures["models"][model].update(others_auprc=auprc, others_no_skill=noskill, pooled_at=pools.pooled_at(model))
        if auprc < s.crossval_min_lift * noskill:
            excluded[model] = (f"crossval_no_skill: pooled AUPRC {auprc:.4f} at {len(pools.pooled_at(model))} "
                               f"other bank(s), no-skill {noskill:.4f} (needs {s.crossval_min_lift}x)")
        else:
            figures["models"][model]["pooled_auprc"] = auprc  # the champion gate's floor: the best of these
    for fault in (f for p in figures["passes"] for f in p["faults"] if f["check"] == secure_crossval.INVALID):
        excluded.setdefault(fault["bank"], f"crossval_answer_invalid: {fault['detail']}")
    unjudged = {m: "crossval_no_model: its model was not judged (the bank left the masked session)"
                for m in plain.variants if m not in pools.reports and m not in excluded}
    excluded.update(_without_model(plan, unjudged))
    return _conclude(ws, plan, summaries, excluded, figures)


def _pass(name: str, pools: "secure_crossval.Pools") -> dict[str, Any]:
    return {"name": name, "banks": pools.banks, "faults": pools.faults}


def _without_model(plan: Plan, no_model: dict[str, str]) -> dict[str, str]:
    """3. Banks whose local model failed a check, and, with ``crossval_require_model``, those without one."""
    excluded = {}
    for bank, reason in no_model.items():
        if reason.startswith("crossval_no_model") and not plan.settings.crossval_require_model:
            log.warning("cross-evaluation: %s", reason.replace("crossval_no_model", bank))
            continue
        excluded[bank] = reason
    return excluded


def _conclude(ws: Workspace, plan: Plan, summaries: dict[str, dict[str, Any]], excluded: dict[str, str],
              figures: dict[str, Any]) -> Plan:
    """Write crossval.json (exclusions, figures, the champion gate's floor) and the plan without the excluded."""
    s = plan.settings
    kept = [b for b in plan.banks if b not in excluded]
    pooled = {m: f["pooled_auprc"] for m, f in figures["models"].items() if "pooled_auprc" in f and m in kept}
    best = max(pooled, key=pooled.get) if pooled else None
    record = {"excluded": excluded, "figures": figures,
              "best_local": {"bank": best, "pooled_auprc": pooled[best]} if best else None}
    ws.write_json(record, _path(ws, "crossval"))
    for bank, reason in excluded.items():
        log.warning("cross-evaluation excludes %s: %s", bank, reason)
    if not excluded:
        return plan
    if len(kept) < s.min_banks:
        raise RoundFailed(f"cross-evaluation left {len(kept)} bank(s), quorum is {s.min_banks}; excluded: {excluded}")
    replanned = make_plan({b: summaries[b] for b in kept}, [], plan.model_name, plan.strategy, plan.rounds, plan.seed,
                          s, plan.contract, plan.run_id)
    plan = dataclasses.replace(replanned, federation_id=plan.federation_id, excluded={**plan.excluded, **excluded})
    ws.write_json(plan.to_dict(), ws.plan_path)
    return plan


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(values.items()))


def run_with(ws: Workspace, plan: Plan, ask: Callable[[list[Exchange]], None],
             on_progress: Callable[[str], None] = lambda m: None) -> Plan:
    """The whole cross-evaluation; ``ask`` has the banks answer a list of exchanges (a bank that
    cannot is left without an answer, and named by ``propose``/``decide``). Returns the plan,
    without the banks it excluded."""
    if not plan.settings.crossval:
        return plan
    on_progress(f"cross-evaluation: {len(plan.banks)} local models")
    configure(ws, plan)
    ask([x for bank in plan.banks for x in model_exchanges(ws, bank)])
    no_model = propose(ws, plan)
    summaries = {b: ws.read_json(ws.summary_path(b)) for b in plan.banks}
    if plan.settings.crossval_masked:
        return decide_masked(ws, plan, summaries, no_model, ask)
    ask([x for bank in plan.banks for x in score_exchanges(ws, bank)])
    return decide(ws, plan, summaries, no_model)


def run(ws: Workspace, plan: Plan, nodes: dict[str, Node], on_progress: Callable[[str], None] = lambda m: None
        ) -> Plan:
    """The whole cross-evaluation with the nodes at hand (embedded federations)."""
    return run_with(ws, plan, asking(nodes, "cross-evaluation", log), on_progress)
