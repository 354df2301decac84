"""Airflow task bodies in networked mode: the aggregator service runs the federation and the
banks' agents do the bank work. Each task asks the service to act (start, plan, open a round)
or waits, bounded, for one bank's answer or the round's verdict, and fails by name at the
deadline. Nothing is shared through files; the service's round states are the bank phases'
(``aggregator.protocol.phases``).

A failed attempt of a round fails the task that saw it *with* Airflow's retries (``RoundAttemptFailed``); the
retry of any of the round's tasks finds the round failed and opens it again at the service: its next attempt,
with the banks still healthy (``aggregator.service.attempts``). When no attempt is left, or too few healthy
banks, the task fails as ``RoundFailed`` (no retries: a verdict).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable

from aggregator.drivers.airflow_spec import RunSpec, wait_until
from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.phases import bank_phase
from fedfraud.protocol import TaskKind
from fedfraud.settings import requested_options
from fedfraud.transport import AggregatorClient, ServiceRefused

FINISHED_TASK = ("done", "failed", "expired")
REGISTERED = "registered"
FINAL_REFUSALS = ("round_attempts_exhausted", "below_quorum")  # a failed round that cannot run again


class RoundAttemptFailed(RuntimeError):
    """An attempt of a round failed and another may run: Airflow retries the task, and the retry opens it."""


def federation_key(spec: RunSpec) -> str:
    """The service's name for this run's federation: readable, URL-safe, unique per run."""
    raw = f"{spec.model_name}--{spec.run_id or 'manual'}"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', raw)[:80]}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}"


class NetworkedTasks:
    def __init__(self, spec: RunSpec):
        self.spec, self.key = spec, federation_key(spec)
        self.service = AggregatorClient.from_env()

    def prepare_bank(self, bank: str) -> str:
        """Start the federation (idempotent: every bank's task asks, the first creates it); wait for the summary."""
        spec = self.spec
        request = {"model_name": spec.model_name, "strategy": spec.strategy, "rounds": spec.rounds,
                   "seed": spec.seed, "min_banks": spec.min_banks, "trees_per_round": spec.trees_per_round,
                   "banks": sorted(spec.banks), **requested_options(spec.settings)}
        self.service.start_federation(self.key, request)
        state = wait_until(lambda: self.service.federation(self.key)["summaries"].get(bank, {}).get(TaskKind.SUMMARY),
                           lambda state: state in FINISHED_TASK, spec.wait_seconds, f"{bank}'s summary")
        if state != "done":
            raise RuntimeError(f"{bank}: summary {state}")
        return bank

    def open_federation(self) -> list[str]:
        """Plan; then wait out the cross-evaluation, which may exclude banks by name."""
        self.service.plan(self.key)
        status = wait_until(lambda: self.service.federation(self.key), lambda s: s["state"] in ("planned", "failed"),
                            self.spec.wait_seconds, "the federation's plan and cross-evaluation")
        if status["state"] != "planned":
            raise RoundFailed(status["error"])
        return status["banks"]

    def open_round(self, round_id: int) -> list[str]:
        """Open the round (or, failed, its next attempt); the banks that train in their own task."""
        status = self._open(round_id)
        return sorted(b for b, kinds in status["tasks"].items()
                      if TaskKind.TRAIN in kinds and not status.get("collective"))

    def train_bank(self, round_id: int, bank: str) -> str:
        return self._bank_answer(round_id, bank, TaskKind.TRAIN)

    def check_round(self, round_id: int) -> list[str]:
        """The service checks when every bank answered or at the deadline; the banks asked to score the candidate."""
        training = bank_phase("train").state
        status = self._round_state(round_id, lambda s: s["state"] != training, f"round {round_id}'s checks")
        return sorted(b for b, kinds in status["tasks"].items() if TaskKind.ACCEPT in kinds)

    def accept_bank(self, round_id: int, bank: str) -> str:
        return self._bank_answer(round_id, bank, TaskKind.ACCEPT)

    def aggregate_round(self, round_id: int) -> list[str]:
        """The service gates and aggregates when every bank has scored the candidate or at the deadline (then the
        leaf refit's steps, when it is on), then relays the banks' key offers; the banks asked for a masked
        evaluation."""
        waiting = tuple(bank_phase(name).state for name in ("train", "accept", "refit_keys", "refit", "keys"))
        status = self._round_state(round_id, lambda s: s["state"] not in waiting, f"round {round_id}'s aggregation")
        return sorted(b for b, kinds in status["tasks"].items() if TaskKind.EVALUATE in kinds)

    def evaluate_bank(self, round_id: int, bank: str) -> str:
        return self._bank_answer(round_id, bank, TaskKind.EVALUATE)

    def finish_round(self, round_id: int) -> str:
        status = self._round_state(round_id, lambda s: s["state"] == REGISTERED, f"round {round_id}'s registration")
        return f"models:/{self.spec.model_name}/{status['version']}"

    # ---- helpers ---------------------------------------------------------------------------

    def _open(self, round_id: int) -> dict[str, Any]:
        try:
            return self.service.open_round(self.key, round_id)
        except ServiceRefused as refused:
            if refused.check in FINAL_REFUSALS:
                raise RoundFailed(f"round {round_id}: {refused.check}: {refused.detail}") from refused
            raise

    def _round_state(self, round_id: int, done: Callable[[dict], bool], what: str) -> dict[str, Any]:
        """The round's status once ``done`` holds. A round found failed is opened again (a retry of this task:
        the next attempt); an attempt failing meanwhile raises ``RoundAttemptFailed`` (``RoundFailed`` after
        the last attempt)."""
        if self.service.round(self.key, round_id)["state"] == "failed":
            self._open(round_id)
        status = wait_until(lambda: self.service.round(self.key, round_id), lambda s: done(s) or s["state"] == "failed",
                            self.spec.wait_seconds, what)
        if status["state"] == "failed":
            where = f"round {round_id}, attempt {status['attempt']} of at most {status['max_attempts']}"
            if status["attempt"] >= status["max_attempts"]:
                raise RoundFailed(f"{where}: {status['error']}")
            raise RoundAttemptFailed(f"{where}: {status['error']}; a retry opens the next attempt with the banks "
                                     "still healthy")
        return status

    def _bank_answer(self, round_id: int, bank: str, kind: str) -> str:
        """Wait for ``bank``'s answer to its ``kind`` task; an expired or failed one fails this bank's task, as does
        an attempt of the round the bank is left out of."""
        status = self._round_state(round_id, lambda s: s["tasks"].get(bank, {}).get(kind) in FINISHED_TASK
                                   or bank not in s["banks"], f"{bank}'s {kind} for round {round_id}")
        if bank not in status["banks"]:
            left_out = next((a["left_out"][bank] for a in reversed(status["earlier_attempts"])
                             if bank in a.get("left_out", {})), "not in its banks")
            raise RuntimeError(f"{bank} is left out of attempt {status['attempt']} of round {round_id}: {left_out}")
        state = status["tasks"][bank][kind]
        if state != "done":
            raise RuntimeError(f"{bank}: {kind} for round {round_id} {state} "
                               "(see the round's status at the aggregator)")
        return bank
