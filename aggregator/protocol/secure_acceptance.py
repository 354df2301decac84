"""Masked acceptance: a stage's acceptance scores reach the aggregator only as sums over the session's banks.

With ``acceptance_masked`` on (the default), each acceptance question (``acceptance.propose``'s, and
the second question after a first-pass refusal) is asked under secure aggregation, with **one key
agreement per round** (a cyclic round's n turns share it):

* ``open_session`` (from ``propose`` / the gate): the round's key session (``<federation>/round-<r>/
  accept/<nonce>``, opened by the round's first proposal, a new one each time its first stage is proposed)
  and, per question and attempt, a *label* ``stage-<turn>/<question>/attempt-<n>/<nonce>``;
* ``accept_keys`` (bank): once per round, each bank answers a signed ephemeral key offer
  (``fedfraud.secagg.keys``); later turns and re-runs ask nothing here;
* ``relay_accept`` (aggregator): the plain question with the session, the label and its banks; a bank gets
  the round's well-formed offers with it until it has answered a question that carried them (then it holds
  them: each offer reaches each bank once per round). Fewer than ``max(3, min_banks)`` offering banks
  fail the round by name;
* ``accept`` (bank, ``bank_node.acceptance_keys``): every variant's histograms as words masked under keys
  of the label (``MaskedScoreAnswer``); the bank refuses another question or bank list under a label it
  answered (``mask_reuse``);
* ``tally`` (the gate): per variant, the wrapping sum of every label bank's words, decoded; used only
  when every bank answered, the counts are non-negative and their totals are the banks' planned
  holdout counts. A bank missing or malformed: a new attempt with the banks that answered, under a new
  label (``PhaseRerun("accept_keys")``, which asks no key again), at most ``MAX_ATTEMPTS``, never below
  the quorum; else the round fails by name. Never a wrong sum. Why a re-run's masks cancel and cannot
  be combined with the aborted attempt's: ``bank_node.acceptance_keys``.

The gate then judges each update on the variants' histograms pooled at *every* session bank, the
judged bank's own holdout included. Leave-one-out pools ("at the others") cannot be masked: the sums
of one vector over every all-but-one subset give each bank's vector by differencing, so masking them
would hide nothing. Every sum here is over one bank set, each of a different variant.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from aggregator.protocol.errors import PhaseRerun, RoundFailed
from aggregator.protocol.secure_evaluation import decoded, offer_faults, relayed_offers
from aggregator.protocol.state import Exchange, Node, RoundState, answer_tolerantly
from fedfraud.crosscheck import MaskedScoreAnswer, ScoreQuestion
from fedfraud.protocol import StrategyName, TaskKind
from fedfraud.scores import BINS
from fedfraud.secagg.masking import SecureAggregationError, words_from_text
from fedfraud.wire import EvaluationReport, KeyRequest, WireFormatError
from pipelines.io import write_bytes

MAX_ATTEMPTS = 3
POOL = "pooled"  # the one evaluator of a masked judgement: every session bank's holdout, summed


def masked(r: RoundState) -> bool:
    return (r.plan.settings.acceptance and r.plan.settings.acceptance_masked
            and r.plan.strategy in (StrategyName.BAGGING, StrategyName.CYCLIC))


def stage_folder(r: RoundState) -> Path:
    return r.ws.round_dir(r.round_id) / "acceptance" / f"stage-{r.stages().index(r.stage)}"


def _state_path(r: RoundState) -> Path:
    return stage_folder(r) / "secagg" / "session.json"


def state(r: RoundState) -> dict | None:
    """The live attempt: ``question`` (its name and ``plain`` path), ``attempt``, ``session`` (the round's key
    session), ``label``, ``banks`` asked, ``masking`` (those with a key of the round), ``sent_offers`` (who gets
    the offers with it), ``history`` of earlier attempts; None when none is open."""
    path = _state_path(r)
    return r.ws.read_json(path) if masked(r) and path.exists() else None


def _attempt_folder(r: RoundState, s: dict) -> Path:
    return stage_folder(r) / "secagg" / s["question"] / f"attempt-{s['attempt']}"


def reset(r: RoundState) -> None:
    """Forget the stage's labels and sums (a new proposal); the round's first stage: its key session too."""
    shutil.rmtree(stage_folder(r) / "secagg", ignore_errors=True)
    if r.stages().index(r.stage) == 0:
        shutil.rmtree(_keys_folder(r), ignore_errors=True)


def _keys_folder(r: RoundState) -> Path:
    return r.ws.round_dir(r.round_id) / "acceptance" / "keys"


def round_keys(r: RoundState) -> dict | None:
    """The round's key session: ``session``, ``banks`` asked, ``masking`` (who offered, after the relay),
    ``offer_faults`` and ``holding`` (the banks that answered a question carrying the offers); None before."""
    path = _keys_folder(r) / "session.json"
    return r.ws.read_json(path) if path.exists() else None


def _write_round_keys(r: RoundState, k: dict) -> None:
    r.ws.write_json(k, _keys_folder(r) / "session.json")


def _open_round_keys(r: RoundState) -> dict:
    k = {"session": f"{r.plan.federation_id}/round-{r.round_id}/accept/{secrets.token_hex(8)}",
         "banks": sorted(r.banks), "holding": []}
    write_bytes(KeyRequest(k["session"], k["banks"]).to_bytes(), _keys_folder(r) / "request.json")
    _write_round_keys(r, k)
    return k


def pooled(r: RoundState, question: str, labels: list[str]
           ) -> tuple[dict[str, EvaluationReport], list[str], list[dict[str, str]]]:
    """``question``'s variants pooled at every bank that answered it, those banks, and the faults named on the
    way; tallied once (then kept), a re-run or a named failure while a bank's answer is missing."""
    path = stage_folder(r) / "secagg" / question / "pooled.json"
    if not path.exists():
        s = state(r)
        if s is None or s["question"] != question:
            raise RuntimeError(f"no masked acceptance session is open for the {question} question")
        reports, faults = tally(r, labels)
        r.ws.write_json({"banks": s["masking"], "faults": faults,
                         "reports": {label: asdict(report) for label, report in reports.items()}}, path)
    kept = r.ws.read_json(path)
    return ({label: EvaluationReport(**report) for label, report in kept["reports"].items()}, kept["banks"],
            kept["faults"])


def open_session(r: RoundState, question: str, plain: Path, banks: list[str], history: list[dict] | None = None
                 ) -> None:
    """A new attempt for ``question`` (first attempt when ``history`` is None) with ``banks``, under a new label
    of the round's key session (opened here by the round's first question)."""
    earlier = state(r)
    attempt = 1 if history is None else earlier["attempt"] + 1
    if len(banks) < r.plan.masking_quorum:
        raise RoundFailed(f"round {r.round_id}: too_few_parties: {len(banks)} bank(s) for a masked acceptance, "
                          f"at least {r.plan.masking_quorum} needed")
    k = round_keys(r) or _open_round_keys(r)
    label = f"stage-{r.stages().index(r.stage)}/{question}/attempt-{attempt}/{secrets.token_hex(8)}"
    s = {"question": question, "plain": str(plain), "attempt": attempt, "session": k["session"], "label": label,
         "banks": sorted(banks), "history": history or []}
    _attempt_folder(r, s).mkdir(parents=True, exist_ok=True)
    r.ws.write_json(s, _state_path(r))


def _part(s: dict, r: RoundState) -> str:
    return f"accept-{r.stages().index(r.stage)}-{s['question']}-{s['attempt']}"


def keys_banks(r: RoundState) -> list[str]:
    """The round's banks, asked for a key once per round: none once the round's offers are relayed."""
    s, k = state(r), round_keys(r)
    return list(k["banks"]) if s and k and "masking" not in k else []


def keys_exchanges(r: RoundState, bank: str) -> list[Exchange]:
    k, folder = round_keys(r), _keys_folder(r)
    return [Exchange(TaskKind.KEYS, bank, folder / "request.json", folder / "offers" / f"{bank}.json",
                     f"accept-keys-{k['session'].rsplit('/', 1)[-1]}")]


def keys(r: RoundState, nodes: dict[str, Node]) -> None:
    answer_tolerantly(r, nodes, keys_banks, keys_exchanges, "offer a key for acceptance")


def _round_offers(r: RoundState, k: dict) -> dict[str, dict]:
    offers, invalid = relayed_offers(_keys_folder(r), k["banks"], k["session"])
    if "masking" not in k:
        k["masking"], k["offer_faults"] = sorted(offers), offer_faults(k["banks"], offers, invalid, "round keys")
        _write_round_keys(r, k)
    return {b: offers[b] for b in k["masking"] if b in offers}


def relay(r: RoundState) -> None:
    """The plain question with the session, the label and its banks (those of the attempt that offered a key
    this round); with the round's offers for the banks that do not hold them yet."""
    s = state(r)
    if s is None:
        return
    k = round_keys(r)
    offers = _round_offers(r, k)
    if len(offers) < r.plan.masking_quorum:
        raise RoundFailed(f"round {r.round_id}: too_few_parties: {len(offers)} acceptance key offer(s) of "
                          f"{len(k['banks'])} banks, at least {r.plan.masking_quorum} needed; "
                          f"faults: {k['offer_faults']}")
    banks = [b for b in s["banks"] if b in offers]
    s["masking"] = banks
    s["offer_faults"] = [f for f in k["offer_faults"] if f["bank"] in s["banks"]]
    s["sent_offers"] = [b for b in banks if b not in k["holding"]]
    r.ws.write_json(s, _state_path(r))
    if len(banks) < r.plan.masking_quorum:
        raise RoundFailed(f"round {r.round_id}: too_few_parties: {len(banks)} bank(s) with a key of the round "
                          f"for attempt {s['attempt']}, at least {r.plan.masking_quorum} needed")
    plain = r.ws.read_message(Path(s["plain"]), ScoreQuestion.from_bytes)
    masking = {"session": s["session"], "label": s["label"], "banks": banks}
    folder = _attempt_folder(r, s)
    for name, with_offers in (("question.json", True), ("question-by-reference.json", False)):
        if any((b in s["sent_offers"]) == with_offers for b in banks):
            body = {**masking, "offers": offers} if with_offers else masking
            write_bytes(ScoreQuestion(plain.round_id, plain.purpose, plain.variants, plain.models, body).to_bytes(),
                        folder / name)


def question_digest(data: bytes) -> str:
    """What the banks' masked answers to the question ``data`` are bound to (``ScoreQuestion.digest``)."""
    return ScoreQuestion.from_bytes(data).digest()


def asked(r: RoundState) -> list[str]:
    s = state(r)
    return list(s.get("masking", [])) if s else []


def question_exchange(r: RoundState, bank: str) -> Exchange:
    """The attempt's question for ``bank``: with the round's offers until it holds them, else by reference."""
    s = state(r)
    folder = _attempt_folder(r, s)
    name = "question.json" if bank in s.get("sent_offers", [bank]) else "question-by-reference.json"
    return Exchange(TaskKind.ACCEPT, bank, folder / name, folder / "answers" / f"{bank}.json",
                    _part(s, r) + "-masked")


def tally(r: RoundState, labels: list[str]) -> tuple[dict[str, EvaluationReport], list[dict[str, str]]]:
    """Each variant's histograms pooled at every session bank (as one report), and every bank left out of an
    attempt, by name; a re-run or a named failure when a bank's answer cannot enter the sum."""
    s = state(r)
    folder, digest = _attempt_folder(r, s), r.ws.read_message(Path(s["plain"]), question_digest)
    uploads: dict[str, list[np.ndarray]] = {label: [] for label in labels}
    answered, faults = [], list(s.get("offer_faults", []))
    for bank in s["masking"]:
        try:
            words = _answer(folder / "answers" / f"{bank}.json", bank, s, digest, labels)
        except (WireFormatError, SecureAggregationError) as exc:
            faults.append({"bank": bank, "check": "masked_acceptance_answer_invalid", "detail": str(exc)[:300]})
            continue
        answered.append(bank)
        for label in labels:
            uploads[label].append(words[label])
    k = round_keys(r)  # a bank whose masked answer is valid derived the round's keys: it holds the offers
    k["holding"] = sorted(set(k["holding"]) | set(answered))
    _write_round_keys(r, k)
    if answered != s["masking"]:
        _rerun_or_fail(r, s, answered, faults)
    reports = {}
    for label in labels:
        pos, neg = decoded(r, uploads[label], answered, f"acceptance {label}")
        reports[label] = EvaluationReport(POOL, label, int(pos.sum()), int(neg.sum()), {}, pos.tolist(), neg.tolist())
    return reports, [f for h in [*s["history"], {"faults": faults}] for f in h.get("faults", [])]


def _answer(path: Path, bank: str, s: dict, digest: str, labels: list[str]) -> dict[str, np.ndarray]:
    if not path.exists():
        raise WireFormatError("no masked acceptance answer arrived")
    answer = MaskedScoreAnswer.from_bytes(path.read_bytes())
    expected = {"bank": bank, "session": s["session"], "label": s["label"], "question": digest, "purpose": "accept"}
    for name, value in expected.items():
        if getattr(answer, name) != value:
            raise WireFormatError(f"the answer's {name} is {str(getattr(answer, name))[:80]!r}, expected {value!r}")
    if not isinstance(answer.words, dict) or sorted(answer.words) != labels:
        raise WireFormatError("the answer's variants are not the question's")
    return {label: words_from_text(answer.words[label], 2 * BINS) for label in labels}


def _rerun_or_fail(r: RoundState, s: dict, answered: list[str], faults: list[dict]) -> None:
    missing = sorted(set(s["masking"]) - set(answered))
    if s["attempt"] >= MAX_ATTEMPTS or len(answered) < r.plan.masking_quorum:
        raise RoundFailed(f"round {r.round_id}: masked_acceptance_incomplete: {missing} did not answer attempt "
                          f"{s['attempt']} of the {s['question']} question; {len(answered)} left (at least "
                          f"{r.plan.masking_quorum} needed, {MAX_ATTEMPTS} attempts at most)")
    history = [*s["history"], {"attempt": s["attempt"], "session": s["session"], "label": s["label"],
                               "banks": s["banks"], "masking": s["masking"], "answered": answered, "faults": faults}]
    open_session(r, s["question"], Path(s["plain"]), answered, history)
    raise PhaseRerun("accept_keys", f"{missing} did not answer acceptance attempt {s['attempt']}; attempt "
                                    f"{s['attempt'] + 1} with {answered} under a fresh label")
