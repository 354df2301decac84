"""The service walks the masked evaluation from the declaration: real nodes answer every task (keys,
masked evaluations); a bank that fails its evaluation makes the service re-open the key exchange for
the others under a fresh session, and the round registers from their masked sum."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from test_acceptance_service import answer

from aggregator.service.config import ServiceConfig, TLSFiles
from aggregator.service.coordinator import Coordinator
from fedfraud.protocol import TaskKind

pytestmark = pytest.mark.slow


def test_a_bank_dropping_out_of_the_masked_evaluation_reruns_it_with_the_others(consortium, tmp_path):
    nodes = consortium.nodes
    dropout = sorted(nodes)[0]
    tls = TLSFiles(tmp_path / "ca.crt", tmp_path / "cert.pem", tmp_path / "key.pem")
    c = Coordinator(ServiceConfig(tls=tls, banks=tuple(nodes), database_url=f"sqlite:///{tmp_path / 'state.db'}",
                                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", work_dir=tmp_path / "agg"))
    request = {"model_name": "svc-secagg", "strategy": "bagging", "rounds": 1, "seed": 0, "min_banks": 2,
               "trees_per_round": 3, "banks": sorted(nodes), "crossval": False}
    c.start_federation("f", request)
    kinds: list[tuple[str, str]] = []

    def drive(done) -> None:
        while not done():
            for bank, node in nodes.items():
                while (task := c.next_task(bank)) is not None:
                    kinds.append((bank, task["kind"]))
                    if bank == dropout and task["kind"] == TaskKind.EVALUATE:  # it offered a key, then is gone
                        c.accept_failure(bank, task["id"], "ConnectionError: lost")
                        continue
                    data = c.task_input(bank, task["id"]) if task["has_input"] else b""
                    c.accept_result(bank, task["id"], answer(node, task["kind"], data))
            c.tick()

    drive(lambda: all(t.get("summary") == "done" for t in c.federation_status("f")["summaries"].values()))
    c.plan_federation("f")
    drive(lambda: c.federation_status("f")["state"] in ("planned", "failed"))
    assert c.federation_status("f")["state"] == "planned", c.federation_status("f")
    c.open_round("f", 1)

    def registered() -> bool:
        status = c.round_status("f", 1)
        assert status["state"] != "failed", status["error"]
        return status["state"] == "registered"

    drive(registered)
    # one key offer for the masked planning counts, one for the (masked) acceptance, then one per attempt of the
    # evaluation; one masked counts answer each
    assert kinds.count((dropout, TaskKind.KEYS)) == 3 and kinds.count((dropout, TaskKind.EVALUATE)) == 1
    others = sorted(set(nodes) - {dropout})
    assert all(kinds.count((b, TaskKind.KEYS)) == 4 and kinds.count((b, TaskKind.EVALUATE)) == 2 for b in others)
    assert all(kinds.count((b, TaskKind.COUNTS)) == 1 for b in nodes)
    with c.Session() as s:
        ws = c.workspace(c._federation(s, "f"))
    report = ws.read_json(ws.path(1, "registered"))
    assert report["evaluated_by"] == others and [a["attempt"] for a in report["secure_aggregation"]] == [1, 2]
    assert report["pooled"]["positives"] == sum(int(nodes[b].data.y_holdout.sum()) for b in others)
    plan = ws.read_json(ws.plan_path)
    assert plan["label_sums"]["holdout_positives"] == sum(int(nodes[b].data.y_holdout.sum()) for b in nodes)
    assert "holdout_positives" not in json.dumps(plan["counts"])
    assert (dropout, "masked_evaluation_missing") in {(x["bank"], x["check"]) for x in report["rejections"]}
    assert set(report["metrics_shared_by"]) == set(others)  # prepare_consortium's nodes share (in process)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}", registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tags = client.get_model_version("svc-secagg", str(report["version"])).tags
    assert tags["fedfraud.evaluated_by"] == ",".join(others) and dropout in tags["fedfraud.rejected_banks"]
    c.stop()
