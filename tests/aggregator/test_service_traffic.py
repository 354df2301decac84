"""Bytes on the wire in the service: counted where a bank fetches a task's input and uploads its result."""

from __future__ import annotations

import pytest
from conftest import bank_summary as summary, federation_request as request, make_coordinator

from aggregator.protocol import traffic
from aggregator.service.intake import Refused
from fedfraud.protocol import TaskKind
from pipelines.io import write_bytes


def test_the_service_counts_what_a_bank_fetches_and_uploads_refused_or_not(tmp_path):
    c = make_coordinator(tmp_path)
    c.start_federation("f1", request())
    first = c.next_task("gamma")
    c.accept_result("gamma", first["id"], summary("gamma"))  # a summary is no round's exchange: not counted
    with c.lock, c.Session.begin() as s:  # a round-1 task, as RemoteNode or a bank phase posts it
        federation = c._federation(s, "f1")
        ws = c.workspace(federation)
        write_bytes(b'{"question": "' + b"x" * 1000 + b'"}', ws.path(1, "tasks", "gamma"))
        tid = c._add_task(s, federation, 1, TaskKind.TRAIN, "gamma", ws.path(1, "tasks", "gamma"),
                          ws.path(1, "updates", "gamma")).id
    served = c.task_input("gamma", tid)
    again = c.task_input("gamma", tid)  # fetched twice: both crossed the wire
    with pytest.raises(Refused):
        c.accept_result("gamma", tid, b'{"not": "an update"}')  # refused, but its bytes arrived
    assert traffic.totals(ws.round_dir(1)) == {"gamma": {"received": len(served) + len(again), "sent": 20}}
    assert len(served) == 1016 and not list(tmp_path.rglob("round-0"))
