"""The banks' side of the service: tasks handed out, answers taken in, exactly once and by name.

``BankTasks`` is mixed into ``Coordinator``: it needs its ``Session``, ``lock``, ``config`` and ``_stop``.
A task is open (pending, fetched) until its bank answers (done), says why it cannot (failed),
or its phase closes (expired). Uploads and phase closings hold the same lock, so an answer is
either in before the phase closes or refused as ``late``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from aggregator.protocol import traffic
from aggregator.protocol.errors import RoundFailed
from aggregator.service import store
from aggregator.service.intake import Refused, screen_upload
from pipelines.io import write_bytes

log = logging.getLogger("fedfraud.service")


def task_id(federation: str, round_id: int, kind: str, bank: str, part: str = "", attempt: int = 1) -> str:
    """``part`` tells apart several tasks of one kind for one bank in a round (cyclic acceptance, per turn);
    ``attempt`` those of a round's attempts (a failed round opened again), in every phase."""
    key = f"{federation}/{round_id}/{kind}/{bank}" + (f"/{part}" if part else "") + (
        f"/attempt-{attempt}" if attempt > 1 else "")
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class BankTasks:
    Session: Any  # the coordinator's session factory, lock and config
    lock: Any
    config: Any
    started_at: float  # when this process started serving
    _stop: Any  # set when the service stops

    def seen(self, name: str) -> None:
        with self.Session.begin() as s:
            s.get(store.Participant, name).last_seen = time.time()

    def expire_silent_banks(self) -> list[str]:
        """Give up on the open tasks of banks silent for ``liveness_seconds`` (a working agent beats
        every few seconds): a dead bank costs its phase that long, not the phase deadline. A bank
        never heard from is left to the deadline, and the service's own downtime is not silence
        (counted from its start at the earliest). Returns the tasks expired."""
        now, limit = time.time(), self.config.liveness_seconds
        expired = []
        with self.lock, self.Session.begin() as s:
            heard = {p.name: max(p.last_seen, self.started_at) for p in s.scalars(select(store.Participant).where(
                store.Participant.last_seen.is_not(None)))}
            silent = {name: now - at for name, at in heard.items() if now - at > limit}
            if not silent:
                return expired
            for task in s.scalars(select(store.Task).where(
                    store.Task.bank.in_(tuple(silent)), store.Task.state.in_(store.OPEN_TASK_STATES),
                    store.Task.created_at < now - limit)):
                task.state, task.detail = "expired", f"{task.bank} silent for {silent[task.bank]:.0f}s"
                expired.append(task.id)
                log.warning("task %s (%s, round %s) of %s expired: %s", task.id, task.kind, task.round_id,
                            task.federation, task.detail)
        return expired

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
            data = Path(task.input_path).read_bytes() if task.input_path else b""
            result_path, bank = Path(task.result_path), task.bank
        traffic.record(result_path, bank, received=len(data))  # bytes on the wire, as served
        return data

    def accept_result(self, caller: str, tid: str, body: bytes) -> dict[str, Any]:
        """Check the upload (size, format, sender), then keep it: exactly once, while the task is open."""
        with self.Session() as s:
            task = self._own_task(s, caller, tid)
            kind, round_id, result_path = task.kind, task.round_id, Path(task.result_path)
            self._open_task(s, task)  # a late or duplicate upload is named before its body is parsed
        traffic.record(result_path, caller, sent=len(body))  # bytes on the wire, refused or not
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
                                  round_id=task.round_id if task else None, attempt=task.attempt if task else 1,
                                  check=refused.check,
                                  detail=refused.detail[:2000]))
        log.warning("upload from %s refused by %s: %s", caller, refused.check, refused.detail)

    def _add_task(self, s, federation: store.Federation, round_id: int, kind: str, bank: str,
                  input_path: Path | None, result: Path, part: str = "") -> store.Task:
        row = s.get(store.Round, (federation.key, round_id)) if round_id else None
        attempt = row.attempt if row is not None else 1
        tid = task_id(federation.key, round_id, kind, bank, part, attempt)
        task = s.get(store.Task, tid)
        if task is None:
            task = store.Task(id=tid, federation=federation.key, round_id=round_id, attempt=attempt, kind=kind,
                              bank=bank, input_path=str(input_path) if input_path else None, result_path=str(result),
                              deadline=time.time() + self.config.deadline_seconds)
            s.add(task)
        return task

    def wait_for_tasks(self, ids: list[str], detail: str, poll_s: float) -> None:
        """Return once none of the tasks ``ids`` is open: answered, failed, or expired at its own deadline
        (naming ``detail``). A stopping service raises ``RoundFailed``."""
        while not self._stop.is_set():
            with self.Session() as s:
                still_open = list(s.scalars(select(store.Task).where(
                    store.Task.id.in_(ids), store.Task.state.in_(store.OPEN_TASK_STATES))))
                overdue = [task.id for task in still_open if task.deadline <= time.time()]
            if not still_open:
                return
            if overdue:
                with self.lock, self.Session.begin() as s:
                    for task in s.scalars(select(store.Task).where(
                            store.Task.id.in_(overdue), store.Task.state.in_(store.OPEN_TASK_STATES))):
                        task.state, task.detail = "expired", detail
                continue
            time.sleep(poll_s)
        raise RoundFailed("the service stopped while waiting for the banks")

    def _expire(self, s, key: str, round_id: int, kind: str | None, detail: str) -> None:
        query = select(store.Task).where(store.Task.federation == key, store.Task.round_id == round_id,
                                         store.Task.state.in_(store.OPEN_TASK_STATES))
        for task in s.scalars(query if kind is None else query.where(store.Task.kind == kind)):
            task.state, task.detail = "expired", detail
