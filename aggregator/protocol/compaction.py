"""Compaction phases (bagging, ``settings.compaction``): the banks judge smaller models.

* ``propose`` (aggregator, per stage, after acceptance's ``propose``): the stage's candidate — the
  working model with every update that passed the checks, aggregated — and its variants without
  the weakest trees of earlier rounds (``aggregator.compaction.variants``), as one question;
* the banks score it in the ``accept`` phase (``exchanges``: a second question of kind ``accept``,
  purpose ``compact``), through their ordinary evaluation path: reports only;
* ``compact`` (aggregator, after ``aggregate``): the verdict (``aggregator.compaction.choose``) is
  applied to the working model and recorded in ``compaction.json`` and MLflow.

A faulty answer is named and counts nowhere; with fewer answers than the quorum, or when the gate
refused an update after the question was asked (the candidate changed), nothing is dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aggregator import compaction
from aggregator.protocol import training
from aggregator.protocol.registry import tracked_round
from aggregator.protocol.state import Exchange, RoundState
from fedfraud import model_json
from fedfraud.crosscheck import ScoreAnswer, ScoreQuestion, drop_trees
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
    return r.plan.settings.compaction and r.plan.strategy == StrategyName.BAGGING


def propose(r: RoundState) -> None:
    """The stage's candidate and its ladder of smaller variants, for every bank to score."""
    question_path(r).unlink(missing_ok=True)
    accepted = training.checks(r)["stage_accepted"]
    base = r.ws.working_model(r.round_id)
    droppable = len(model_json.trees(base)) if base is not None else 0
    if not applies(r) or not accepted or droppable == 0:
        return
    updates = sorted((ModelUpdate.from_bytes(r.path(training.CHECKED, b).read_bytes(),
                                             max_bytes=r.plan.settings.max_update_bytes) for b in accepted),
                     key=lambda u: u.bank)
    candidate = r.strategy.aggregate(base, updates, r.plan.banks)
    s = r.plan.settings
    drops = compaction.variants(candidate, droppable, s.compaction_steps, s.compaction_max_fraction)
    if len(drops) < 2:
        return
    variants = {label: {"model": "candidate", "drop": drop} for label, drop in drops.items()}
    write_bytes(ScoreQuestion(r.round_id, PURPOSE, variants, {"candidate": candidate}).to_bytes(), question_path(r))


def banks(r: RoundState) -> list[str]:
    return list(r.plan.banks) if question_path(r).exists() else []


def exchanges(r: RoundState, bank: str) -> list[Exchange]:
    """The compaction question, asked in the ``accept`` phase (none when there is nothing to compact)."""
    return [Exchange(TaskKind.ACCEPT, bank, question_path(r), answer_path(r, bank))] if bank in banks(r) else []


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
            declared = (counts.get("holdout_positives"), counts.get("holdout_rows"))
            if None not in declared and declared != (report.positives, report.positives + report.negatives):
                raise WireFormatError(f"scored {report.positives} positives in {report.positives + report.negatives}"
                                      f" rows; its summary declared {declared[0]} in {declared[1]}")
            answers[bank] = reports
        except (WireFormatError, ValueError, TypeError) as exc:
            faults.append({"bank": bank, "check": "compaction_answer_invalid", "detail": str(exc)[:300]})
            log.warning("round %s: %s's compaction answer is invalid: %s", r.round_id, bank, exc)
    return answers, faults


def compact(r: RoundState) -> dict | None:
    """Drop what the banks' verdict allows from the working model; record why (None: not asked)."""
    record_path = r.path("compaction")
    record_path.unlink(missing_ok=True)
    if not question_path(r).exists() or not r.path("working").exists():
        return None
    question = ScoreQuestion.from_bytes(question_path(r).read_bytes())
    labels = sorted(question.variants)
    working = r.ws.read_json(r.path("working"))
    before = len(model_json.trees(working))
    answers, faults = _answers(r, labels)
    record = {"trees_before": before, "trees_after": before, "chosen": compaction.FULL, "answered": sorted(answers),
              "faults": faults, "tolerance": r.plan.settings.compaction_tolerance}
    if before != len(model_json.trees(question.models["candidate"])):
        record["skipped"] = "the gate changed the stage's trees after the question was asked"
    elif len(answers) < max(1, r.plan.settings.min_banks):
        record["skipped"] = f"{len(answers)} answer(s), quorum is {r.plan.settings.min_banks}"
    else:
        verdict = compaction.choose(answers, labels, r.plan.settings.compaction_tolerance)
        record.update(chosen=verdict.label, worst_loss=verdict.worst_loss, pooled=verdict.pooled)
        if verdict.label != compaction.FULL:
            working = drop_trees(working, question.variants[verdict.label]["drop"])
            write_bytes(model_json.to_bytes(working), r.path("working"))
            record["trees_after"] = len(model_json.trees(working))
    r.ws.write_json(record, record_path)
    log.info("round %s: compaction %s -> %s trees (%s)", r.round_id, before, record["trees_after"],
             record.get("skipped", record["chosen"]))
    if r.tracker is not None:
        with tracked_round(r):
            r.tracker.log_metrics(r.round_id, {"compaction.trees_before": before,
                                               "compaction.trees_after": record["trees_after"]})
    return record
