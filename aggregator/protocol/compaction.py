"""Compaction phases (bagging, ``settings.compaction``): the banks judge smaller models.

* ``propose`` (aggregator, per stage, after acceptance's ``propose``): the stage's candidate — the
  working model with every update that passed the checks, aggregated — and its variants without
  the weakest trees of earlier rounds (``aggregator.compaction.variants``), as one question;
* the banks score it in the ``accept`` phase (``exchanges``: a second question of kind ``accept``,
  purpose ``compact``), through their ordinary evaluation path: reports only;
* ``compact`` (aggregator, after ``aggregate``): the verdict (``aggregator.compaction.choose``) is
  applied to the working model and recorded in ``compaction.json`` and MLflow.

With ``compaction_budget`` the tolerance is the federation's: each record carries what the rounds so far
spent of it (``spent``), and a round may lose only the rest (``allowance``).

A faulty answer is named and counts nowhere; with fewer answers than the quorum, or when the gate
refused an update after the question was asked (the candidate changed), nothing is dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aggregator import compaction
from aggregator.protocol import training
from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.registry import tracked_round
from aggregator.protocol.state import Exchange, RoundState
from fedfraud import model_json
from fedfraud.crosscheck import ScoreAnswer, ScoreQuestion, drop_trees
from fedfraud.model_guard import ModelRefused, rebuild_model
from fedfraud.protocol import StrategyName, TaskKind
from fedfraud.wire import EvaluationReport, ModelUpdate, WireFormatError
from pipelines.io import write_bytes

log = logging.getLogger("fedfraud.rounds")
PURPOSE = "compact"


def _folder(r: RoundState) -> Path:
    return r.ws.round_dir(r.round_id) / "compaction"


def question_path(r: RoundState) -> Path:
    return _folder(r) / "question.json"


def answer_path(r: RoundState, bank: str) -> Path:
    return _folder(r) / "answers" / f"{bank}.json"


def applies(r: RoundState) -> bool:
    """Compaction's record and provenance are kept (the leaf refit cuts blocks by provenance)."""
    s = r.plan.settings
    return (s.compaction or s.compaction_refit) and r.plan.strategy == StrategyName.BAGGING


def _accepted(r: RoundState) -> list[ModelUpdate]:
    """The stage's updates as ``check`` rebuilt them (``gate`` may have refused some since), in bank order."""
    return sorted((ModelUpdate.from_bytes(r.path(training.CHECKED, b).read_bytes(),
                                          max_bytes=r.plan.settings.max_update_bytes)
                   for b in training.checks(r)["stage_accepted"]), key=lambda u: u.bank)


def _origins(r: RoundState, updates: list[ModelUpdate]) -> list | None:
    """Provenance of the working model with ``updates`` appended: the last round's, then the new blocks
    with their bagging weights (None when the last round kept none, e.g. compaction was off then)."""
    before = [] if r.round_id == 1 else None
    if r.round_id > 1 and r.ws.path(r.round_id - 1, "provenance").exists():
        before = r.ws.read_json(r.ws.path(r.round_id - 1, "provenance"))
    base = r.ws.global_model(r.round_id)  # bagging: one stage, on the last round's model
    if before is None or len(before) != (len(model_json.trees(base)) if base is not None else 0):
        return None
    weights = r.strategy.weights(updates) if updates else []
    return before + [[r.round_id, u.bank, w] for u, w in zip(updates, weights) for _ in model_json.trees(u.model)]


def propose(r: RoundState) -> None:
    """The stage's candidate and its smaller variants (one expanded model), for every bank to score."""
    question_path(r).unlink(missing_ok=True)
    base = r.ws.working_model(r.round_id)
    droppable = len(model_json.trees(base)) if base is not None else 0
    s = r.plan.settings
    if (not applies(r) or not s.compaction or droppable == 0 and not s.compaction_new_trees
            or not training.checks(r)["stage_accepted"]):
        return
    updates = _accepted(r)
    candidate = r.strategy.aggregate(base, updates, r.banks)
    weakest_of = len(model_json.trees(candidate)) if s.compaction_new_trees else droppable
    expanded, labels, thins = compaction.variants(candidate, _origins(r, updates), droppable, s.compaction_steps,
                                                  s.compaction_max_fraction, weakest_of)
    if len(labels) < 2:
        return
    r.ws.write_json({"thinnings": compaction.as_json(thins), "candidate_trees": len(model_json.trees(candidate))},
                    _folder(r) / "proposal.json")
    variants = {label: {"model": "candidate", "drop": drop} for label, drop in labels.items()}
    write_bytes(ScoreQuestion(r.round_id, PURPOSE, variants, {"candidate": expanded}).to_bytes(), question_path(r))


def banks(r: RoundState) -> list[str]:
    return list(r.banks) if question_path(r).exists() else []


def exchanges(r: RoundState, bank: str) -> list[Exchange]:
    """The compaction question, asked in the ``accept`` phase (none when there is nothing to compact); its
    own ``part``, so the service keeps it apart from the acceptance question of the same bank and round."""
    return ([Exchange(TaskKind.ACCEPT, bank, question_path(r), answer_path(r, bank), part=PURPOSE)]
            if bank in banks(r) else [])


def _answers(r: RoundState, labels: list[str]) -> tuple[dict[str, dict[str, EvaluationReport]], list[dict]]:
    """Well-formed answers by bank (on the holdout its summary declared); faulty ones named."""
    answers, faults = {}, []
    for bank in banks(r):
        path = answer_path(r, bank)
        if not path.exists():
            continue
        try:
            answer = ScoreAnswer.from_bytes(path.read_bytes())
            if answer.bank != bank or answer.round_id != r.round_id or answer.purpose != PURPOSE:
                raise WireFormatError(f"answer names {answer.bank}/round {answer.round_id}/{answer.purpose}")
            reports = answer.parsed(labels)
            report, counts = reports[compaction.FULL], r.plan.counts.get(bank, {})
            declared = counts.get("holdout_rows")
            if declared is not None and declared != report.positives + report.negatives:
                raise WireFormatError(f"scored {report.positives + report.negatives} rows; its summary declared "
                                      f"{declared}")
            answers[bank] = reports
        except (WireFormatError, ValueError, TypeError) as exc:
            faults.append({"bank": bank, "check": "compaction_answer_invalid", "detail": str(exc)[:300]})
            log.warning("round %s: %s's compaction answer is invalid: %s", r.round_id, bank, exc)
    return answers, faults


def _spent(r: RoundState) -> float:
    """What the earlier rounds spent of the federation's tolerance (0 without the budget or a record)."""
    path = r.ws.path(r.round_id - 1, "compaction")
    if not r.plan.settings.compaction_budget or r.round_id == 1 or not path.exists():
        return 0.0
    spent = r.ws.read_json(path).get("spent", 0.0)
    return float(spent) if isinstance(spent, (int, float)) and spent >= 0 else 0.0


def compact(r: RoundState) -> dict | None:
    """Apply what the banks' verdict allows to the working model; record why and the new provenance."""
    record_path = r.path("compaction")
    record_path.unlink(missing_ok=True)
    r.path("provenance").unlink(missing_ok=True)
    if not applies(r) or not r.path("working").exists():
        return None
    working = r.ws.read_json(r.path("working"))
    before = len(model_json.trees(working))
    origins = _origins(r, _accepted(r))
    tolerance, spent = r.plan.settings.compaction_tolerance, _spent(r)
    allowed = compaction.allowance(tolerance, spent) if r.plan.settings.compaction_budget else tolerance
    record = {"trees_before": before, "trees_after": before, "chosen": compaction.FULL, "tolerance": tolerance,
              "budget": r.plan.settings.compaction_budget, "allowance": allowed, "spent": spent}
    if question_path(r).exists():
        question = ScoreQuestion.from_bytes(question_path(r).read_bytes())
        proposal = r.ws.read_json(_folder(r) / "proposal.json")
        labels = sorted(question.variants)
        answers, faults = _answers(r, labels)
        record.update(answered=sorted(answers), faults=faults)
        if before != proposal["candidate_trees"] or origins is None and proposal["thinnings"]:
            record["skipped"] = "the gate changed the stage's trees after the question was asked"
        elif len(answers) < max(1, r.plan.settings.min_banks):
            record["skipped"] = f"{len(answers)} answer(s), quorum is {r.plan.settings.min_banks}"
        else:
            drops = {label: question.variants[label]["drop"] for label in labels}
            verdict = compaction.choose(answers, compaction.sizes_of(question.models["candidate"], drops), allowed)
            record.update(chosen=verdict.label, worst_loss=verdict.worst_loss, pooled=verdict.pooled,
                          spent=compaction.spend(spent, verdict) if r.plan.settings.compaction_budget else spent)
            thins = compaction.from_json(proposal["thinnings"])
            working = drop_trees(compaction.expand(working, thins), drops[verdict.label])
            try:
                working = rebuild_model(working, r.plan.model_limits, r.plan.header)
            except ModelRefused as refused:
                raise RoundFailed(f"round {r.round_id}: the compacted model is refused by {refused.check}: "
                                  f"{refused.detail}") from None
            write_bytes(model_json.to_bytes(working), r.path("working"))
            record["trees_after"] = len(model_json.trees(working))
            origins = None if origins is None else compaction.origins_after(origins, thins, drops[verdict.label])
    if origins is not None:
        r.ws.write_json(origins, r.path("provenance"))
    r.ws.write_json(record, record_path)
    log.info("round %s: compaction %s -> %s trees (%s)", r.round_id, before, record["trees_after"],
             record.get("skipped", record["chosen"]))
    if r.tracker is not None:
        with tracked_round(r):
            r.tracker.log_metrics(r.round_id, {"compaction.trees_before": before,
                                               "compaction.trees_after": record["trees_after"]})
    return record
