"""The bank boundary, audited in networked mode: the aggregator service and three bank agents as processes
(``tests/aggregator/test_service_network.py``'s stack), each agent run through ``recording_agent.py`` so every
HTTP request it sends is recorded. One round each of bagging (cross-evaluation and acceptance on), cyclic and
histogram. Every request must be a declared route with only allowed headers and query parameters, and carry
only the declared answer to its task (no score histogram in the clear: acceptance and cross-evaluation are
masked); masked evaluations must be random words; the aggregator's workspace, databases, MLflow store and log
must hold no bank's masked plaintext (its evaluations' and its cross-evaluation's).

The histogram strategy's gRPC channel (sidecar -> the service's federated server, over TLS) is recorded by the
bank itself: the agents run with ``FEDFRAUD_RECORD_EGRESS=1``, so each sidecar logs every request it sends
upstream (``histogram/egress.jsonl``), and every call must be a declared kind with random masked sums."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from boundary_audit import (distinctive, documented_in_clear, files_of, leaks, masked_plaintext,
                            randomness_problem)

from bank_node.histogram_worker import RECORD_EGRESS_ENV
from fedfraud.boundary import answer_kind, federated_kind, federated_problem, http_problem, masked_words
from fedfraud.secagg import federated_wire as fw
from fedfraud.secagg.masking import encode_counts

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
RECORDING_AGENT = HERE / "recording_agent.py"


def service_network():
    """``tests/aggregator/test_service_network.py`` (its ``Stack`` and helpers), by path."""
    module = sys.modules.get("test_service_network")
    if module is None:
        path = HERE.parent / "aggregator" / "test_service_network.py"
        spec = importlib.util.spec_from_file_location("test_service_network", path)
        module = sys.modules["test_service_network"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


net = service_network()


class RecordedStack(net.Stack):
    """The service as is; each bank's agent under ``recording_agent.py``, recording into ``<bank>.sent.jsonl``."""

    def _start(self, name: str, args: list[str]) -> None:
        if name == "aggregator":
            return super()._start(name, args)
        import os
        import subprocess

        log = open(self.root / f"{name}.log", "ab")
        self.egress(name).unlink(missing_ok=True)  # the bank's work folder is the test session's
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, RECORD_EGRESS_ENV: "1"}
        self.processes[name] = subprocess.Popen(
            [sys.executable, str(RECORDING_AGENT), str(self.record(name)), *args], stdout=log,
            stderr=subprocess.STDOUT, env=env)

    def egress(self, bank: str) -> Path:
        return self.root / "agents" / bank / "node" / "histogram" / "egress.jsonl"

    def record(self, bank: str) -> Path:
        return self.root / f"{bank}.sent.jsonl"

    def sent(self, bank: str) -> list[dict]:
        return [json.loads(line) for line in self.record(bank).read_text().splitlines()]


def federate(stack: RecordedStack, strategy: str) -> None:
    """One round of ``strategy`` through the service, registered (cross-evaluation only for bagging)."""
    key, operator = f"boundary-{strategy}", stack.client("airflow")
    operator.start_federation(key, {"model_name": key, "strategy": strategy, "rounds": 1, "seed": 3, "min_banks": 3,
                                    "trees_per_round": 3, "banks": net.BANKS, "crossval": strategy == "bagging",
                                    "champion_gate": False})
    net.wait(lambda: (lambda s: len(s) == len(net.BANKS) and all(v["summary"] == "done" for v in s.values()))(
        operator.federation(key)["summaries"]), 90, f"{key}'s summaries")
    operator.plan(key)
    plan = net.wait(lambda: (lambda s: s if s["state"] in ("planned", "failed") else None)(operator.federation(key)),
                    240, f"{key}'s plan")
    assert plan["state"] == "planned", plan
    operator.open_round(key, 1)
    status = net.finished(operator, key, 1)
    assert status["state"] == "registered", (status, stack.log("aggregator"))


@pytest.fixture(scope="module")
def stack(consortium, tmp_path_factory):
    stack = RecordedStack(tmp_path_factory.mktemp("boundary-network"), consortium)
    try:
        for bank in net.BANKS:
            stack.start_agent(bank)
        stack.start_service()
        for strategy in ("bagging", "cyclic", "histogram"):
            federate(stack, strategy)
        yield stack
    finally:
        stack.stop()


def requests_of(entries: list[dict]) -> list[dict]:
    return [e for e in entries if "method" in e]


def test_every_request_an_agent_sends_is_a_declared_route_carrying_a_declared_answer(stack):
    answered = Counter()
    for bank in net.BANKS:
        entries = stack.sent(bank)
        kinds = {e["task"]: e["kind"] for e in entries if "task" in e}
        for request in requests_of(entries):
            body = base64.b64decode(request["body"])
            task = request["path"].split("/")[3] if request["path"].startswith("/v1/tasks/") else None
            problem = http_problem(request["method"], request["path"], request["query"], request["headers"], body,
                                   kinds.get(task))
            assert problem is None, f"{bank}: {problem}"
            if request["path"].endswith("/result"):
                answered[answer_kind(kinds[task], body)] += 1
    assert set(answered) >= {"summary", "update", "key offer", "masked counts", "masked evaluation",
                             "masked score answer", "masked grid counts"}, answered
    assert "evaluation reports" not in answered, answered  # cross-evaluation and acceptance: masked


def test_the_federated_channel_over_tls_carries_declared_calls_and_random_sums_only(stack):
    ranks = set()
    for bank in net.BANKS:
        sent = [fw.parse_request(e["method"], base64.b64decode(e["request"]))
                for e in map(json.loads, stack.egress(bank).read_text().splitlines())]
        for request in sent:
            assert federated_problem(request) is None, f"{bank}: {federated_problem(request)}"
        kinds = Counter(federated_kind(r) for r in sent)
        assert kinds["key offer slot"] == 1 and kinds["masked sum"] > 10, (bank, kinds)
        words = b"".join(r.send_buffer for r in sent if federated_kind(r) == "masked sum")
        assert randomness_problem(words, f"{bank}'s masked sums") is None
        ranks |= {r.rank for r in sent}
    assert ranks == set(range(len(net.BANKS)))


def test_the_services_round_traffic_holds_each_banks_collectives_as_its_egress_record_shows(stack):
    """The histogram round's bytes on the wire (``aggregator.protocol.traffic``): each bank's report of its
    sidecar's gRPC bytes with the service's federated server is its ``collectives`` exchange, exactly what the
    bank's own egress record shows it sent, next to its tasks fetched and answers uploaded over HTTP."""
    from aggregator.protocol import traffic

    [round_dir] = (stack.root / "aggregator").glob("runs/*/federations/boundary-histogram/round-1")
    totals = traffic.totals(round_dir)
    for bank in net.BANKS:
        collectives = json.loads((round_dir / traffic.FOLDER / f"collectives__{bank}.json").read_text())
        egress = map(json.loads, stack.egress(bank).read_text().splitlines())
        sent = sum(len(base64.b64decode(e["request"])) for e in egress)
        assert collectives["sent"] == sent and collectives["received"] > sent, (bank, collectives)
        over_http = {way: totals[bank][way] - collectives[way] for way in ("sent", "received")}
        assert over_http["sent"] > 0 and over_http["received"] > 0, (bank, totals[bank])


def bank_side_plaintext(stack, bank: str, kinds=("evaluate", "evaluate_champion")
                        ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Each model this bank masked in tasks of ``kinds``, scored again on its holdout here (the bank's side): its
    plain histograms."""
    entries = stack.sent(bank)
    kind_of = {e["task"]: e["kind"] for e in entries if "task" in e}
    tasks = [base64.b64decode(e["body"]) for e in entries if "input_of" in e and kind_of.get(e["input_of"]) in kinds]
    return masked_plaintext(stack.consortium.nodes[bank], tasks)


def test_masked_evaluations_over_the_network_are_random_words(stack):
    for bank in net.BANKS:
        entries = stack.sent(bank)
        kinds = {e["task"]: e["kind"] for e in entries if "task" in e}
        masked = b"".join(masked_words(json.loads(base64.b64decode(r["body"]))["words"])
                          for r in requests_of(entries) if r["path"].endswith("/result")
                          and answer_kind(kinds[r["path"].split("/")[3]]) == "masked evaluation")
        assert randomness_problem(masked, f"{bank}'s masked evaluations") is None
        clear = b"".join(encode_counts(np.concatenate([pos, neg])).astype("<u8").tobytes()
                         for _, pos, neg in bank_side_plaintext(stack, bank))
        assert len(clear) == len(masked) and "not uniform" in (randomness_problem(clear, bank) or "")


def service_blobs(stack) -> dict[str, bytes]:
    """The service's workspace, databases, MLflow store and log."""
    root = stack.root
    blobs = {**files_of(root / "aggregator"), "mlflow.db": (root / "mlflow.db").read_bytes(),
             "aggregator.log": (root / "aggregator.log").read_bytes()}
    if (root / "mlartifacts").exists():
        blobs.update({f"mlartifacts/{k}": v for k, v in files_of(root / "mlartifacts").items()})
    return blobs


def test_grid_counts_over_the_network_are_random_words_and_their_plaintext_is_not_at_the_service(stack):
    from aggregator.strategies.histogram import Histogram
    from fedfraud.protocol import TaskKind

    blobs, searched = service_blobs(stack), 0
    for bank in net.BANKS:
        entries = stack.sent(bank)
        kinds = {e["task"]: e["kind"] for e in entries if "task" in e}
        answers = [json.loads(base64.b64decode(r["body"])) for r in requests_of(entries)
                   if r["path"].endswith("/result") and kinds[r["path"].split("/")[3]] == TaskKind.BIN_COUNTS]
        assert len(answers) == 1 and set(answers[0]) == {"bank", "session", "words"}, [sorted(a) for a in answers]
        assert randomness_problem(masked_words(answers[0]["words"]), f"{bank}'s masked grid counts") is None
        for feature, row in enumerate(Histogram.grid_layout.dense_counts(stack.consortium.nodes[bank].data.X_train)):
            for name, vector in (("dense", row), ("occupied", row[row > 0])):
                if distinctive(vector):
                    searched += 1
                    assert leaks(vector, blobs) == [], f"{bank}'s {name} grid counts of feature {feature}"
    assert searched >= 2 * len(net.BANKS)


def test_the_services_files_and_log_hold_no_masked_plaintext(stack):
    blobs = service_blobs(stack)
    searched, outside = Counter(), {}
    for bank in net.BANKS:
        for kinds in (("evaluate", "evaluate_champion"), ("crossval",)):
            for model_id, pos, neg in bank_side_plaintext(stack, bank, kinds):
                for name, vector in (("positives", pos), ("negatives", neg)):
                    if distinctive(vector):
                        searched[kinds[0]] += 1
                        if rest := [p for p in leaks(vector, blobs) if not documented_in_clear(p)]:
                            outside[f"{bank}'s {name} histogram of {model_id}"] = rest
    # every bank's histograms of the others' local models are searched (bagging's cross-evaluation), found nowhere
    assert searched["evaluate"] >= len(net.BANKS) and searched["crossval"] >= len(net.BANKS), searched
    assert outside == {}
