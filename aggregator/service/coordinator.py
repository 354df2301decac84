"""Federations and rounds as state machines over the workspace steps of ``aggregator.rounds``.

Airflow (an operator) starts a federation, plans it, opens each round and watches its status;
banks fetch tasks and upload results. A round's phase (training, then evaluation) closes when
every expected bank has answered or at its deadline: training then aggregates if the quorum
holds (else the round fails); evaluation then registers and promotes. Cyclic and histogram
rounds train in one call here, through ``RemoteNode``s that turn each bank call into a task.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select

from aggregator import rounds
from aggregator.federation import RoundFailed
from aggregator.service import store
from aggregator.service.config import ServiceConfig
from aggregator.service.intake import Refused, screen_upload
from aggregator.settings import FederationSettings
from pipelines.io import write_bytes

log = logging.getLogger("fedfraud.service")
REQUEST_KEYS = ("model_name", "strategy", "rounds", "seed", "min_banks", "trees_per_round", "banks")


def task_id(federation: str, round_id: int, kind: str, bank: str) -> str:
    return hashlib.sha256(f"{federation}/{round_id}/{kind}/{bank}".encode()).hexdigest()[:32]


class Coordinator:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.engine, self.Session = store.open_database(config.database_url)
        self.lock = threading.RLock()  # uploads and phase closings never interleave
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
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
            for r in s.scalars(select(store.Round).where(store.Round.state == "training", store.Round.collective)):
                r.state, r.error = "failed", "the aggregator restarted during this collective round"

    def start(self) -> "Coordinator":
        self._ticker = threading.Thread(target=self._tick_forever, name="fedfraud-ticker", daemon=True)
        self._ticker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=10)
        self.engine.dispose()

    def workspace(self, federation: store.Federation) -> rounds.Workspace:
        return rounds.Workspace(self.config.work_dir / "runs" / federation.key, federation.model_name)

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
                    self._add_task(s, federation, 0, "summary", bank, None, ws.summary_path(bank))
        return self.federation_status(key)

    def plan_federation(self, key: str) -> dict[str, Any]:
        """Plan from the summaries that arrived; a summary arriving later is refused as late."""
        from pipelines.config import load_config
        from pipelines.feature_contract import feature_contract

        with self.lock, self.Session.begin() as s:
            federation = self._federation(s, key)
            if federation.plan is None and federation.state != "failed":
                self._expire(s, key, 0, "summary", "no summary before the federation was planned")
                r = federation.request
                settings = FederationSettings(trees_per_round=r["trees_per_round"], min_banks=r["min_banks"])
                try:
                    federation.plan = rounds.open_federation(
                        self.workspace(federation), r["model_name"], r["strategy"], r["rounds"], r["seed"],
                        settings, feature_contract(load_config().features), sorted(r["banks"]), run_id=key)
                    federation.state = "planned"
                except RoundFailed as exc:
                    federation.state, federation.error = "failed", str(exc)
        return self.federation_status(key)

    def open_round(self, key: str, round_id: int) -> dict[str, Any]:
        """Write the round's tasks (or start its collective training); idempotent."""
        collective = False
        with self.lock, self.Session.begin() as s:
            federation = self._federation(s, key)
            if s.get(store.Round, (key, round_id)) is None:
                self._check_can_open(s, federation, round_id)
                plan, ws = federation.plan, self.workspace(federation)
                collective = rounds.trains_in_one_task(plan, round_id)
                s.add(store.Round(federation=key, round_id=round_id, collective=collective,
                                  deadline=time.time() + self.config.deadline_seconds))
                for bank in [] if collective else rounds.open_round(ws, plan, round_id):
                    self._add_task(s, federation, round_id, "train", bank, ws.path(round_id, "tasks", bank),
                                   ws.path(round_id, "updates", bank))
        if collective:  # started once the round is committed
            threading.Thread(target=self._train_collective, args=(key, round_id), daemon=True,
                             name=f"fedfraud-round-{round_id}").start()
        return self.round_status(key, round_id)

    def _check_can_open(self, s, federation: store.Federation, round_id: int) -> None:
        if federation.plan is None:
            raise Refused(409, "not_planned", f"federation {federation.key} is {federation.state}, not planned")
        if not 1 <= round_id <= federation.plan["rounds"]:
            raise Refused(422, "no_such_round", f"round {round_id} is outside 1..{federation.plan['rounds']}")
        previous = s.get(store.Round, (federation.key, round_id - 1)) if round_id > 1 else None
        if round_id > 1 and (previous is None or previous.state != "registered"):
            state = previous.state if previous else "not opened"
            raise Refused(409, "previous_round", f"round {round_id - 1} is {state}; round {round_id} cannot open")

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
            rejections = s.scalars(select(store.Rejection).where(
                store.Rejection.federation == key, store.Rejection.round_id == round_id))
            return {"federation": key, "round": round_id, "state": row.state, "error": row.error,
                    "version": row.version, "collective": row.collective, "model_name": federation.model_name,
                    "tasks": self._task_states(s, key, round_id),
                    "rejections": [{"bank": r.caller, "check": r.check, "detail": r.detail} for r in rejections]}

    @staticmethod
    def _task_states(s, key: str, round_id: int) -> dict[str, dict[str, str]]:
        states: dict[str, dict[str, str]] = {}
        for t in s.scalars(select(store.Task).where(store.Task.federation == key, store.Task.round_id == round_id)):
            states.setdefault(t.bank, {})[t.kind] = t.state
        return states

    # ---- banks: tasks and uploads --------------------------------------------------------

    def seen(self, name: str) -> None:
        with self.Session.begin() as s:
            s.get(store.Participant, name).last_seen = time.time()

    def next_task(self, bank: str) -> dict[str, Any] | None:
        """The bank's oldest open task (a fetched one again, if the bank restarted)."""
        with self.Session() as s:
            task = s.scalars(select(store.Task).where(
                store.Task.bank == bank, store.Task.state.in_(store.OPEN_TASK_STATES),
                store.Task.deadline > time.time()).order_by(store.Task.created_at, store.Task.id)).first()
            if task is None:
                return None
            federation = s.get(store.Federation, task.federation)
            return {"id": task.id, "kind": task.kind, "federation": task.federation, "round": task.round_id,
                    "model_name": federation.model_name, "deadline": task.deadline,
                    "has_input": task.input_path is not None}

    def _own_task(self, s, caller: str, tid: str) -> store.Task:
        task = s.get(store.Task, tid)
        if task is None:
            raise Refused(404, "unknown_task", f"no task {tid}")
        if task.bank != caller:
            raise Refused(403, "wrong_sender", f"{caller} cannot act on a task of {task.bank}")
        return task

    def task_kind(self, caller: str, tid: str) -> str:
        with self.Session() as s:
            return self._own_task(s, caller, tid).kind

    def task_input(self, caller: str, tid: str) -> bytes:
        with self.Session.begin() as s:
            task = self._own_task(s, caller, tid)
            if task.state == "pending":
                task.state = "fetched"
            return Path(task.input_path).read_bytes() if task.input_path else b""

    def accept_result(self, caller: str, tid: str, body: bytes) -> dict[str, Any]:
        """Check the upload (size, format, sender), then keep it: exactly once, while the task is open."""
        with self.Session() as s:
            task = self._own_task(s, caller, tid)
            kind, round_id = task.kind, task.round_id
            self._open_task(s, task)  # a late or duplicate upload is named before its body is parsed
        screen_upload(kind, body, caller, round_id, self.config.max_update_bytes)
        with self.lock, self.Session.begin() as s:
            task = self._open_task(s, self._own_task(s, caller, tid))
            write_bytes(body, Path(task.result_path))
            task.state, task.finished_at = "done", time.time()
            task.result_sha256 = hashlib.sha256(body).hexdigest()
            log.info("%s: %s for round %s of %s received", caller, kind, round_id, task.federation)
            return {"task": tid, "state": task.state}

    def accept_failure(self, caller: str, tid: str, reason: str) -> dict[str, Any]:
        """The bank could not do the task (e.g. it declines to train); the phase need not wait for it."""
        with self.lock, self.Session.begin() as s:
            task = self._open_task(s, self._own_task(s, caller, tid))
            task.state, task.finished_at, task.detail = "failed", time.time(), reason[:2000]
            log.warning("%s could not do %s for round %s: %s", caller, task.kind, task.round_id, reason)
            return {"task": tid, "state": task.state}

    @staticmethod
    def _open_task(s, task: store.Task) -> store.Task:
        if task.state in ("done", "failed"):
            raise Refused(409, "duplicate", f"task {task.id} ({task.kind}, round {task.round_id}) was already "
                          f"answered by {task.bank}")
        if task.state not in store.OPEN_TASK_STATES or task.deadline <= time.time():
            raise Refused(409, "late", f"{task.kind} for round {task.round_id} arrived after its phase closed "
                          f"({task.detail or 'deadline passed'})")
        return task

    def record_rejection(self, caller: str, tid: str | None, refused: Refused) -> None:
        with self.Session.begin() as s:
            task = s.get(store.Task, tid) if tid else None
            s.add(store.Rejection(caller=caller, task_id=tid, federation=task.federation if task else None,
                                  round_id=task.round_id if task else None, check=refused.check,
                                  detail=refused.detail[:2000]))
        log.warning("upload from %s refused by %s: %s", caller, refused.check, refused.detail)

    # ---- internal: tasks, phases ---------------------------------------------------------

    def _add_task(self, s, federation: store.Federation, round_id: int, kind: str, bank: str,
                  input_path: Path | None, result: Path) -> store.Task:
        tid = task_id(federation.key, round_id, kind, bank)
        task = s.get(store.Task, tid)
        if task is None:
            task = store.Task(id=tid, federation=federation.key, round_id=round_id, kind=kind, bank=bank,
                              input_path=str(input_path) if input_path else None, result_path=str(result),
                              deadline=time.time() + self.config.deadline_seconds)
            s.add(task)
        return task

    def _expire(self, s, key: str, round_id: int, kind: str | None, detail: str) -> None:
        query = select(store.Task).where(store.Task.federation == key, store.Task.round_id == round_id,
                                         store.Task.state.in_(store.OPEN_TASK_STATES))
        for task in s.scalars(query if kind is None else query.where(store.Task.kind == kind)):
            task.state, task.detail = "expired", detail

    def _tick_forever(self) -> None:
        while not self._stop.wait(self.config.tick_seconds):
            try:
                self.tick()
            except Exception:  # the ticker must survive a bad round; the round itself records why
                log.exception("ticker")

    def tick(self) -> None:
        """Close every phase whose banks have all answered or whose deadline has passed."""
        with self.Session() as s:
            due = [(r.federation, r.round_id, r.state) for r in s.scalars(select(store.Round).where(
                store.Round.state.in_(("training", "evaluating"))))
                if not (r.state == "training" and r.collective) and self._phase_over(s, r)]
        for key, round_id, state in due:
            if state == "training":
                self._in_round(key, round_id, self._aggregate)
            else:
                self._in_round(key, round_id, self._register)

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
            with self.Session.begin() as s:
                row = s.get(store.Round, (key, round_id))
                reason = str(exc) if isinstance(exc, RoundFailed) else f"{exc.__class__.__name__}: {exc}"
                row.state, row.error = "failed", reason
                self._expire(s, key, round_id, None, "the round failed")

    def _aggregate(self, federation: store.Federation, round_id: int) -> None:
        with self.lock, self.Session.begin() as s:
            self._expire(s, federation.key, round_id, "train", "no update before the training deadline")
        outcome = rounds.aggregate_round(self.workspace(federation), federation.plan, round_id,
                                         self.tracker(federation.model_name))
        self._record_check_rejections(federation.key, round_id, outcome)
        self._start_evaluation(federation, round_id)

    def _train_collective(self, key: str, round_id: int) -> None:
        def train(federation: store.Federation, r: int) -> None:
            from aggregator.service.remote import RemoteNode

            nodes = {b: RemoteNode(self, federation, r, b) for b in federation.plan["banks"]}
            outcome = rounds.train_in_process(self.workspace(federation), federation.plan, r, nodes,
                                              self.tracker(federation.model_name))
            self._record_check_rejections(key, r, outcome)
            self._start_evaluation(federation, r)

        self._in_round(key, round_id, train)

    def _record_check_rejections(self, key: str, round_id: int, outcome: dict[str, Any]) -> None:
        with self.Session.begin() as s:
            for r in outcome["rejections"]:
                s.add(store.Rejection(caller=r["bank"], federation=key, round_id=round_id, check=r["check"],
                                      detail=r["detail"][:2000]))

    def _start_evaluation(self, federation: store.Federation, round_id: int) -> None:
        ws = self.workspace(federation)
        with self.lock, self.Session.begin() as s:
            for bank in federation.plan["banks"]:
                self._add_task(s, federation, round_id, "evaluate", bank, ws.path(round_id, "model"),
                               ws.path(round_id, "evaluations", bank))
                if ws.path(round_id, "champion").exists():
                    self._add_task(s, federation, round_id, "evaluate_champion", bank, ws.path(round_id, "champion"),
                                   ws.path(round_id, "champion_evaluations", bank))
            row = s.get(store.Round, (federation.key, round_id))
            row.state, row.deadline = "evaluating", time.time() + self.config.deadline_seconds

    def _register(self, federation: store.Federation, round_id: int) -> None:
        with self.lock, self.Session.begin() as s:
            self._expire(s, federation.key, round_id, None, "no evaluation before the evaluation deadline")
        version, _, _ = rounds.finish_round(self.workspace(federation), federation.plan, round_id,
                                            self.tracker(federation.model_name))
        with self.Session.begin() as s:
            row = s.get(store.Round, (federation.key, round_id))
            row.state, row.version = "registered", version
