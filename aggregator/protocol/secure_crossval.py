"""Masked cross-evaluation: the aggregator learns each local model's histograms pooled at the other banks only.

With ``crossval_masked`` on (the default), ``crossval.run_with`` asks the scoring question under secure
aggregation (``pooled``), like the round's evaluation and acceptance:

* a session named ``<federation>/crossval/<pass>/attempt-<k>/<nonce>`` and a ``KeyRequest`` for its banks
  (``keys``: each bank answers a signed ephemeral key offer);
* the plain question plus the session's well-formed offers (fewer than ``max(3, min_banks)`` offering banks
  fail by name, ``too_few_parties``); each bank answers ONE ``MaskedScoreAnswer``: per local model its score
  histograms on its holdout as pairwise-masked words, **zeros in its own model's slot**;
* per model, the wrapping sum of every session bank's words, decoded: that model's histograms pooled at every
  session bank but its owner. Used only when every bank of the session answered, the counts are non-negative
  and their total is exactly the pooled banks' planned holdout rows. A bank missing or malformed: a new
  attempt with the banks that answered, under a new session (at most ``MAX_ATTEMPTS``, never below the quorum);
  else the cross-evaluation fails by name. Never a wrong sum. (A malformed answer also excludes its bank, as a
  malformed clear answer does: ``crossval.decide_masked``.)

No differencing: each sum is of a different model. The bank enforces that (``bank_node.acceptance``): every
variant is one session bank's whole local model, named by that bank, which checks that the model under its
name is the one it sent. So a bank's model is asked only while the bank is in the session: the model of a bank
that left it (no offer, no answer) is not judged (``crossval.decide_masked`` treats it as a bank without a
model: ``crossval_require_model`` decides). An attempt's session is kept in its folder and used again while
the question and banks are the same (the service re-runs a cross-evaluation after a restart; its answered
tasks stay answered).
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.plan import Plan
from aggregator.protocol.secure_evaluation import offer_faults, relayed_offers
from aggregator.protocol.state import Exchange
from aggregator.protocol.workspace import Workspace
from fedfraud.crosscheck import MaskedScoreAnswer, ScoreQuestion
from fedfraud.protocol import TaskKind
from fedfraud.scores import BINS
from fedfraud.secagg.masking import (
    SecureAggregationError, decode_counts, unmasked_sum, words_from_text,
)
from fedfraud.wire import EvaluationReport, KeyRequest, WireFormatError
from pipelines.io import write_bytes

MAX_ATTEMPTS = 3
INVALID = "masked_crossval_answer_invalid"  # an answer that arrived and cannot enter the sum: its bank is excluded
POOL = "others"  # the evaluator of a masked cross-evaluation figure: every session bank but the model's owner


@dataclass(frozen=True)
class Pools:
    """Each model's histograms pooled at the session's other banks; who answered; who was left out, by name."""

    banks: list[str]
    reports: dict[str, EvaluationReport]
    faults: list[dict[str, str]]

    def pooled_at(self, model: str) -> list[str]:
        return [b for b in self.banks if b != model]


def only(question: ScoreQuestion, models: list[str]) -> ScoreQuestion:
    """The plain question restricted to ``models``."""
    return ScoreQuestion(0, "crossval", {m: question.variants[m] for m in models},
                         {m: question.models[m] for m in models})


def pooled(ws: Workspace, plan: Plan, folder: Path, name: str, plain: ScoreQuestion, banks: list[str],
           ask: Callable[[list[Exchange]], None]) -> Pools:
    """``plain`` asked masked of ``banks``, attempt after attempt until every masking bank answered; the
    decoded pools (kept in ``folder/<name>/pools.json``), or ``RoundFailed`` naming why not."""
    root, history = folder / name, []
    banks = sorted(banks)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        if len(banks) < plan.masking_quorum:
            raise RoundFailed(f"cross-evaluation: too_few_parties: {len(banks)} bank(s) for a masked "
                              f"cross-evaluation ({name}, attempt {attempt}), at least {plan.masking_quorum} needed; "
                              f"left out: {history}")
        here, part = root / f"attempt-{attempt}", f"crossval-{name}-{attempt}"
        session = _session(ws, plan, here, name, attempt, plain.digest(), banks)
        ask([Exchange(TaskKind.KEYS, b, here / "request.json", here / "offers" / f"{b}.json", part) for b in banks])
        offers, invalid = relayed_offers(here, banks, session)
        faults = offer_faults(banks, offers, invalid, f"{name} attempt {attempt}")
        masking = sorted(offers)
        if len(masking) < plan.masking_quorum:
            raise RoundFailed(f"cross-evaluation: too_few_parties: {len(masking)} key offer(s) of {len(banks)} "
                              f"banks, at least {plan.masking_quorum} needed; faults: {faults}")
        labels = [m for m in sorted(plain.variants) if m in masking]  # a model is asked only with its bank
        asked = only(plain, labels)
        question = dataclasses.replace(asked, masking={"session": session, "banks": masking, "offers": offers})
        write_bytes(question.to_bytes(), here / "question.json")
        ask([Exchange(TaskKind.CROSSVAL, b, here / "question.json", here / "answers" / f"{b}.json", part + "-masked")
             for b in masking])
        uploads, answered = [], []
        for bank in masking:
            path = here / "answers" / f"{bank}.json"
            if not path.exists():
                faults.append({"bank": bank, "check": "masked_crossval_answer_missing", "detail": f"{name} attempt "
                                                                                                  f"{attempt}"})
                continue
            try:
                uploads.append(_answer(path, bank, session, asked.digest(), labels))
                answered.append(bank)
            except (WireFormatError, SecureAggregationError) as exc:
                faults.append({"bank": bank, "check": INVALID, "detail": str(exc)[:300]})
        history += faults
        if answered == masking:
            reports = {m: _decoded(plan, [u[m] for u in uploads], [b for b in answered if b != m], m)
                       for m in labels}
            pools = Pools(answered, reports, history)
            ws.write_json({"banks": pools.banks, "faults": pools.faults,
                           "reports": {m: asdict(r) for m, r in reports.items()}}, root / "pools.json")
            return pools
        banks = answered
    raise RoundFailed(f"cross-evaluation: masked_crossval_incomplete: no attempt of {name} was answered by every "
                      f"bank asked ({MAX_ATTEMPTS} attempts at most); left out: {history}")


def _session(ws: Workspace, plan: Plan, here: Path, name: str, attempt: int, digest: str, banks: list[str]) -> str:
    """The attempt's session: the one kept in ``here`` if it was opened for the same question and banks, else a
    new one with a fresh nonce (its key request written for the banks)."""
    kept = here / "session.json"
    if kept.exists():
        state = ws.read_json(kept)
        if state.get("question") == digest and state.get("banks") == banks:
            return state["session"]
    session = f"{plan.federation_id}/crossval/{name}/attempt-{attempt}/{secrets.token_hex(8)}"
    write_bytes(KeyRequest(session, banks).to_bytes(), here / "request.json")
    ws.write_json({"session": session, "question": digest, "banks": banks}, kept)
    return session


def _answer(path: Path, bank: str, session: str, digest: str, labels: list[str]) -> dict[str, np.ndarray]:
    answer = MaskedScoreAnswer.from_bytes(path.read_bytes())
    expected = {"bank": bank, "round_id": 0, "purpose": "crossval", "session": session, "question": digest}
    for field, value in expected.items():
        if getattr(answer, field) != value:
            raise WireFormatError(f"the answer's {field} is {str(getattr(answer, field))[:80]!r}, expected {value!r}")
    if not isinstance(answer.words, dict) or sorted(answer.words) != labels:
        raise WireFormatError("the answer's models are not the question's")
    return {label: words_from_text(answer.words[label], 2 * BINS) for label in labels}


def _decoded(plan: Plan, uploads: list[np.ndarray], pooled_at: list[str], model: str) -> EvaluationReport:
    """``model``'s pooled histograms, if the sum is counts of exactly ``pooled_at``'s planned holdouts (their rows;
    their positives when they are the plan's banks, from the masked planning counts); else
    ``RoundFailed`` (``masked_sum_invalid``: a bank masked with other keys, or lied)."""
    try:
        counts = decode_counts(unmasked_sum(uploads))
    except SecureAggregationError as exc:
        raise RoundFailed(f"cross-evaluation: masked_sum_invalid: {model}'s sum is not counts ({exc})") from None
    pos, neg = counts[:BINS], counts[BINS:]
    planned = [plan.counts.get(b) for b in pooled_at]
    if any(c is None for c in planned):
        raise RoundFailed(f"cross-evaluation: masked_sum_unverifiable: the plan holds no holdout counts of "
                          f"{[b for b, c in zip(pooled_at, planned) if c is None]}")
    rows = sum(c["holdout_rows"] for c in planned)  # no bank's positives are known: they are summed masked
    if int(pos.sum()) + int(neg.sum()) != rows:
        raise RoundFailed(f"cross-evaluation: masked_sum_invalid: {model}'s sum holds {int(pos.sum() + neg.sum())} "
                          f"rows, the holdouts of {pooled_at} {rows}")
    sums = plan.label_sums
    if sums is not None and sorted(pooled_at) == sums["banks"] and int(pos.sum()) != sums["holdout_positives"]:
        raise RoundFailed(f"cross-evaluation: masked_sum_invalid: {model}'s sum holds {int(pos.sum())} positives, "
                          f"the masked planning counts of {pooled_at} {sums['holdout_positives']}")
    return EvaluationReport(POOL, model, int(pos.sum()), int(neg.sum()), {}, pos.tolist(), neg.tolist())
