"""The planning counts under secure aggregation: the aggregator learns the planned banks' label sums only.

A summary carries row counts only; ``make_plan`` leaves the plan unsettled (no consortium parameters).
Before anything is trained (cross-evaluation's local models included), ``run_with`` sums the planned
banks' label counts (positives, holdout positives) masked, in round 0:

* attempt 1: a session naming the federation, ``plan``, the bank set, the attempt and a random nonce
  (never reused), and a key request to every planned bank (``TaskKind.KEYS``);
* each bank answers a signed ephemeral key offer (``bank_node.masked_evaluation.make_offer``);
* the well-formed offers are relayed, unchanged, in one ``MaskedCountsTask``; fewer than
  ``max(3, min_banks)`` offering banks fail the federation by name (``too_few_parties``);
* each bank answers ONE ``MaskedCounts``: its two counts as pairwise-masked words (``TaskKind.COUNTS``);
* the wrapping sum of every answer is decoded: used only when every masking bank answered and the
  totals fit the banks' rows. A bank missing or malformed: a new attempt with the banks that answered,
  under a new session and fresh keys, at most ``MAX_ATTEMPTS`` and never below the quorum; else the
  federation fails by name. Never a wrong sum.

The plan is then ``settled`` over the banks summed (a bank left out is named in ``excluded``):
``consortium_params`` come from the decoded sums (negatives = the banks' train rows − positives), so
the models are those of the former plaintext sums. When cross-evaluation excludes banks, the kept
banks' counts are summed again (a new exchange: the bank set names it). What that exposes: the
difference of two decoded sums is the sum of the banks between them (a re-run's dropped bank, or the
banks cross-evaluation excluded) — as for the masked evaluation's re-runs (README).

The records live in ``<federation>/planning/<exchange>/`` (``attempts.json``, one folder per attempt);
``run_with`` is re-runnable: a finished exchange is read back, an unfinished one resumes its attempt.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from pathlib import Path
from typing import Callable

import numpy as np

from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.plan import Plan
from aggregator.protocol.secure_evaluation import offer_faults, relayed_offers
from aggregator.protocol.state import Exchange, Node, asking
from aggregator.protocol.workspace import Workspace
from fedfraud.protocol import TaskKind
from fedfraud.secagg.masking import MIN_PARTIES, SecureAggregationError, decode_counts, unmasked_sum, words_from_text
from fedfraud.wire import MASKED_COUNTS, KeyRequest, MaskedCounts, MaskedCountsTask, WireFormatError
from pipelines.io import write_bytes

log = logging.getLogger("fedfraud.planning")
MAX_ATTEMPTS = 3
Ask = Callable[[list[Exchange]], None]  # the banks answer these exchanges; one that cannot leaves no answer


def exchange_name(banks: list[str]) -> str:
    """One exchange per bank set (the planned banks; after cross-evaluation, the kept ones)."""
    return hashlib.sha256("\n".join(sorted(banks)).encode()).hexdigest()[:12]


class _Exchange:
    """The records of one exchange in the workspace."""

    def __init__(self, ws: Workspace, plan: Plan):
        self.ws, self.plan, self.name = ws, plan, exchange_name(plan.banks)
        self.root = ws.root / "planning" / self.name

    @property
    def path(self) -> Path:
        return self.root / "attempts.json"

    def state(self) -> dict | None:
        return self.ws.read_json(self.path) if self.path.exists() else None

    def folder(self, s: dict) -> Path:
        return self.root / f"attempt-{s['attempt']}"

    def open(self, banks: list[str], history: list[dict]) -> dict:
        attempt = len(history) + 1
        if len(banks) < self.plan.masking_quorum:
            raise RoundFailed(f"planning: too_few_parties: {len(banks)} bank(s) to sum the label counts masked, at "
                              f"least {self.plan.masking_quorum} needed ({MIN_PARTIES} for masking, min_banks "
                              f"{self.plan.settings.min_banks})")
        session = f"{self.plan.federation_id}/plan/{self.name}/attempt-{attempt}/{secrets.token_hex(8)}"
        s = {"attempt": attempt, "session": session, "banks": sorted(banks), "history": history}
        write_bytes(KeyRequest(session, sorted(banks)).to_bytes(), self.folder(s) / "request.json")
        self.ws.write_json(s, self.path)
        return s

    def part(self, s: dict) -> str:
        return f"plan-{self.name}-{s['attempt']}"

    def key_exchanges(self, s: dict) -> list[Exchange]:
        folder = self.folder(s)
        return [Exchange(TaskKind.KEYS, b, folder / "request.json", folder / "offers" / f"{b}.json", self.part(s))
                for b in s["banks"]]

    def relay(self, s: dict) -> dict:
        """The well-formed offers, as sent, in the counts task; a bank without one is left out, by name."""
        folder = self.folder(s)
        offers, invalid = relayed_offers(folder, s["banks"], s["session"])
        s["masking"] = sorted(offers)
        s["offer_faults"] = offer_faults(s["banks"], offers, invalid, f"planning attempt {s['attempt']}")
        self.ws.write_json(s, self.path)
        if len(offers) < self.plan.masking_quorum:
            raise RoundFailed(f"planning: too_few_parties: {len(offers)} key offer(s) of {len(s['banks'])} banks, "
                              f"at least {self.plan.masking_quorum} needed; faults: {s['offer_faults']}")
        write_bytes(MaskedCountsTask(s["session"], sorted(offers), offers).to_bytes(), folder / "task.json")
        return s

    def count_exchanges(self, s: dict) -> list[Exchange]:
        folder = self.folder(s)
        return [Exchange(TaskKind.COUNTS, b, folder / "task.json", folder / "answers" / f"{b}.json", self.part(s))
                for b in s["masking"]]

    def answer(self, s: dict, bank: str) -> np.ndarray:
        path = self.folder(s) / "answers" / f"{bank}.json"
        if not path.exists():
            raise WireFormatError("no masked planning counts arrived")
        answer = MaskedCounts.from_bytes(path.read_bytes())
        if answer.bank != bank or answer.session != s["session"]:
            raise WireFormatError(f"the answer names {str(answer.bank)[:40]} / session {str(answer.session)[:80]}")
        return words_from_text(answer.words, len(MASKED_COUNTS))


def run_with(ws: Workspace, plan: Plan, ask: Ask, on_progress: Callable[[str], None] = lambda m: None) -> Plan:
    """The plan settled on its banks' masked label sums (written to ``plan.json``); a settled plan as it is."""
    if plan.is_settled:
        return plan
    x = _Exchange(ws, plan)
    s = x.state() or x.open(list(plan.banks), [])
    while "sums" not in s:
        on_progress(f"planning: masked label counts of {len(s['banks'])} banks (attempt {s['attempt']})")
        ask(x.key_exchanges(s))
        s = x.relay(s)
        ask(x.count_exchanges(s))
        s = _tally(x, s)
    history = [*s["history"], s]
    left_out = {}
    for bank in plan.banks:
        if bank not in s["answered"]:
            fault = next((f for h in history for f in h.get("faults", []) if f["bank"] == bank), None)
            reason = f"{fault['check']}: {fault['detail']}" if fault else "not in the masked planning counts"
            left_out[bank] = f"planning_counts_missing: {reason}"[:400]
    settled = plan.settled(s["answered"], s["sums"]["positives"], s["sums"]["holdout_positives"],
                           [h["session"] for h in history], left_out)
    ws.write_json(settled.to_dict(), ws.plan_path)
    for bank, reason in left_out.items():
        log.warning("planning leaves out %s: %s", bank, reason)
    return settled


def _tally(x: _Exchange, s: dict) -> dict:
    """The decoded sums in the record when every masking bank answered; else the next attempt, or a named failure."""
    uploads, answered, faults = [], [], list(s.get("offer_faults", []))
    for bank in s["masking"]:
        try:
            uploads.append(x.answer(s, bank))
            answered.append(bank)
        except (WireFormatError, SecureAggregationError) as exc:
            faults.append({"bank": bank, "check": "masked_counts_invalid", "detail": str(exc)[:300]})
    s = {**s, "answered": answered, "faults": faults}
    if answered != s["masking"]:
        missing = sorted(set(s["masking"]) - set(answered))
        if s["attempt"] >= MAX_ATTEMPTS or len(answered) < x.plan.masking_quorum:
            raise RoundFailed(f"planning: masked_counts_incomplete: {missing} did not answer attempt {s['attempt']}; "
                              f"{len(answered)} left (at least {x.plan.masking_quorum} needed, {MAX_ATTEMPTS} "
                              f"attempts at most); faults: {faults}")
        log.warning("planning: %s did not answer attempt %s; attempt %s with %s under fresh keys", missing,
                    s["attempt"], s["attempt"] + 1, answered)
        return x.open(answered, [*s["history"], s])
    try:
        positives, holdout_positives = (int(v) for v in decode_counts(unmasked_sum(uploads)))
    except SecureAggregationError as exc:
        raise RoundFailed(f"planning: masked_sum_invalid: the label counts of {answered} do not sum to counts "
                          f"({exc}); a bank masked with other keys or lied") from None
    rows = (sum(x.plan.counts[b]["train_rows"] for b in answered),
            sum(x.plan.counts[b]["holdout_rows"] for b in answered))
    if positives > rows[0] or holdout_positives > rows[1]:
        raise RoundFailed(f"planning: masked_sum_invalid: {positives} positives / {holdout_positives} holdout "
                          f"positives exceed the banks' {rows[0]} train / {rows[1]} holdout rows")
    s["sums"] = {"positives": positives, "holdout_positives": holdout_positives}
    x.ws.write_json(s, x.path)
    return s


def run(ws: Workspace, plan: Plan, nodes: dict[str, Node], on_progress: Callable[[str], None] = lambda m: None
        ) -> Plan:
    """``run_with`` with the nodes at hand (embedded federations, the Airflow embedded driver)."""
    return run_with(ws, plan, asking(nodes, "planning", log), on_progress)
