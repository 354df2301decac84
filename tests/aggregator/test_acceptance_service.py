"""The service walks the new ``accept`` bank phase from the declaration: real nodes answer every task.

No HTTP: each bank's node answers the tasks the coordinator hands out (as its agent would), the
ticker closes each phase, and the round goes train -> accept -> evaluate -> registered with the
acceptance verdicts and contributions in the round's report.
"""

from __future__ import annotations

import json
import time

import pytest

from aggregator.service.config import ServiceConfig, TLSFiles
from aggregator.protocol.state import node_call
from aggregator.service.coordinator import Coordinator
from fedfraud.protocol import TaskKind

pytestmark = pytest.mark.slow


def answer(node, kind: str, data: bytes) -> bytes:
    if kind == TaskKind.SUMMARY:
        return json.dumps(node.summary()).encode()
    return node_call(node, kind)(data)  # train, accept, keys, evaluate (masked): the drivers' own map


def drive(c: Coordinator, nodes, done, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while not done():
        assert time.monotonic() < deadline, "the round did not finish"
        for bank, node in nodes.items():
            while (task := c.next_task(bank)) is not None:
                data = c.task_input(bank, task["id"]) if task["has_input"] else b""
                c.accept_result(bank, task["id"], answer(node, task["kind"], data))
        c.tick()


def test_a_bagging_round_through_the_service_scores_each_update_before_it_joins(consortium, tmp_path):
    nodes = consortium.nodes
    tls = TLSFiles(tmp_path / "ca.crt", tmp_path / "cert.pem", tmp_path / "key.pem")
    c = Coordinator(ServiceConfig(tls=tls, banks=tuple(nodes), database_url=f"sqlite:///{tmp_path / 'state.db'}",
                                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", work_dir=tmp_path / "agg"))
    request = {"model_name": "svc", "strategy": "bagging", "rounds": 1, "seed": 0, "min_banks": 2,
               "trees_per_round": 5, "banks": sorted(nodes)}
    c.start_federation("f", request)
    drive(c, nodes, lambda: all(t.get("summary") == "done" for t in c.federation_status("f")["summaries"].values()))
    assert c.plan_federation("f")["state"] == "planned"
    c.open_round("f", 1)

    def registered() -> bool:
        status = c.round_status("f", 1)
        assert status["state"] != "failed", status["error"]
        return status["state"] == "registered"

    drive(c, nodes, registered)
    status = c.round_status("f", 1)
    assert all(t.get(TaskKind.ACCEPT) == "done" for t in status["tasks"].values()), status["tasks"]
    with c.Session() as s:
        ws = c.workspace(c._federation(s, "f"))
    report = ws.read_json(ws.path(1, "registered"))
    assert set(report["contributions"]) == set(nodes) and report["participants"] == sorted(nodes)
    c.stop()
