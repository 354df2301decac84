"""Validation-gated acceptance (bagging, cyclic): a stage's updates join only if the others agree.

Three per-stage phases between ``check`` and ``aggregate``:

* ``propose`` (aggregator): the stage's candidate — the working model with every update that
  passed the checks, aggregated by the strategy — and, per bank, the variant without its trees;
* ``accept`` (bank): every bank of the round scores each variant on its holdout (reports only);
* ``gate`` (aggregator): for each bank b, the pooled AUPRC at the *other* banks' holdouts with and
  without b's update; if b's update lowers it by more than ``acceptance_delta``, b is refused by
  name (``acceptance_degrades``) and moves from accepted to rejected in ``checks.json``. Each bank's
  contribution (pooled AUPRC at every holdout with minus without its update) goes to
  ``acceptance.json``, and from there to MLflow and the round report.

Histogram rounds build every tree collectively, so there is no one bank's update to score: the
cross-evaluation before round 1 (``crossval.py``) guards them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from aggregator.protocol import compaction, records
from aggregator.protocol.state import Exchange, Node, RoundState, answer_tolerantly
from aggregator.protocol import training
from aggregator.protocol.training import checks
from fedfraud import crosscheck, model_json
from fedfraud.crosscheck import ScoreAnswer, ScoreQuestion
from fedfraud.protocol import StrategyName, TaskKind
from fedfraud.wire import ModelUpdate, WireFormatError
from pipelines.io import write_bytes

log = logging.getLogger("fedfraud.rounds")
WITH_ALL = "with_all"
REFUSED = "acceptance_degrades"
GATED = (StrategyName.BAGGING, StrategyName.CYCLIC)


def _without(bank: str) -> str:
    return f"without:{bank}"


def _folder(r: RoundState) -> Path:
    return r.ws.round_dir(r.round_id) / "acceptance" / f"stage-{r.stages().index(r.stage)}"


def question_path(r: RoundState) -> Path:
    return _folder(r) / "question.json"


def answer_path(r: RoundState, bank: str) -> Path:
    return _folder(r) / "answers" / f"{bank}.json"


def propose(r: RoundState) -> None:
    """The stage's candidate with and without each accepted update, for every bank to score."""
    question_path(r).unlink(missing_ok=True)
    accepted = checks(r)["stage_accepted"]
    if not r.plan.settings.acceptance or r.plan.strategy not in GATED or not accepted:
        return
    base = r.ws.working_model(r.round_id)
    checked = getattr(training, "CHECKED", "updates")  # the updates as ``check`` rebuilt them
    updates = sorted((ModelUpdate.from_bytes(r.path(checked, b).read_bytes(),
                                             max_bytes=r.plan.settings.max_update_bytes) for b in accepted),
                     key=lambda u: u.bank)  # the strategies append in bank order
    candidate = r.strategy.aggregate(base, updates, r.plan.banks)
    start = len(model_json.trees(base)) if base is not None else 0
    variants: dict[str, dict] = {WITH_ALL: {"model": "candidate", "drop": []}}
    for u in updates:
        count = len(model_json.trees(u.model))
        if len(model_json.trees(candidate)) > count:  # else the variant has no tree: scored as no-skill
            variants[_without(u.bank)] = {"model": "candidate", "drop": list(range(start, start + count))}
        start += count
    if start != len(model_json.trees(candidate)):
        raise RuntimeError(f"{r.strategy.name} did not append the stage's trees in bank order")
    question = ScoreQuestion(r.round_id, "accept", variants, {"candidate": candidate})
    write_bytes(question.to_bytes(), question_path(r))


def accept_banks(r: RoundState) -> list[str]:
    return list(r.plan.banks) if question_path(r).exists() or compaction.banks(r) else []


def accept_exchanges(r: RoundState, bank: str) -> list[Exchange]:
    """The acceptance question, and the compaction question that rides in the same phase."""
    asked = question_path(r).exists()
    asks = [Exchange(TaskKind.ACCEPT, bank, question_path(r), answer_path(r, bank))] if asked else []
    return asks + compaction.exchanges(r, bank)


def accept(r: RoundState, nodes: dict[str, Node]) -> None:
    """Every bank scores the candidate's variants; one that cannot is left out of the verdict."""
    answer_tolerantly(r, nodes, accept_banks, accept_exchanges, "score the candidate")


def _answers(r: RoundState, labels: list[str]) -> tuple[dict[str, dict], list[dict[str, str]]]:
    """Every well-formed answer's reports by bank; faulty answers named (they count nowhere)."""
    answers, faults = {}, []
    for bank in accept_banks(r):
        path = answer_path(r, bank)
        if not path.exists():
            continue
        try:
            answer = ScoreAnswer.from_bytes(path.read_bytes())
            if answer.bank != bank or answer.round_id != r.round_id or answer.purpose != "accept":
                raise WireFormatError(f"answer names {answer.bank}/round {answer.round_id}/{answer.purpose}")
            reports = answer.parsed(labels)
            _matches_summary(r, bank, next(iter(reports.values())))
            answers[bank] = reports
        except (WireFormatError, ValueError, TypeError) as exc:
            faults.append({"bank": bank, "check": "acceptance_answer_invalid", "detail": str(exc)})
            log.warning("round %s: %s's acceptance answer is invalid: %s", r.round_id, bank, exc)
    return answers, faults


def _matches_summary(r: RoundState, bank: str, report) -> None:
    """The holdout a bank scored must be the one its summary declared (same rows, same positives)."""
    summary = r.ws.summary_path(bank)
    counts = r.ws.read_json(summary).get("counts", {}) if summary.exists() else {}
    declared = (counts.get("holdout_positives"), counts.get("holdout_rows"))
    if None not in declared and declared != (report.positives, report.positives + report.negatives):
        raise WireFormatError(f"scored {report.positives} positives in {report.positives + report.negatives} rows; "
                              f"its summary declared {declared[0]} in {declared[1]}")


def gate(r: RoundState) -> None:
    """Refuse, by name, each update that lowers the others' pooled AUPRC by more than δ; record contributions."""
    if not question_path(r).exists():
        return
    question = ScoreQuestion.from_bytes(question_path(r).read_bytes())
    labels = sorted(question.variants)
    answers, faults = _answers(r, labels)
    delta = r.plan.settings.acceptance_delta
    verdict, refused, stage = checks(r), [], {"stage": list(r.stage), "faults": faults, "banks": {}}
    for bank in checks(r)["stage_accepted"]:
        others = sorted(b for b in answers if b != bank)
        label = _without(bank)
        row = {"evaluators": others}
        if others:
            base_reports = [answers[b][WITH_ALL] for b in others]
            row["others_with"] = crosscheck.auprc(base_reports)
            row["others_without"] = (crosscheck.auprc([answers[b][label] for b in others]) if label in labels
                                     else crosscheck.prevalence(base_reports))  # no trees without it: no skill
        if answers:
            every = sorted(answers)
            with_all = crosscheck.auprc([answers[b][WITH_ALL] for b in every])
            without = (crosscheck.auprc([answers[b][label] for b in every]) if label in labels
                       else crosscheck.prevalence([answers[b][WITH_ALL] for b in every]))
            row["contribution"] = with_all - without
        drop = row.get("others_without", math.nan) - row.get("others_with", math.nan)
        if delta is not None and drop > delta:
            detail = (f"pooled AUPRC at {len(others)} other bank(s) {row['others_with']:.4f} with its update, "
                      f"{row['others_without']:.4f} without (allowed drop {delta})")
            refused.append({"bank": bank, "check": REFUSED, "detail": detail})
            log.warning("round %s: %s refused by %s: %s", r.round_id, bank, REFUSED, detail)
        stage["banks"][bank] = row
    if refused:
        names = {x["bank"] for x in refused}
        r.ws.write_json({"participants": [b for b in verdict["participants"] if b not in names],
                         "rejections": verdict["rejections"] + refused,
                         "stage_accepted": [b for b in verdict["stage_accepted"] if b not in names]}, r.path("checks"))
    record = records.read_acceptance(r.ws, r.round_id)
    record["stages"] = [s for s in record["stages"] if s["stage"] != stage["stage"]] + [stage]
    r.ws.write_json(record, records.acceptance_path(r.ws, r.round_id))
