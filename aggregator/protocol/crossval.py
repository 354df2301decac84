"""Cross-evaluation before round 1: every bank's local model is scored at every bank's holdout.

After planning, each bank trains a model on its own rows alone (the consortium's parameters,
``rounds x trees_per_round`` trees up to ``crossval_max_trees``, round 0, no base model) and sends
it (``local_model``: its trees leave the bank, so a bank may refuse). The models are checked like any update, then every
bank scores every model on its own holdout (``crossval``: reports only). The aggregator then:

1. refuses a bank whose holdout contradicts every other bank's model: each of at least two other
   models has a ROC-AUC below ``crossval_max_contradiction_auc`` there (``crossval_contradicts``:
   the label-swapped bank);
2. on the remaining holdouts, refuses a bank whose model is no better than no-skill at the
   others: pooled AUPRC below ``crossval_min_lift`` x their share of positives
   (``crossval_no_skill``);
3. refuses a bank whose local model failed the update checks (``crossval_<check>``), and, with
   ``crossval_require_model``, one that did not send a model (``crossval_no_model``).

Excluded banks leave the plan by name (``plan.excluded``) and the consortium parameters are
recomputed without them; the best remaining local model's pooled AUPRC is the champion gate's
floor (``registry.best_local``). Everything is written to ``crossval/crossval.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable

from aggregator.checks import RoundContext, screen
from aggregator.protocol import records
from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.plan import Plan, make_plan
from aggregator.protocol.state import Exchange, Node, node_call, strategy_for
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
            if first and declared and (first.positives, first.positives + first.negatives) != (
                    declared.get("holdout_positives"), declared.get("holdout_rows")):
                raise WireFormatError(f"scored {first.positives} positives in {first.positives + first.negatives} "
                                      f"rows, planned {declared.get('holdout_positives')} in "
                                      f"{declared.get('holdout_rows')}")
            answers[bank] = reports
        except (WireFormatError, ValueError, TypeError) as exc:
            faults[bank] = f"crossval_answer_invalid: {exc}"
    return answers, faults


def decide(ws: Workspace, plan: Plan, summaries: dict[str, dict[str, Any]], no_model: dict[str, str]) -> Plan:
    """Exclude by name; write crossval.json and the plan without the excluded banks."""
    s = plan.settings
    models = sorted(ScoreQuestion.from_bytes(_path(ws, "question").read_bytes()).variants)
    answers, faults = _answers(ws, plan, models)
    excluded = dict(faults)
    figures: dict[str, Any] = {"holdouts": {}, "models": {}}
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
    for bank, reason in no_model.items():  # 3. no (sound) local model
        if reason.startswith("crossval_no_model") and not s.crossval_require_model:
            log.warning("cross-evaluation: %s", reason.replace("crossval_no_model", bank))
            continue
        excluded.setdefault(bank, reason)
    kept = [b for b in plan.banks if b not in excluded]
    for model in kept:  # the champion gate's floor: each kept local model on every kept holdout
        reports = [answers[b][model] for b in kept if b in answers and model in answers[b]]
        if reports:
            figures["models"].setdefault(model, {})["pooled_auprc"] = crosscheck.auprc(reports)
    pooled = {m: f["pooled_auprc"] for m, f in figures["models"].items() if "pooled_auprc" in f}
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
    ask([x for bank in plan.banks for x in score_exchanges(ws, bank)])
    summaries = {b: ws.read_json(ws.summary_path(b)) for b in plan.banks}
    return decide(ws, plan, summaries, no_model)


def run(ws: Workspace, plan: Plan, nodes: dict[str, Node], on_progress: Callable[[str], None] = lambda m: None
        ) -> Plan:
    """The whole cross-evaluation with the nodes at hand (embedded federations)."""
    def ask(exchanges: list[Exchange]) -> None:
        for x in exchanges:
            try:
                write_bytes(node_call(nodes[x.bank], x.kind)(x.question.read_bytes()), x.answer)
            except Exception as exc:  # refused or failed: named in propose / decide
                log.warning("cross-evaluation: %s did not answer %s: %s", x.bank, x.kind, exc)

    return run_with(ws, plan, ask, on_progress)
