"""The service walks the new ``accept`` bank phase from the declaration: real nodes answer every task.

No HTTP: each bank's node answers the tasks the coordinator hands out (as its agent would), the
ticker closes each phase, and the round goes train -> accept -> evaluate -> registered with the
acceptance verdicts and contributions in the round's report.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import make_coordinator
from mlflow import MlflowClient
from sqlalchemy import select

from aggregator.protocol.state import node_call
from aggregator.service import store
from aggregator.service.coordinator import Coordinator
from fedfraud.protocol import TaskKind

pytestmark = pytest.mark.slow


def answer(node, kind: str, data: bytes) -> bytes:
    if kind == TaskKind.SUMMARY:
        return json.dumps(node.summary()).encode()
    return node_call(node, kind)(data)  # train, accept, keys, evaluate (masked): the drivers' own map


def refused_open(c: Coordinator) -> bool:
    from aggregator.service.intake import Refused

    try:
        c.open_round("f", 1)
    except Refused as exc:
        return exc.check == "not_planned"
    return False


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
    c = make_coordinator(tmp_path, banks=tuple(nodes))
    request = {"model_name": "svc", "strategy": "bagging", "rounds": 1, "seed": 0, "min_banks": 2,
               "trees_per_round": 5, "banks": sorted(nodes)}
    c.start_federation("f", request)
    drive(c, nodes, lambda: all(t.get("summary") == "done" for t in c.federation_status("f")["summaries"].values()))
    assert c.plan_federation("f")["state"] == "counting"
    assert refused_open(c)  # rounds wait for the cross-evaluation
    drive(c, nodes, lambda: c.federation_status("f")["state"] not in ("counting", "cross-evaluating"))
    status = c.federation_status("f")
    assert status["state"] == "planned" and status["banks"] == sorted(nodes) and not status["excluded"], status
    with c.Session() as s:
        crossval = c.workspace(c._federation(s, "f")).root / "crossval" / "crossval.json"
    assert json.loads(crossval.read_text())["best_local"]["bank"] in nodes  # the champion gate's floor
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
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    metrics = client.get_run(client.get_model_version("svc", str(report["version"])).run_id).data.metrics
    for bank in nodes:  # each bank's judgement: the drop its update caused at the others, and its δ
        assert 0.01 <= metrics[f"acceptance_allowed_drop.{bank}"] < 1, metrics
        assert metrics[f"acceptance_drop.{bank}"] <= metrics[f"acceptance_allowed_drop.{bank}"], metrics
    c.stop()


def test_the_service_cross_evaluation_survives_a_restart_and_excludes_a_label_swapped_bank(consortium, tmp_path):
    from test_poisoning import swapped

    nodes = {**consortium.nodes}
    liar = sorted(nodes)[1]
    nodes[liar] = swapped(nodes[liar])
    c = make_coordinator(tmp_path, banks=tuple(nodes))
    c.start_federation("f", {"model_name": "svc-x", "strategy": "bagging", "rounds": 1, "seed": 0, "min_banks": 2,
                             "trees_per_round": 5, "banks": sorted(nodes)})
    drive(c, nodes, lambda: all(t.get("summary") == "done" for t in c.federation_status("f")["summaries"].values()))
    assert c.plan_federation("f")["state"] == "counting"
    c.stop()  # the aggregator restarts before any bank answered: the cross-evaluation runs again
    c = Coordinator(c.config).start()
    try:
        drive(c, nodes, lambda: c.federation_status("f")["state"] not in ("counting", "cross-evaluating"))
        status = c.federation_status("f")
        assert status["state"] == "planned", status
        assert status["banks"] == sorted(b for b in nodes if b != liar)
        assert set(status["excluded"]) == {liar} and status["excluded"][liar].startswith("crossval_"), status
    finally:
        c.stop()


def test_a_federation_request_can_turn_compaction_on_and_the_service_runs_its_phases(consortium, tmp_path):
    from aggregator.service.app import _federation_request

    nodes = consortium.nodes
    c = make_coordinator(tmp_path, banks=tuple(nodes))
    body = {"model_name": "svc-c", "strategy": "bagging", "rounds": 2, "seed": 0, "min_banks": 2,
            "trees_per_round": 4, "banks": sorted(nodes), "crossval": False, "compaction": True,
            "compaction_tolerance": 0.05}
    c.start_federation("f", _federation_request(json.dumps(body).encode()))
    drive(c, nodes, lambda: all(t.get("summary") == "done" for t in c.federation_status("f")["summaries"].values()))
    assert c.plan_federation("f")["state"] == "counting"  # round 0: the masked planning counts
    drive(c, nodes, lambda: c.federation_status("f")["state"] not in ("counting", "cross-evaluating"))
    assert c.federation_status("f")["state"] == "planned"
    for round_id in (1, 2):
        c.open_round("f", round_id)
        drive(c, nodes, lambda n=round_id: _registered(c, n))
    with c.Session() as s:
        ws = c.workspace(c._federation(s, "f"))
    record = ws.read_json(ws.round_dir(2) / "compaction.json")
    assert record["answered"] == sorted(nodes) and record["faults"] == [], record
    assert ws.read_json(ws.path(2, "registered"))["compaction"] == record
    c.stop()


def _registered(c: Coordinator, round_id: int) -> bool:
    status = c.round_status("f", round_id)
    assert status["state"] != "failed", status["error"]
    return status["state"] == "registered"


def test_after_a_refusal_the_service_asks_the_second_question_and_the_round_registers(consortium, tmp_path):
    from aggregator.service.app import _federation_request

    nodes = consortium.nodes
    c = make_coordinator(tmp_path, banks=tuple(nodes))
    body = {"model_name": "svc-p", "strategy": "bagging", "rounds": 1, "seed": 0, "min_banks": 2,
            "trees_per_round": 5, "banks": sorted(nodes), "crossval": False, "acceptance_delta": 0.0}
    c.start_federation("f", _federation_request(json.dumps(body).encode()))  # δ 0: any drop is refused
    drive(c, nodes, lambda: all(t.get("summary") == "done" for t in c.federation_status("f")["summaries"].values()))
    assert c.plan_federation("f")["state"] == "counting"  # round 0: the masked planning counts
    drive(c, nodes, lambda: c.federation_status("f")["state"] not in ("counting", "cross-evaluating"))
    assert c.federation_status("f")["state"] == "planned"
    c.open_round("f", 1)
    drive(c, nodes, lambda: _registered(c, 1))
    with c.Session() as s:
        ws = c.workspace(c._federation(s, "f"))
    [stage] = ws.read_json(ws.round_dir(1) / "acceptance.json")["stages"]
    worst = stage["second_question"]["without"]
    assert stage["refused"][0] == worst and stage["second_question"]["asked"] == sorted(nodes), stage
    assert stage["masked"]  # the default: both questions answered as masked sums over every bank
    for bank in (b for b in nodes if b != worst):  # judged again on the banks' answers to the second question
        assert stage["banks"][bank]["second_pass"]["evaluators"] == sorted(nodes)
    with c.Session() as s:
        parts = {t.id for t in s.scalars(select(store.Task).where(store.Task.kind == TaskKind.ACCEPT,
                                                                   store.Task.state == "done"))}
    assert len(parts) == 2 * len(nodes)  # the first question and the second, each answered by every bank
    report = ws.read_json(ws.path(1, "registered"))
    assert worst not in report["participants"]
    c.stop()
