"""The round's evaluation under secure aggregation: the aggregator learns the pooled histograms only.

Phases (declared in ``phases.ROUND`` after ``candidate``):

* ``session`` (aggregator): opens attempt 1 — a session id naming federation, round, phase, attempt
  and a random nonce (never reused, even when a federation is run again) — and asks every bank of
  the round for a key offer (``KeyRequest``);
* ``keys`` (bank): each bank answers a signed ephemeral key offer (``fedfraud.secagg.keys``);
* ``relay`` (aggregator): the well-formed offers of the session's banks go, unchanged, into each
  masked evaluation task (candidate, and the champion when there is one); fewer than
  ``max(3, min_banks)`` offering banks fail the round by name (``too_few_parties``);
* ``evaluate`` (bank): each bank answers its score histograms as pairwise-masked words;
* ``tally`` (``registry.register_and_promote`` calls it): the wrapping sum of every answer, decoded.
  It is used only when every bank of the session answered, the decoded counts are non-negative and
  their totals equal the banks' planned holdout rows (and, over the plan's banks, the holdout positives
  the masked planning counts summed). A bank missing or malformed: the phase is
  re-run from ``keys`` with the banks that answered, under a new session (``PhaseRerun``), at most
  ``MAX_ATTEMPTS`` times and never below ``max(3, min_banks)``; otherwise the round fails by name.
  Never a wrong sum.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.evaluation import metric_problem
from aggregator.protocol.errors import PhaseRerun, RoundFailed
from aggregator.protocol.state import Exchange, Node, RoundState, answer_tolerantly
from fedfraud.protocol import TaskKind
from fedfraud.scores import BINS
from fedfraud.secagg.masking import (
    MIN_PARTIES, SecureAggregationError, decode_counts, unmasked_sum, words_from_text,
)
from fedfraud.wire import KeyRequest, MaskedEvaluation, MaskedEvaluationTask, SessionOffer, WireFormatError
from pipelines.io import write_bytes

MAX_ATTEMPTS = 3
PURPOSES = {"candidate": ("model", TaskKind.EVALUATE, "evaluations"),
            "champion": ("champion", TaskKind.EVALUATE_CHAMPION, "champion_evaluations")}


def _root(r: RoundState) -> Path:
    return r.ws.round_dir(r.round_id) / "secagg"


def record(r: RoundState) -> dict:
    """The round's attempts so far: ``attempt``, ``session``, ``banks`` asked, ``masking`` (who offered)."""
    path = _root(r) / "attempts.json"
    return r.ws.read_json(path) if path.exists() else {"attempt": 0, "history": []}


def _folder(r: RoundState) -> Path:
    return _root(r) / f"attempt-{record(r)['attempt']}"


def _open_attempt(r: RoundState, banks: list[str], history: list[dict]) -> None:
    attempt = record(r)["attempt"] + 1
    if len(banks) < r.plan.masking_quorum:
        raise RoundFailed(f"round {r.round_id}: too_few_parties: {len(banks)} bank(s) for a masked evaluation, "
                          f"at least {r.plan.masking_quorum} needed ({MIN_PARTIES} for masking, min_banks "
                          f"{r.plan.settings.min_banks})")
    session = f"{r.plan.federation_id}/round-{r.round_id}/evaluate/attempt-{attempt}/{secrets.token_hex(8)}"
    state = {"attempt": attempt, "session": session, "banks": sorted(banks), "history": history}
    r.ws.write_json(state, _root(r) / "attempts.json")
    write_bytes(KeyRequest(session, sorted(banks)).to_bytes(), _folder(r) / "request.json")


def open_session(r: RoundState) -> None:
    """Attempt 1: every bank of the round is asked for a key offer."""
    r.ws.write_json({"attempt": 0, "history": []}, _root(r) / "attempts.json")
    _open_attempt(r, list(r.banks), [])


def _part(r: RoundState) -> str:
    attempt = record(r)["attempt"]
    return "" if attempt <= 1 else f"attempt-{attempt}"


def keys_banks(r: RoundState) -> list[str]:
    return list(record(r).get("banks", []))


def keys_exchanges(r: RoundState, bank: str) -> list[Exchange]:
    folder = _folder(r)
    return [Exchange(TaskKind.KEYS, bank, folder / "request.json", folder / "offers" / f"{bank}.json", _part(r))]


def keys(r: RoundState, nodes: dict[str, Node]) -> None:
    r.on_progress(f"round {r.round_id}: key offers from {len(keys_banks(r))} banks")
    answer_tolerantly(r, nodes, keys_banks, keys_exchanges, "offer a key")


def relayed_offers(folder: Path, banks: list[str], session: str) -> tuple[dict[str, dict], list[dict[str, str]]]:
    """The well-formed offers in ``folder/offers/`` of ``banks`` for ``session``, as sent, and each malformed
    one named (``key_offer_invalid``); a bank with no offer is in neither."""
    offers, faults = {}, []
    for bank in banks:
        path = folder / "offers" / f"{bank}.json"
        if not path.exists():
            continue
        try:
            offers[bank] = SessionOffer.relayable(path.read_bytes(), bank, session)
        except WireFormatError as exc:
            faults.append({"bank": bank, "check": "key_offer_invalid", "detail": str(exc)[:300]})
    return offers, faults


def offer_faults(banks: list[str], offers: dict[str, dict], invalid: list[dict[str, str]], detail: str
                 ) -> list[dict[str, str]]:
    """Each bank of ``banks`` without a relayed offer, in bank order: its malformed offer's fault (``invalid``,
    from ``relayed_offers``), else ``key_offer_missing`` with ``detail``."""
    by_bank = {f["bank"]: f for f in invalid}
    missing = {"check": "key_offer_missing", "detail": detail}
    return [by_bank.get(b, {"bank": b, **missing}) for b in banks if b not in offers]


def relay(r: RoundState) -> None:
    """The offers, as sent, into every masked evaluation task; a bank without a well-formed offer is left out."""
    state, folder = record(r), _folder(r)
    offers, faults = relayed_offers(folder, state["banks"], state["session"])
    state["masking"], state["offer_faults"] = sorted(offers), faults
    r.ws.write_json(state, _root(r) / "attempts.json")
    if len(offers) < r.plan.masking_quorum:
        raise RoundFailed(f"round {r.round_id}: too_few_parties: {len(offers)} key offer(s) of "
                          f"{len(state['banks'])} banks, at least {r.plan.masking_quorum} needed; faults: {faults}")
    for purpose, (source, _, _) in PURPOSES.items():
        task_path = folder / f"{purpose}.json"
        task_path.unlink(missing_ok=True)
        if r.path(source).exists():
            model = r.ws.read_json(r.path(source))
            task = MaskedEvaluationTask(state["session"], purpose, sorted(offers), offers, model)
            write_bytes(task.to_bytes(), task_path)


def evaluate_banks(r: RoundState) -> list[str]:
    return list(record(r).get("masking", []))


def evaluation_exchanges(r: RoundState, bank: str) -> list[Exchange]:
    folder = _folder(r)
    return [Exchange(kind, bank, folder / f"{purpose}.json", folder / answers / f"{bank}.json", _part(r))
            for purpose, (_, kind, answers) in PURPOSES.items() if (folder / f"{purpose}.json").exists()]


def evaluate(r: RoundState, nodes: dict[str, Node]) -> None:
    """Every masking bank scores its holdout and answers masked; one that cannot is left out (and re-run)."""
    r.on_progress(f"round {r.round_id}: masked evaluation at {len(evaluate_banks(r))} banks")
    answer_tolerantly(r, nodes, evaluate_banks, evaluation_exchanges, "evaluate")


@dataclass(frozen=True)
class Tally:
    """The decoded pooled histograms per purpose, the metrics banks shared, and named faults."""

    banks: list[str]
    histograms: dict[str, tuple[np.ndarray, np.ndarray]]
    metrics: dict[str, dict[str, dict[str, float]]]  # purpose -> bank -> metrics (sharing banks only)
    rejections: list[dict[str, str]]


class AnswerRefused(ValueError):
    """A bank's masked answer that cannot enter the sum; ``check`` names why."""

    def __init__(self, check: str, detail: str):
        super().__init__(detail)
        self.check = check


def _answer(r: RoundState, bank: str, purpose: str, session: str) -> tuple[np.ndarray, dict[str, float]]:
    source, _, answers = PURPOSES[purpose]
    path = _folder(r) / answers / f"{bank}.json"
    if not path.exists():
        raise AnswerRefused("masked_evaluation_missing", f"no {purpose} evaluation arrived")
    try:
        answer = MaskedEvaluation.from_bytes(path.read_bytes())
    except WireFormatError as exc:
        raise AnswerRefused("masked_evaluation_malformed", str(exc)) from None
    model_id = r.ws.model_id_of(r.path(source))  # once per model, not once per bank
    named = {"wrong_sender": (answer.bank, bank), "wrong_session": (answer.session, session),
             "wrong_purpose": (answer.purpose, purpose), "wrong_model": (answer.model_id, model_id)}
    for check, (got, expected) in named.items():
        if got != expected:
            raise AnswerRefused(f"masked_evaluation_{check}", f"{purpose}: {str(got)[:80]!r}, expected {expected!r}")
    if problem := metric_problem(answer.metrics):
        raise AnswerRefused("masked_evaluation_metrics", problem)
    try:
        return words_from_text(answer.words, 2 * BINS), dict(answer.metrics)
    except SecureAggregationError as exc:
        raise AnswerRefused("masked_evaluation_words", str(exc)) from None


def tally(r: RoundState) -> Tally:
    """The pooled histograms from the masked answers; a re-run or a named failure, never a wrong sum."""
    state = record(r)
    session, banks = state["session"], state["masking"]
    purposes = [p for p in PURPOSES if (_folder(r) / f"{p}.json").exists()]
    words: dict[str, list[np.ndarray]] = {p: [] for p in purposes}
    metrics: dict[str, dict[str, dict[str, float]]] = {p: {} for p in purposes}
    answered, faults = [], []
    for bank in banks:
        try:
            parsed = {p: _answer(r, bank, p, session) for p in purposes}
        except AnswerRefused as exc:
            faults.append({"bank": bank, "check": exc.check, "detail": str(exc)[:300]})
            continue
        answered.append(bank)
        for p, (upload, shared) in parsed.items():
            words[p].append(upload)
            if shared:
                metrics[p][bank] = shared
    if answered != banks:
        _rerun_or_fail(r, state, answered, faults)
    histograms = {p: decoded(r, words[p], banks, p) for p in purposes}
    return Tally(banks, histograms, metrics, _named_faults(state))


def _named_faults(state: dict) -> list[dict[str, str]]:
    """Every bank left out of an attempt, by name: no offer, a malformed offer, no or a malformed answer."""
    faults = []
    for attempt in [*state["history"], {"attempt": state["attempt"], "banks": state["banks"],
                                        "masking": state["masking"], "faults": state.get("offer_faults", [])}]:
        faults += attempt.get("faults", [])
        faults += [{"bank": b, "check": "key_offer_missing", "detail": f"no key offer in attempt {attempt['attempt']}"}
                   for b in attempt.get("banks", []) if "masking" in attempt and b not in attempt["masking"]
                   and b not in {f["bank"] for f in attempt.get("faults", [])}]
    return faults


def decoded(r: RoundState, uploads: list[np.ndarray], banks: list[str], purpose: str
            ) -> tuple[np.ndarray, np.ndarray]:
    """The sum's counts (positives', negatives' histograms) if they are counts of exactly the banks' planned
    holdouts — their rows as the summaries declared them, and, when the session's banks are the plan's, their
    positives as the masked planning counts summed them; else the round fails by name (masked evaluation and
    masked acceptance alike)."""
    try:
        counts = decode_counts(unmasked_sum(uploads))
    except SecureAggregationError as exc:
        raise RoundFailed(f"round {r.round_id}: masked_sum_invalid: the {purpose} sum of {banks} is not counts "
                          f"({exc}); a bank masked with other keys or lied; nothing registered") from None
    pos, neg = counts[:BINS], counts[BINS:]
    planned = [r.plan.counts.get(b) for b in banks]
    if any(c is None for c in planned):
        raise RoundFailed(f"round {r.round_id}: masked_sum_unverifiable: the plan holds no holdout counts of "
                          f"{[b for b, c in zip(banks, planned) if c is None]}")
    rows = sum(c["holdout_rows"] for c in planned)
    if int(pos.sum()) + int(neg.sum()) != rows:
        raise RoundFailed(f"round {r.round_id}: masked_sum_invalid: the {purpose} sum holds "
                          f"{int(pos.sum()) + int(neg.sum())} rows, the banks' planned holdouts {rows}; "
                          "nothing registered")
    sums = r.plan.label_sums
    if sums is not None and sorted(banks) == sums["banks"] and int(pos.sum()) != sums["holdout_positives"]:
        raise RoundFailed(f"round {r.round_id}: masked_sum_invalid: the {purpose} sum holds {int(pos.sum())} "
                          f"positives, the planned banks' masked planning counts {sums['holdout_positives']}; "
                          "nothing registered")
    return pos, neg


def _rerun_or_fail(r: RoundState, state: dict, answered: list[str], faults: list[dict]) -> None:
    history = [*state["history"], {"attempt": state["attempt"], "session": state["session"],
                                   "banks": state["banks"], "masking": state["masking"], "answered": answered,
                                   "faults": state.get("offer_faults", []) + faults}]
    missing = sorted(set(state["masking"]) - set(answered))
    if state["attempt"] >= MAX_ATTEMPTS or len(answered) < r.plan.masking_quorum:
        raise RoundFailed(f"round {r.round_id}: masked_evaluation_incomplete: {missing} did not answer attempt "
                          f"{state['attempt']}; {len(answered)} left (at least {r.plan.masking_quorum} needed, "
                          f"{MAX_ATTEMPTS} attempts at most); nothing registered")
    _open_attempt(r, answered, history)
    raise PhaseRerun("keys", f"{missing} did not answer attempt {state['attempt']}; attempt "
                             f"{state['attempt'] + 1} with {answered} under fresh keys")
