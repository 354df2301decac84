"""The service's driver: federations and rounds as state machines over ``aggregator.protocol``.

Airflow (an operator) starts a federation, plans it, opens each round and watches its status;
banks fetch tasks and upload results. A round walks ``phases.ROUND``: each bank phase (training,
then evaluation) becomes one task per bank and question, and closes when every bank has
answered or at its deadline; the aggregator phases after it then run (check, aggregate,
candidate: the round fails below quorum; register, promote). Cyclic and histogram rounds
train in one call here, through ``RemoteNode``s that turn each bank call into a task.
A histogram federation keeps its world (server, banks' workers, shared bins) across rounds
(``aggregator.service.kept``). A failed round opened again runs its next attempt with the banks still
healthy, a bounded number of times (``aggregator.service.attempts``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from sqlalchemy import select

from aggregator.protocol import phases
from aggregator.protocol.errors import PhaseRerun, RoundFailed
from aggregator.protocol.plan import Plan
from aggregator.protocol.state import Phase, RoundState
from aggregator.service.kept import KeptStrategies
from aggregator.strategies.base import Strategy
from aggregator.protocol.training import checks
from aggregator.protocol.workspace import Workspace
from aggregator.service import attempts, cross_evaluation, store
from aggregator.service.config import ServiceConfig
from aggregator.service.intake import Refused
from aggregator.service.tasks import BankTasks
from fedfraud.protocol import TaskKind
from fedfraud.settings import REQUEST_OPTIONS, requested_settings

log = logging.getLogger("fedfraud.service")
TRAINING = phases.BANK_PHASES[0].state
LAST_STAGE_PHASE = [p for p in phases.BANK_PHASES if p.per_stage][-1]  # training's verdicts are final after it
PHASE_BY_STATE: dict[str, Phase] = {p.state: p for p in phases.BANK_PHASES}
REQUEST_KEYS = ("model_name", "strategy", "rounds", "seed", "min_banks", "trees_per_round", "banks")


class Coordinator(BankTasks):
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.started_at = time.time()
        self.engine, self.Session = store.open_database(config.database_url)
        self.lock = threading.RLock()  # uploads and phase closings never interleave
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.background: list[threading.Thread] = []  # cross-evaluation threads: joined by stop()
        self.kept = KeptStrategies()  # each federation's collective strategy (histogram: its world), for its rounds
        self._register_participants()
        self._recover()

    # ---- lifecycle -----------------------------------------------------------------------

    def _register_participants(self) -> None:
        with self.Session.begin() as s:
            for name, role in self.config.participants.items():
                row = s.get(store.Participant, name)
                if row is None:
                    s.add(store.Participant(name=name, role=role))
                else:
                    row.role = role

    def _recover(self) -> None:
        """A collective round cannot outlive the process that ran it: fail it, by name."""
        with self.Session.begin() as s:
            for r in s.scalars(select(store.Round).where(store.Round.state == TRAINING, store.Round.collective)):
                r.state, r.error = "failed", "the aggregator restarted during this collective round"

    def start(self) -> "Coordinator":
        self._ticker = threading.Thread(target=self._tick_forever, name="fedfraud-ticker", daemon=True)
        self._ticker.start()
        with self.Session() as s:  # a round 0 (masked counts, cross-evaluation) cut short by a restart runs again
            unfinished = list(s.scalars(select(store.Federation.key).where(
                store.Federation.state.in_(cross_evaluation.PREPARING))))
        for key in unfinished:
            cross_evaluation.start(self, key)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=10)
        for thread in self.background:  # a stopped coordinator writes nothing more: a restart's tasks are its own
            thread.join(timeout=30)
        self.kept.release_all()
        self.engine.dispose()

    def workspace(self, federation: store.Federation) -> Workspace:
        return Workspace(self.config.work_dir / "runs" / federation.key, federation.model_name)

    def round_state(self, federation: store.Federation, round_id: int, strategy: Strategy | None = None,
                    banks: list[str] | None = None) -> RoundState:
        """The round as its current attempt runs it: with that attempt's banks (given, else as recorded)."""
        if banks is None:
            with self.Session() as s:
                row = s.get(store.Round, (federation.key, round_id))
                banks = row.banks if row is not None else None
        return RoundState(self.workspace(federation), Plan.from_dict(federation.plan), round_id,
                          self.tracker(federation.model_name), strategy, banks=banks)

    def tracker(self, model_name: str):
        from aggregator.tracking import FederationTracker, default_tracking_uri

        return FederationTracker(self.config.tracking_uri or default_tracking_uri(self.config.work_dir), model_name)

    def _federation(self, s, key: str) -> store.Federation:
        federation = s.get(store.Federation, key)
        if federation is None:
            raise Refused(404, "unknown_federation", f"no federation {key!r}")
        return federation

    # ---- operator: federations and rounds ------------------------------------------------

    def start_federation(self, key: str, request: dict[str, Any]) -> dict[str, Any]:
        """Create the federation (idempotent) and ask every bank for its summary."""
        unknown = sorted(set(request["banks"]) - set(self.config.banks))
        if unknown:
            raise Refused(422, "unknown_bank", f"not members of this consortium: {', '.join(unknown)}")
        with self.lock, self.Session.begin() as s:
            existing = s.get(store.Federation, key)
            if existing is not None:
                if existing.request != request:
                    raise Refused(409, "conflict", f"federation {key} exists with other parameters")
            else:
                federation = store.Federation(key=key, model_name=request["model_name"], request=request)
                s.add(federation)
                s.flush()
                ws = self.workspace(federation)
                for bank in sorted(request["banks"]):
                    self._add_task(s, federation, 0, TaskKind.SUMMARY, bank, None, ws.summary_path(bank))
        return self.federation_status(key)

    def plan_federation(self, key: str) -> dict[str, Any]:
        """Plan from the summaries that arrived (a summary arriving later is refused as late); round 0 (the
        masked planning counts, cross-evaluation) then runs in a thread."""
        from pipelines.config import load_config
        from pipelines.feature_contract import feature_contract

        cross_evaluate = False
        with self.lock, self.Session.begin() as s:
            federation = self._federation(s, key)
            if federation.plan is None and federation.state != "failed":
                self._expire(s, key, 0, TaskKind.SUMMARY, "no summary before the federation was planned")
                r = federation.request
                settings = requested_settings(r["trees_per_round"], r["min_banks"],
                                              {k: r[k] for k in REQUEST_OPTIONS if k in r})
                try:
                    plan = phases.plan_federation(
                        self.workspace(federation), r["model_name"], r["strategy"], r["rounds"], r["seed"],
                        settings, feature_contract(load_config().features), sorted(r["banks"]), run_id=key)
                    federation.plan = plan.to_dict()
                    federation.state = cross_evaluation.COUNTING  # round 0: masked counts, cross-evaluation
                except RoundFailed as exc:
                    federation.state, federation.error = "failed", str(exc)
                cross_evaluate = federation.state == cross_evaluation.COUNTING
        if cross_evaluate:  # started once the plan is committed; rounds wait for it
            cross_evaluation.start(self, key)
        return self.federation_status(key)

    def open_round(self, key: str, round_id: int) -> dict[str, Any]:
        """Write the round's tasks (or start its collective training); idempotent. A failed round starts its
        next attempt with its healthy banks (``attempts.reopen``; refused by name beyond the bound or quorum)."""
        collective = False
        with self.lock, self.Session.begin() as s:
            federation = self._federation(s, key)
            row = s.get(store.Round, (key, round_id))
            if row is None or row.state == "failed":
                if row is None:
                    self._check_can_open(s, federation, round_id)
                    r = self.round_state(federation, round_id, banks=list(federation.plan["banks"]))
                    r.ws.clear_round(round_id)
                    row = store.Round(federation=key, round_id=round_id, attempt=1)
                    s.add(row)
                else:
                    banks = attempts.reopen(s, row, Plan.from_dict(federation.plan), self.workspace(federation),
                                            self.config.liveness_seconds, self.started_at)
                    r = self.round_state(federation, round_id, banks=banks)
                    log.warning("round %s of %s: attempt %s with %s", round_id, key, row.attempt, banks)
                collective = r.trains_in_one_task()
                row.collective, row.state = collective, TRAINING
                row.deadline = time.time() + self.config.deadline_seconds
                s.flush()  # the round's tasks are named after its attempt
                if not collective:
                    phases.run_aggregator_phases(r, after=None)
                    self._ask_banks(s, federation, r, phases.BANK_PHASES[0])
        if collective:  # started once the round is committed
            threading.Thread(target=self._train_collective, args=(key, round_id), daemon=True,
                             name=f"fedfraud-round-{round_id}").start()
        return self.round_status(key, round_id)

    def _check_can_open(self, s, federation: store.Federation, round_id: int) -> None:
        if federation.plan is None or federation.state != "planned":
            raise Refused(409, "not_planned", f"federation {federation.key} is {federation.state}, not planned")
        if not 1 <= round_id <= federation.plan["rounds"]:
            raise Refused(422, "no_such_round", f"round {round_id} is outside 1..{federation.plan['rounds']}")
        previous = s.get(store.Round, (federation.key, round_id - 1)) if round_id > 1 else None
        if round_id > 1 and (previous is None or previous.state != "registered"):
            state = previous.state if previous else "not opened"
            again = " (open it again: its next attempt)" if state == "failed" else ""
            raise Refused(409, "previous_round", f"round {round_id - 1} is {state}{again}; round {round_id} cannot "
                          "open")

    def federation_status(self, key: str) -> dict[str, Any]:
        with self.Session() as s:
            federation = self._federation(s, key)
            plan = federation.plan or {}
            return {"federation": key, "state": federation.state, "error": federation.error,
                    "banks": plan.get("banks"), "excluded": plan.get("excluded"),
                    "summaries": self._task_states(s, key, 0)}

    def round_status(self, key: str, round_id: int) -> dict[str, Any]:
        with self.Session() as s:
            federation = self._federation(s, key)
            row = s.get(store.Round, (key, round_id))
            if row is None:
                raise Refused(404, "unknown_round", f"round {round_id} of {key} is not open")
            earlier = [{**attempt, "tasks": self._task_states(s, key, round_id, attempt["attempt"]),
                        "rejections": self._rejections(s, key, round_id, attempt["attempt"])}
                       for attempt in row.earlier or []]
            return {"federation": key, "round": round_id, "state": row.state, "error": row.error,
                    "version": row.version, "collective": row.collective, "model_name": federation.model_name,
                    "attempt": row.attempt, "max_attempts": attempts.MAX_ROUND_ATTEMPTS,
                    "banks": attempts.attempt_banks(row, (federation.plan or {}).get("banks", [])),
                    "tasks": self._task_states(s, key, round_id, row.attempt),
                    "rejections": self._rejections(s, key, round_id, row.attempt), "earlier_attempts": earlier}

    @staticmethod
    def _task_states(s, key: str, round_id: int, attempt: int = 1) -> dict[str, dict[str, str]]:
        states: dict[str, dict[str, str]] = {}
        for t in s.scalars(select(store.Task).where(store.Task.federation == key, store.Task.round_id == round_id,
                                                    store.Task.attempt == attempt)
                           .order_by(store.Task.created_at)):  # the latest of a kind (a resend after a refusal)
            states.setdefault(t.bank, {})[t.kind] = t.state
        return states

    @staticmethod
    def _rejections(s, key: str, round_id: int, attempt: int) -> list[dict[str, str]]:
        return [{"bank": r.caller, "check": r.check, "detail": r.detail} for r in s.scalars(select(
            store.Rejection).where(store.Rejection.federation == key, store.Rejection.round_id == round_id,
                                   store.Rejection.attempt == attempt).order_by(store.Rejection.id))]

    # ---- internal: phases -----------------------------------------------------------------

    def _tick_forever(self) -> None:
        while not self._stop.wait(self.config.tick_seconds):
            try:
                self.tick()
            except Exception:  # the ticker must survive a bad round; the round itself records why
                log.exception("ticker")

    def tick(self) -> None:
        """Close every phase whose banks have all answered (or fell silent) or whose deadline has passed."""
        self.expire_silent_banks()
        with self.Session() as s:
            due = [(r.federation, r.round_id, r.state) for r in s.scalars(select(store.Round).where(
                store.Round.state.in_(tuple(PHASE_BY_STATE))))
                if not (r.state == TRAINING and r.collective) and self._phase_over(s, r)]
        for key, round_id, state in due:
            self._in_round(key, round_id, lambda federation, r, phase=PHASE_BY_STATE[state]: self._close_phase(
                federation, r, phase))

    @staticmethod
    def _phase_over(s, row: store.Round) -> bool:
        still_open = s.scalars(select(store.Task.id).where(
            store.Task.federation == row.federation, store.Task.round_id == row.round_id,
            store.Task.state.in_(store.OPEN_TASK_STATES))).first()
        return still_open is None or time.time() >= row.deadline

    def _in_round(self, key: str, round_id: int, step: Callable[[store.Federation, int], None]) -> None:
        """Run a phase's closing step; any failure fails the round with its reason, never the service."""
        with self.Session() as s:
            federation = self._federation(s, key)
        try:
            step(federation, round_id)
        except Exception as exc:
            log.warning("round %s of %s failed: %s", round_id, key, exc)
            self.kept.release(key)  # its kept world ends first: the next attempt (opened once failed) starts anew
            with self.lock, self.Session.begin() as s:
                row = s.get(store.Round, (key, round_id))
                reason = str(exc) if isinstance(exc, RoundFailed) else f"{exc.__class__.__name__}: {exc}"
                row.state, row.error = "failed", reason
                self._expire(s, key, round_id, None, "the round failed")

    def _ask_banks(self, s, federation: store.Federation, r: RoundState, phase: Phase) -> None:
        """Open a bank phase: one task per bank and question, the round in that phase's state."""
        for bank in phase.banks(r):
            for ask in phase.exchanges(r, bank):
                self._add_task(s, federation, r.round_id, ask.kind, bank, ask.question, ask.answer, ask.part)
        row = s.get(store.Round, (federation.key, r.round_id))
        if row is not None:  # a new round's row is added by its opener
            row.state, row.deadline = phase.state, time.time() + self.config.deadline_seconds

    def _close_phase(self, federation: store.Federation, round_id: int, phase: Phase) -> None:
        """A bank phase is over: expire what is still open, then run the aggregator phases after it."""
        with self.lock, self.Session.begin() as s:
            self._expire(s, federation.key, round_id, None, f"no answer before the {phase.name} deadline")
        self._advance(federation, self.round_state(federation, round_id), phase)

    def _train_collective(self, key: str, round_id: int) -> None:
        def train(federation: store.Federation, r: int) -> None:
            from aggregator.service.remote import RemoteNode

            strategy = self.kept.for_federation(federation.key, federation.plan, self.workspace(federation))
            state = self.round_state(federation, r, strategy)
            phases.train_in_process(state, {b: RemoteNode(self, federation, r, b) for b in state.banks})
            self._record_check_rejections(federation.key, r, checks(state)["rejections"])
            self._open_next(federation, state, LAST_STAGE_PHASE)

        self._in_round(key, round_id, train)

    def _advance(self, federation: store.Federation, r: RoundState, closed: Phase) -> None:
        """The aggregator phases after ``closed`` (after the last per-stage bank phase, acceptance: every
        check verdict recorded), then what follows; a ``PhaseRerun`` opens its bank phase again (a new attempt)."""
        try:
            phases.run_aggregator_phases(r, after=closed.name)
        except PhaseRerun as rerun:
            log.warning("round %s of %s: %s", r.round_id, federation.key, rerun)
            with self.lock, self.Session.begin() as s:
                self._ask_banks(s, federation, r, phases.bank_phase(rerun.phase))
            return
        if closed is LAST_STAGE_PHASE:
            self._record_check_rejections(federation.key, r.round_id, checks(r)["rejections"])
        self._open_next(federation, r, closed)

    def _open_next(self, federation: store.Federation, r: RoundState, closed: Phase) -> None:
        """The bank phase after ``closed``; after the last one, the round is registered."""
        following = phases.BANK_PHASES[phases.BANK_PHASES.index(closed) + 1:]
        with self.lock, self.Session.begin() as s:
            if following:
                self._ask_banks(s, federation, r, following[0])
            else:
                row = s.get(store.Round, (federation.key, r.round_id))
                row.state, row.version = "registered", r.ws.read_json(r.path("registered"))["version"]
        if not following and r.round_id == r.plan.rounds:
            self.kept.release(federation.key)  # the federation's last round: its kept world ends

    def _record_check_rejections(self, key: str, round_id: int, rejections: list[dict[str, str]]) -> None:
        with self.Session.begin() as s:
            attempt = s.get(store.Round, (key, round_id)).attempt
            for x in rejections:
                s.add(store.Rejection(caller=x["bank"], federation=key, round_id=round_id, attempt=attempt,
                                      check=x["check"], detail=x["detail"][:2000]))
