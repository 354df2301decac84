"""A bank as the aggregator sees it inside the service: each call becomes a task for that bank.

Cyclic and histogram rounds run ``aggregator.protocol.phases.train_in_process`` over these nodes, the
same code as an embedded federation: ``train``, ``bin_counts`` and ``train_histogram`` post
a task, wait (until its deadline) for the bank's agent to upload the answer, and return its
bytes. With the histogram strategy the service hosts XGBoost's federated server and the
bank's worker connects out to it with the bank's certificate.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from aggregator.service import store
from fedfraud.model_refs import is_envelope
from fedfraud.protocol import TaskKind
from pipelines.io import write_bytes


class RemoteNode:
    COUNTED_AS_TASKS = True  # its bytes on the wire are counted where the agent fetches and uploads (tasks.py)

    def __init__(self, coordinator, federation: store.Federation, round_id: int, bank: str, poll_s: float = 0.2):
        self.coordinator, self.federation, self.round_id, self.bank = coordinator, federation, round_id, bank
        self.poll_s = poll_s

    def summary(self) -> dict[str, Any]:
        """The bank's summary, if it has been heard from recently enough to join a collective round."""
        c = self.coordinator
        with c.Session() as s:
            last_seen = s.get(store.Participant, self.bank).last_seen
        silent = time.time() - (last_seen or 0)
        if silent > c.config.liveness_seconds:
            raise ConnectionError(f"{self.bank} not heard from for {silent:.0f}s")
        return json.loads(c.workspace(self.federation).summary_path(self.bank).read_bytes())

    def train(self, task_bytes: bytes) -> bytes:
        """A training task (a cyclic turn's: by reference, then in full once if the bank lacks the base)."""
        return self._ask(TaskKind.TRAIN, task_bytes, part="by-reference" if is_envelope(task_bytes) else "")

    def score(self, question_bytes: bytes) -> bytes:
        """Acceptance in a cyclic round: one task per turn (each turn's question is another)."""
        return self._ask(TaskKind.ACCEPT, question_bytes, part=hashlib.sha256(question_bytes).hexdigest()[:16])

    def offer(self, request_bytes: bytes) -> bytes:
        """A key offer for a masked acceptance in a cyclic round (each turn's session is another)."""
        return self._ask(TaskKind.KEYS, request_bytes, part=hashlib.sha256(request_bytes).hexdigest()[:16])

    def bin_counts(self, task_bytes: bytes) -> bytes:
        """Grid counts: each attempt of the masked grid session is another task."""
        return self._ask(TaskKind.BIN_COUNTS, task_bytes, part=hashlib.sha256(task_bytes).hexdigest()[:16])

    def train_histogram(self, task_bytes: bytes, session_bytes: bytes) -> bytes:
        """Each attempt (a new world after a bank lost its kept worker, a new key session) is another task."""
        envelope = json.dumps({"task": json.loads(task_bytes), "session": json.loads(session_bytes)}).encode()
        return self._ask(TaskKind.HISTOGRAM, envelope, part=hashlib.sha256(envelope).hexdigest()[:16])

    def abort_histogram(self) -> None:
        """Cancel the bank's histogram task; its worker ends when the server stops (or at its watchdog)."""
        c = self.coordinator
        with c.lock, c.Session.begin() as s:
            c._expire(s, self.federation.key, self.round_id, TaskKind.HISTOGRAM, "the collective round was aborted")

    def _ask(self, kind: str, input_bytes: bytes, part: str = "") -> bytes:
        c = self.coordinator
        folder = c.workspace(self.federation).round_dir(self.round_id) / "exchange"
        question, answer = folder / f"{kind}-{self.bank}.in.json", folder / f"{kind}-{self.bank}.json"
        write_bytes(input_bytes, question)
        with c.lock, c.Session.begin() as s:
            tid = c._add_task(s, self.federation, self.round_id, kind, self.bank, question, answer, part).id
        c.wait_for_tasks([tid], "no answer before the deadline", self.poll_s)
        with c.Session() as s:
            task = s.get(store.Task, tid)
            if task.state != "done":
                raise RuntimeError(f"{self.bank} did not answer {kind}: {task.state} ({task.detail})")
            return Path(task.result_path).read_bytes()
