"""Validation-gated acceptance (bagging, cyclic): a stage's updates join only if the others agree.

Three per-stage phases between ``check`` and ``aggregate``:

* ``propose`` (aggregator): the stage's candidate — the working model with every update that
  passed the checks, aggregated by the strategy — and, per bank, the variant without its trees
  (and, for the gate's second pass, per pair of banks the variant without both);
* ``accept`` (bank): every bank of the round scores each variant on its holdout (reports only); with
  ``acceptance_evaluators`` set, a cyclic turn in a federation of at least twice that many banks is scored
  by its panel only (``acceptance_panel``);
* ``gate`` (aggregator): for each bank b, the pooled AUPRC at the *other* banks' holdouts with and
  without b's update; if b's update lowers it by more than the allowed drop δ, b is refused by
  name (``acceptance_degrades``) and moves from accepted to rejected in ``checks.json``. Each bank's
  contribution (pooled AUPRC at every holdout with minus without its update) and δ go to
  ``acceptance.json``, and from there to MLflow and the round report.

δ (``acceptance_delta``): a fixed number, or ``"auto"``: ``acceptance_z`` standard errors of the
drop, at least ``acceptance_delta_floor``. The standard error of one AUPRC estimate on n pooled
positives is taken as sqrt(p(1-p)/n) (the binomial form of Boyd et al. 2013); the two figures are
scored on the same holdouts by models sharing most trees, so they are positively correlated and
sqrt(se_with² + se_without²) over-states the drop's error: the gate errs towards accepting.

Two passes: a leave-one-out with a degrading member in the stage judges the others against a
poisoned pool, so the first pass refuses only the worst bank over its δ (the largest excess), and
a second pass re-judges the rest on the pool without it — its holdout left out too. The second
pass needs the variants without the worst *and* b, so the gate asks for them only then: it writes
a second question (``pairs``: the variant without the worst, and without the worst and each other
bank) for the banks that answered the first, and raises ``PhaseRerun("accept")``; the drivers ask
it and run the gate again. A clean stage costs 1 + n scorings per bank, a refusal n more (asking
every pair up front cost 1 + n + n(n-1)/2). Without the second pass (δ off, or more updates than
one question's variants) every bank over its δ in the first pass is refused.

Histogram rounds build every tree collectively, so there is no one bank's update to score: the
cross-evaluation before round 1 (``crossval.py``) guards them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

from aggregator.protocol import compaction, records
from aggregator.protocol.acceptance_panel import panel
from aggregator.protocol import secure_acceptance as secure
from aggregator.protocol.errors import PhaseRerun
from aggregator.protocol.state import Exchange, Node, RoundState, answer_tolerantly
from aggregator.protocol import training
from aggregator.protocol.training import checks
from fedfraud import crosscheck, model_json
from fedfraud.crosscheck import MAX_VARIANTS, ScoreAnswer, ScoreQuestion
from fedfraud.protocol import StrategyName, TaskKind
from fedfraud.wire import ModelUpdate, WireFormatError
from pipelines.io import write_bytes

log = logging.getLogger("fedfraud.rounds")
WITH_ALL = "with_all"
REFUSED = "acceptance_degrades"
GATED = (StrategyName.BAGGING, StrategyName.CYCLIC)
PAIRS = "pairs"  # the second question's folder and task part


def _without(*banks: str) -> str:
    return "without:" + "+".join(sorted(banks))


def _folder(r: RoundState) -> Path:
    return secure.stage_folder(r)


def question_path(r: RoundState) -> Path:
    return _folder(r) / "question.json"


def judged_path(r: RoundState) -> Path:
    """The banks whose updates the question judges, and whether their pairs were asked."""
    return _folder(r) / "judged.json"


def answer_path(r: RoundState, bank: str) -> Path:
    return _folder(r) / "answers" / f"{bank}.json"


def pairs_question_path(r: RoundState) -> Path:
    """The second question (asked only after a first-pass refusal): without the worst, and the worst and b."""
    return _folder(r) / PAIRS / "question.json"


def pairs_answer_path(r: RoundState, bank: str) -> Path:
    return _folder(r) / PAIRS / "answers" / f"{bank}.json"


def propose(r: RoundState) -> None:
    """The stage's candidate with and without each accepted update (and each pair), for every bank to score."""
    for stale in (question_path(r), judged_path(r), pairs_question_path(r)):
        stale.unlink(missing_ok=True)
    secure.reset(r)
    accepted = checks(r)["stage_accepted"]
    if not r.plan.settings.acceptance or r.plan.strategy not in GATED or not accepted:
        return
    if len(r.stages()) == 1 and len(accepted) < r.plan.settings.min_banks:
        return  # below quorum already: the candidate fails by name (``publish_candidate``), nothing to judge
    base = r.ws.working_model(r.round_id)
    checked = getattr(training, "CHECKED", "updates")  # the updates as ``check`` rebuilt them
    updates = sorted((ModelUpdate.from_bytes(r.path(checked, b).read_bytes(),
                                             max_bytes=r.plan.settings.max_update_bytes) for b in accepted),
                     key=lambda u: u.bank)  # the strategies append in bank order
    candidate = r.strategy.aggregate(base, updates, r.banks)
    start, own = len(model_json.trees(base)) if base is not None else 0, {}
    for u in updates:
        own[u.bank] = list(range(start, start + len(model_json.trees(u.model))))
        start += len(own[u.bank])
    if start != len(model_json.trees(candidate)):
        raise RuntimeError(f"{r.strategy.name} did not append the stage's trees in bank order")
    second_pass = r.plan.settings.acceptance_delta is not None and 1 < len(own) <= MAX_VARIANTS
    variants = _variants(own, start, [[]] + [[b] for b in own])
    question = ScoreQuestion(r.round_id, "accept", variants, {"candidate": candidate})
    masked = secure.masked(r)
    scorers = panel(r.plan.banks, r.banks, r.stage, r.plan.settings.acceptance_evaluators, r.plan.seed,
                    r.plan.masking_quorum if masked else 1)
    r.ws.write_json({"banks": list(own), "trees": own, "total": start, "second_pass": second_pass,
                     "panel": scorers}, judged_path(r))
    write_bytes(question.to_bytes(), question_path(r))
    if masked:
        secure.open_session(r, "first", question_path(r), scorers)


def _variants(own: dict[str, list[int]], trees: int, groups: list[list[str]]) -> dict[str, dict]:
    """The candidate without each group's trees (no group: ``with_all``); a variant with no tree left is
    not asked (it scores as no-skill)."""
    variants = {}
    for group in groups:
        drop = sorted(i for b in group for i in own[b])
        if len(drop) < trees:
            variants[_without(*group) if group else WITH_ALL] = {"model": "candidate", "drop": drop}
    return variants


def _ask_pairs(r: RoundState, worst: str, answered: list[str]) -> None:
    """The second question, for the banks that answered the first; then the drivers ask it (a re-run)."""
    judged, question = r.ws.read_json(judged_path(r)), r.ws.read_message(question_path(r), ScoreQuestion.from_bytes)
    variants = _variants(judged["trees"], judged["total"], [[worst]] + [[worst, b] for b in judged["banks"]
                                                                         if b != worst])
    r.ws.write_json({**judged, "pairs": {"without": worst, "asked": answered}}, judged_path(r))
    write_bytes(ScoreQuestion(r.round_id, "accept", variants, question.models).to_bytes(), pairs_question_path(r))
    if secure.masked(r):
        secure.open_session(r, PAIRS, pairs_question_path(r), answered)
    raise PhaseRerun("accept_keys" if secure.masked(r) else "accept",
                     f"{worst} refused in the first pass: {len(answered)} bank(s) score the others without it "
                     f"(second pass)")


def _panel(r: RoundState) -> list[str]:
    """The banks asked the stage's first question (``acceptance_panel``; every bank of the round when the
    question was proposed before panels were recorded)."""
    path = judged_path(r)
    return list(r.ws.read_json(path).get("panel", r.banks)) if path.exists() else list(r.banks)


def _compaction_rides(r: RoundState) -> bool:
    """Compaction's question rides with the first attempt of the first acceptance question only."""
    s = secure.state(r)
    return not pairs_question_path(r).exists() and (s is None or s["attempt"] == 1)


def accept_banks(r: RoundState) -> list[str]:
    riding = compaction.banks(r) if _compaction_rides(r) else []
    if secure.masked(r) and question_path(r).exists():
        return sorted(set(secure.asked(r)) | set(riding))
    if pairs_question_path(r).exists():
        return list(r.ws.read_json(judged_path(r))["pairs"]["asked"])
    if not question_path(r).exists():
        return list(r.banks) if riding else []
    wanted = set(_panel(r)) | set(riding)
    return [b for b in r.banks if b in wanted]


def accept_exchanges(r: RoundState, bank: str) -> list[Exchange]:
    """The acceptance question (masked: the live session's), and the compaction question that rides in the
    same phase; after a first-pass refusal, the second question only."""
    riding = compaction.exchanges(r, bank) if _compaction_rides(r) else []
    if secure.masked(r) and question_path(r).exists():
        return ([secure.question_exchange(r, bank)] if bank in secure.asked(r) else []) + riding
    if pairs_question_path(r).exists():
        return [Exchange(TaskKind.ACCEPT, bank, pairs_question_path(r), pairs_answer_path(r, bank), PAIRS)]
    asked = question_path(r).exists() and bank in _panel(r)
    asks = [Exchange(TaskKind.ACCEPT, bank, question_path(r), answer_path(r, bank))] if asked else []
    return asks + riding


def accept(r: RoundState, nodes: dict[str, Node]) -> None:
    """Every bank (or the stage's panel) scores the candidate's variants; one that cannot is left out of the verdict."""
    answer_tolerantly(r, nodes, accept_banks, accept_exchanges, "score the candidate")


def _answers(r: RoundState, labels: list[str], banks: list[str], where=answer_path
             ) -> tuple[dict[str, dict], list[dict[str, str]]]:
    """Every well-formed answer's reports by bank; faulty answers named (they count nowhere)."""
    answers, faults = {}, []
    for bank in banks:
        path = where(r, bank)
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
    """The holdout a bank scored must be the one its summary declared (same rows; its positives are summed
    masked only, so no bank's own count is there to compare)."""
    summary = r.ws.summary_path(bank)
    counts = r.ws.read_json(summary).get("counts", {}) if summary.exists() else {}
    declared = counts.get("holdout_rows")
    if declared is not None and declared != report.positives + report.negatives:
        raise WireFormatError(f"scored {report.positives + report.negatives} rows; its summary declared {declared}")


def allowed_drop(settings, with_: float, without: float, positives: int) -> float | None:
    """δ for one judgement: fixed, or ``"auto"``: z standard errors of the drop on ``positives``
    pooled frauds (at least the floor); None when nothing is judged (gate off, no positives)."""
    delta = settings.acceptance_delta
    if delta is None or delta != "auto":
        return None if delta is None else float(delta)
    if positives <= 0 or not (math.isfinite(with_) and math.isfinite(without)):
        return None
    variance = (with_ * (1 - with_) + without * (1 - without)) / positives
    return max(settings.acceptance_delta_floor, settings.acceptance_z * math.sqrt(variance))


def _pooled(answers: dict[str, dict], labels: list[str], evaluators: list[str], with_label: str,
            without_label: str) -> tuple[float, float]:
    """The pooled AUPRC at ``evaluators``' holdouts with and without one update (no trees left: no-skill)."""
    base_reports = [answers[b][with_label] for b in evaluators]
    without = (crosscheck.auprc([answers[b][without_label] for b in evaluators]) if without_label in labels
               else crosscheck.prevalence(base_reports))
    return crosscheck.auprc(base_reports), without


def _judge(r: RoundState, answers: dict[str, dict], labels: list[str], evaluators: list[str],
           with_label: str, without_label: str) -> dict:
    """The pooled AUPRC at ``evaluators``' holdouts with and without one update, and its δ."""
    row = {"evaluators": evaluators}
    if evaluators:
        row["others_with"], row["others_without"] = _pooled(answers, labels, evaluators, with_label, without_label)
        row["others_positives"] = sum(answers[b][with_label].positives for b in evaluators)
        row["allowed_drop"] = allowed_drop(r.plan.settings, row["others_with"], row["others_without"],
                                           row["others_positives"])
    return row


def _excess(row: dict) -> float:
    """How far the update's drop goes past δ (> 0: refuse); -inf when not judged."""
    if row.get("allowed_drop") is None:
        return -math.inf
    return row["others_without"] - row["others_with"] - row["allowed_drop"]


def _refusal(r: RoundState, bank: str, row: dict, when: str) -> dict:
    detail = (f"{when}: pooled AUPRC at {len(row['evaluators'])} other bank(s) ({row['others_positives']} frauds) "
              f"{row['others_with']:.4f} with its update, {row['others_without']:.4f} without "
              f"(allowed drop {row['allowed_drop']:.4f})")
    log.warning("round %s: %s refused by %s: %s", r.round_id, bank, REFUSED, detail)
    return {"bank": bank, "check": REFUSED, "detail": detail}


def _scores(r: RoundState, question: str, labels: list[str], banks: list[str], where
            ) -> tuple[dict[str, dict], list[dict[str, str]], Callable[..., list[str]], list[str]]:
    """A question's reports by evaluator, the faults named, who judges an update (given the banks to leave
    out), and the banks whose holdouts count. Masked: one evaluator, every session bank's holdout pooled."""
    if secure.masked(r):
        reports, answered, faults = secure.pooled(r, question, labels)
        return {secure.POOL: reports}, faults, lambda *excluded: [secure.POOL], answered
    answers, faults = _answers(r, labels, banks, where)
    return answers, faults, lambda *excluded: sorted(b for b in answers if b not in excluded), sorted(answers)


def _named(row: dict, answered: list[str]) -> dict:
    """A masked judgement names the banks whose holdouts its pool sums (its one evaluator is the pool)."""
    return {**row, "evaluators": answered} if row["evaluators"] == [secure.POOL] else row


def gate(r: RoundState) -> None:
    """Refuse, by name, updates that lower the pooled AUPRC by more than δ (two passes); record
    contributions and each judgement's δ."""
    if not question_path(r).exists():
        return
    question = r.ws.read_message(question_path(r), ScoreQuestion.from_bytes)
    labels = sorted(question.variants)
    answers, faults, evaluators, answered = _scores(r, "first", labels, _panel(r), answer_path)
    verdict, stage = checks(r), {"stage": list(r.stage), "faults": faults, "banks": {},
                                 "masked": secure.masked(r)}
    judged = r.ws.read_json(judged_path(r))  # as proposed: a re-run of the gate judges the same banks
    banks, paired = judged["banks"], judged["second_pass"]
    for bank in banks:
        row = _named(_judge(r, answers, labels, evaluators(bank), WITH_ALL, _without(bank)), answered)
        if answers:
            with_all, without = _pooled(answers, labels, evaluators(), WITH_ALL, _without(bank))
            row["contribution"] = with_all - without
        stage["banks"][bank] = row
    over = sorted((b for b in banks if _excess(stage["banks"][b]) > 0),
                  key=lambda b: (-_excess(stage["banks"][b]), b))
    refused = [_refusal(r, b, stage["banks"][b], "first pass") for b in (over[:1] if paired else over)]
    worst = over[0] if over else None
    if paired and worst is not None and _without(worst) in labels:  # second pass: the pool without the worst
        if not pairs_question_path(r).exists():
            _ask_pairs(r, worst, answered)
        pair_labels = sorted(ScoreQuestion.from_bytes(pairs_question_path(r).read_bytes()).variants)
        pairs, pair_faults, pair_evaluators, pair_answered = _scores(r, PAIRS, pair_labels,
                                                                     judged["pairs"]["asked"], pairs_answer_path)
        stage["faults"] += [{**x, "question": PAIRS} for x in pair_faults]
        stage["second_question"] = judged["pairs"]
        for bank in (b for b in banks if b != worst):
            row = _named(_judge(r, pairs, pair_labels, pair_evaluators(bank, worst), _without(worst),
                                _without(bank, worst)), pair_answered)
            stage["banks"][bank]["second_pass"] = {"without": worst, **row}
            if _excess(row) > 0:
                refused.append(_refusal(r, bank, row, f"second pass, without {worst}"))
    stage["refused"] = [x["bank"] for x in refused]
    if refused:
        names = {x["bank"] for x in refused}
        earlier = [x for x in verdict["rejections"] if not (x["check"] == REFUSED and x["bank"] in banks)]
        r.ws.write_json({"participants": [b for b in verdict["participants"] if b not in names],
                         "rejections": earlier + refused,
                         "stage_accepted": [b for b in verdict["stage_accepted"] if b not in names]},
                        r.path("checks"))
    record = records.read_acceptance(r.ws, r.round_id)
    record["stages"] = [s for s in record["stages"] if s["stage"] != stage["stage"]] + [stage]
    r.ws.write_json(record, records.acceptance_path(r.ws, r.round_id))
