"""Histogram federation: banks as separate processes grow the pooled model, bit for bit.

Toy banks (real BankNodes on small numpy data, each with a consortium certificate) cover
exactness, worlds, failures and TLS. Every round runs with secure aggregation (the default):
each bank's worker behind its masking sidecar. The `consortium` tests run the whole path
(Spark-prepared banks, MLflow registry).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import assert_masked

from fedfraud.binning import FLOAT32_MAX, BinCounts, GlobalBins, Grid, count_cells
from aggregator.federated_server import FederatedServer, ServerFailed, ServerTLS
from aggregator.drivers.embedded import STRATEGY_CHOICES, processes_kept, run_federation, train_round
from aggregator.protocol.errors import RoundFailed
from fedfraud.settings import FederationSettings, consortium_params
from aggregator.strategies import STRATEGIES, Histogram
from bank_node.dataset import BankDataset
from bank_node.exact_gradients import fixed_point_logistic
from bank_node import kept_worker
from bank_node.histogram_worker import RECORD_EGRESS_ENV, ClientTLS, WorkerFailed, start_worker
from fedfraud.histogram_session import HistogramSession
from bank_node.node import BankNode
from bank_node.policy import TaskRefused
from bank_node.training import dmatrix, train_trees
from fedfraud import model_json, pki
from fedfraud.wire import ModelUpdate, TrainTask

FEATURES = ["amount", "count", "signed", "heavy", "flag", "gap"]
SETTINGS = FederationSettings(trees_per_round=6, max_depth=4, max_bin=32, colsample_bytree=0.8)


# ---------------------------------------------------------------------------- toy banks

def toy_rows(rng, rows, shift):
    X = np.column_stack([
        rng.exponential(40 * (1 + shift), rows), rng.integers(0, 5, rows), rng.normal(shift, 1, rows),
        rng.lognormal(0, 2, rows), rng.random(rows) < 0.2, np.where(rng.random(rows) < 0.3, np.nan, 1.0),
    ]).astype(np.float32)
    X[:, :5][rng.random((rows, 5)) < 0.04] = np.nan
    logit = (0.01 * np.nan_to_num(X[:, 0]) - 3 + 0.8 * np.nan_to_num(X[:, 2]) + np.nan_to_num(X[:, 4])
             + 1.5 * np.isnan(X[:, 5]))
    return X, (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int32)


def toy_node(root: Path, bank: str, X, y, contract) -> BankNode:
    """A real BankNode on in-memory rows (no Spark): its gate report says it may train."""
    work = root / bank
    (work / "validation").mkdir(parents=True, exist_ok=True)
    (work / "validation" / "report.json").write_text(json.dumps(
        {"training_allowed": True, "decline_reasons": [], "event_time_min": "0", "event_time_max": "1"}))
    node = BankNode(bank, work, work, config=None)
    cut = int(len(y) * 0.75)
    node.__dict__["contract"] = contract
    node.__dict__["data"] = BankDataset(FEATURES, X[:cut], y[:cut], X[cut:], y[cut:], None)
    return node


TOY_BANKS = (("alpha", 1200, 0), ("beta", 1800, 1), ("gamma", 900, 2), ("delta", 1000, 1))


def certify(nodes, folder: Path) -> ServerTLS:
    """A consortium (``fedfraud provision``): each node gets its bank certificate; returns the server's TLS."""
    folders = pki.provision("toy", [pki.AGGREGATOR, *sorted(nodes)], folder)
    for bank, node in nodes.items():
        node.histogram_tls = ClientTLS(str(folders[bank] / "ca.crt"), str(folders[bank] / "key.pem"),
                                       str(folders[bank] / "cert.pem"))
    server = folders[pki.AGGREGATOR]
    return ServerTLS(str(server / "key.pem"), str(server / "cert.pem"), str(server / "ca.crt"))


@pytest.fixture
def toy(tmp_path):
    """Four toy banks with consortium certificates (masked sums need three banks, and a bank lost must
    leave three)."""
    rng = np.random.default_rng(17)
    contract = {"names": FEATURES, "hash": "c" * 64}
    nodes = {bank: toy_node(tmp_path, bank, *toy_rows(rng, rows, shift), contract) for bank, rows, shift in TOY_BANKS}
    certify(nodes, tmp_path / "pki")
    return nodes, contract


def make_strategy(nodes, settings=SETTINGS, seed=5) -> Histogram:
    y = np.concatenate([getattr(n, "node", n).data.y_train for n in nodes.values()])
    return Histogram(settings, seed, consortium_params(settings, int(y.sum()), int(len(y) - y.sum())))


def pooled_chain(nodes, banks, strategy, rounds, contract):
    """The centralized fit on the same binned pooled rows: ``train_trees`` (what the centralized
    baseline runs), one call per round with the round's task, warm-started like the federation."""
    X = np.concatenate([strategy.bins.apply(nodes[b].data.X_train) for b in banks])
    y = np.concatenate([nodes[b].data.y_train for b in banks])
    booster = None
    for round_id in range(1, rounds + 1):
        task = strategy.configure(round_id, "pooled", 0, None, contract["hash"])
        task = dataclasses.replace(task, base_model=None if booster is None else model_json.to_doc(booster))
        booster = train_trees(task, X, y, FEATURES, obj=fixed_point_logistic(task.params))
    return booster


def our_children() -> list[str]:
    """Command lines of this process's live histogram workers, masking sidecars and federated servers."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and (
                "histogram_worker" in cmdline or "federated_server" in cmdline or "secagg_sidecar" in cmdline):
            found.append(cmdline)
    return found


# ---------------------------------------------------------------------------- exactness

def test_histogram_is_a_registered_strategy():
    assert STRATEGIES["histogram"] is Histogram and "histogram" in STRATEGY_CHOICES


def test_rounds_equal_a_pooled_fit_on_the_binned_rows(toy):
    nodes, contract = toy
    banks = sorted(nodes)
    strategy = make_strategy(nodes)
    doc = None
    for round_id in (1, 2):
        doc, participants, rejections = train_round(nodes, strategy, banks, round_id, doc, contract, SETTINGS)
        assert participants == set(banks) and rejections == []
    assert len(model_json.trees(doc)) == 2 * SETTINGS.trees_per_round
    assert strategy.consortium_params["subsample"] == 1.0
    pooled = pooled_chain(nodes, banks, strategy, 2, contract)
    federated = model_json.to_booster(doc)
    for part in ("X_train", "X_holdout"):
        raw = np.concatenate([getattr(nodes[b].data, part) for b in banks])
        binned = strategy.bins.apply(raw)
        expected = pooled.predict(dmatrix(binned, None, FEATURES))
        assert np.array_equal(federated.predict(dmatrix(binned, None, FEATURES)), expected)
        assert np.array_equal(federated.predict(dmatrix(raw, None, FEATURES)), expected)  # raw features
    conditions = [c for t in model_json.trees(doc) for n, c in enumerate(t["split_conditions"])
                  if not model_json.is_leaf(t, n)]
    assert any(abs(np.float32(c)) == np.float32(FLOAT32_MAX) for c in conditions), "no missing-vs-present split"
    assert our_children() == []


def test_shared_bins_come_from_counts_only(toy, monkeypatch):
    """Masked grid counts (the default) give the edges of the plaintext pooled counts; clear counts only leave a
    bank that allows unmasked sessions."""
    nodes, _ = toy
    banks = sorted(nodes)
    strategy = make_strategy(nodes)
    bins = strategy.shared_bins(nodes, banks)
    assert strategy.grid_banks == banks and strategy.grid_faults == []
    pooled = np.concatenate([nodes[b].data.X_train for b in banks])
    assert bins.digest == GlobalBins.from_counts([BinCounts("all", 7, count_cells(pooled))], SETTINGS.max_bin).digest
    with pytest.raises(TaskRefused, match="secagg_required"):
        nodes["alpha"].bin_counts(Grid().to_bytes())
    monkeypatch.setenv("FEDFRAUD_SECAGG_ALLOW_UNMASKED", "1")
    payload = json.loads(nodes["alpha"].bin_counts(Grid().to_bytes()))
    assert all(isinstance(v, int) for part in payload["cells"] + payload["counts"] for v in part)


def test_aggregate_refuses_banks_that_disagree(toy):
    nodes, contract = toy
    strategy = make_strategy(nodes)
    strategy.world = ["alpha", "beta"]
    X, y = nodes["alpha"].data.X_train, nodes["alpha"].data.y_train
    docs = []
    for seed in (1, 2):
        task = TrainTask("alpha", 1, "none", contract["hash"], 2, {**strategy.consortium_params, "seed": seed})
        docs.append(model_json.to_doc(train_trees(task, X, y, FEATURES)))
    updates = [ModelUpdate(b, 1, "none", contract["hash"], 0, {}, {}, d) for b, d in zip(strategy.world, docs)]
    with pytest.raises(RoundFailed, match="2 different models"):
        strategy.aggregate(None, updates)
    with pytest.raises(RoundFailed, match="world was"):
        strategy.aggregate(None, updates[:1])
    same = [dataclasses.replace(u, model=docs[0]) for u in updates]
    assert len(model_json.trees(strategy.aggregate(None, same))) == 2


# ---------------------------------------------------------------------------- worlds and failures

class Unreachable:
    """A bank that cannot be reached when the round starts."""

    def __init__(self, node):
        self.node, self.bank = node, node.bank

    def summary(self):
        raise ConnectionError(f"{self.bank} is unreachable")

    def train_histogram(self, task_bytes, session_bytes):
        raise AssertionError("a bank outside the world must not be asked to train")


def test_the_world_is_the_banks_ready_at_round_start(toy):
    nodes, contract = toy
    nodes = {**nodes, "gamma": Unreachable(nodes["gamma"])}
    strategy = make_strategy(nodes)
    doc, participants, rejections = train_round(nodes, strategy, sorted(nodes), 1, None, contract, SETTINGS)
    assert participants == {"alpha", "beta", "delta"}
    assert [(r.bank, r.check) for r in rejections] == [("gamma", "bank_not_ready")]
    pooled = pooled_chain(nodes, ["alpha", "beta", "delta"], strategy, 1, contract)
    binned = strategy.bins.apply(nodes["beta"].data.X_holdout)
    assert np.array_equal(model_json.to_booster(doc).predict(dmatrix(binned, None, FEATURES)),
                          pooled.predict(dmatrix(binned, None, FEATURES)))
    quorum = dataclasses.replace(SETTINGS, min_banks=4)
    with pytest.raises(RoundFailed, match="3 bank\\(s\\) ready for the collective round, quorum is 4"):
        train_round(nodes, make_strategy(nodes, quorum), sorted(nodes), 1, None, contract, quorum)
    two = {b: nodes[b] for b in ("alpha", "beta", "gamma")}  # gamma unreachable: two banks left
    with pytest.raises(RoundFailed, match="too_few_parties: 2 bank\\(s\\) ready, masked sums need 3"):
        train_round(two, make_strategy(two), sorted(two), 1, None, contract, SETTINGS)
    assert our_children() == []


class Dies:
    """A bank whose training process is killed (SIGKILL) once the first tree is built."""

    def __init__(self, node, sig=signal.SIGKILL):
        self.node, self.bank, self.sig = node, node.bank, sig
        self.killed_at: float | None = None

    def __getattr__(self, name):
        return getattr(self.node, name)

    def train_histogram(self, task_bytes, session_bytes):
        threading.Thread(target=self._kill_after_first_tree, daemon=True).start()
        return self.node.train_histogram(task_bytes, session_bytes)

    def _kill_after_first_tree(self):
        progress = self.node.work_dir / "histogram" / "progress"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            worker = self.node._histogram_worker
            if worker is not None and progress.exists() and progress.read_text().strip():
                os.kill(worker.pid, self.sig)
                self.killed_at = time.monotonic()
                return
            time.sleep(0.02)


def test_a_bank_dying_mid_round_fails_the_round_fast_and_a_retry_runs_with_the_rest(toy):
    nodes, contract = toy
    many_trees = dataclasses.replace(SETTINGS, trees_per_round=400)
    dying = Dies(nodes["beta"])
    strategy = make_strategy(nodes, many_trees)
    with pytest.raises(RoundFailed, match="beta failed") as failure:
        train_round({**nodes, "beta": dying}, strategy, sorted(nodes), 1, None, contract, many_trees)
    assert dying.killed_at is not None
    assert time.monotonic() - dying.killed_at < 45, "the round must fail promptly, not wait for a timeout"
    assert "nothing registered" in str(failure.value)
    assert our_children() == [], "every worker and the server are gone"
    healthy = {b: n for b, n in nodes.items() if b != "beta"}
    retry = make_strategy(healthy)
    doc, participants, _ = train_round(healthy, retry, sorted(healthy), 1, None, contract, SETTINGS)
    assert participants == {"alpha", "delta", "gamma"} and len(model_json.trees(doc)) == SETTINGS.trees_per_round
    assert our_children() == []


class SidecarDies(Dies):
    """A bank whose masking sidecar is killed once the first tree is built (keys agreed, sums masked)."""

    def _kill_after_first_tree(self):
        progress = self.node.work_dir / "histogram" / "progress"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            worker = self.node._histogram_worker
            if worker is not None and worker.sidecar is not None and progress.exists() and progress.read_text().strip():
                os.kill(worker.sidecar.pid, self.sig)
                self.killed_at = time.monotonic()
                return
            time.sleep(0.02)


@pytest.mark.slow
def test_a_bank_whose_sidecar_dies_fails_the_round_and_the_retry_agrees_fresh_keys(toy):
    nodes, contract = toy
    many_trees = dataclasses.replace(SETTINGS, trees_per_round=400)
    dying = SidecarDies(nodes["gamma"])
    strategy = make_strategy(nodes, many_trees)
    with pytest.raises(RoundFailed, match="gamma failed: .*secagg sidecar exited"):
        train_round({**nodes, "gamma": dying}, strategy, sorted(nodes), 1, None, contract, many_trees)
    assert dying.killed_at is not None and our_children() == []
    first = json.loads((nodes["alpha"].work_dir / "histogram" / "job.json").read_text())["session"]
    assert ":a1:" in first["secagg_session"] and ":a2:" in strategy.key_session(1)  # attempts are numbered
    healthy = {b: n for b, n in nodes.items() if b != "gamma"}
    doc, participants, _ = train_round(healthy, make_strategy(healthy), sorted(healthy), 1, None, contract, SETTINGS)
    retry = json.loads((nodes["alpha"].work_dir / "histogram" / "job.json").read_text())["session"]
    assert participants == set(healthy) and len(model_json.trees(doc)) == SETTINGS.trees_per_round
    assert first["secagg_session"] != retry["secagg_session"] and retry["banks"] == sorted(healthy)
    assert our_children() == []


def test_a_hung_bank_is_cut_off_by_the_round_timeout(toy):
    nodes, contract = toy
    many_trees = dataclasses.replace(SETTINGS, trees_per_round=400)
    frozen = Dies(nodes["gamma"], signal.SIGSTOP)  # alive but silent: its peers wait on it
    strategy = make_strategy(nodes, many_trees)
    strategy.round_timeout_s = 12
    started = time.monotonic()
    # The aggregator's watch or, on a loaded machine, the workers' own deadline cuts the round off.
    with pytest.raises(RoundFailed, match="no result within 12s|deadline passed"):
        train_round({**nodes, "gamma": frozen}, strategy, sorted(nodes), 1, None, contract, many_trees)
    assert time.monotonic() - started < 12 + 40
    assert our_children() == []


# ---------------------------------------------------------------------------- kept worlds

class KeepsUpdates:
    """A bank as is, keeping every update it returns."""

    def __init__(self, node):
        self.node, self.bank, self.updates = node, node.bank, []

    def __getattr__(self, name):
        return getattr(self.node, name)

    def train_histogram(self, task_bytes, session_bytes):
        self.updates.append(self.node.train_histogram(task_bytes, session_bytes))
        return self.updates[-1]


def egress_bytes(node) -> list[int]:
    """The size of every request the bank's sidecar sent the federated server, in order (its egress record)."""
    path = node.work_dir / "histogram" / "egress.jsonl"
    return [len(base64.b64decode(json.loads(line)["request"])) for line in path.read_text().splitlines()]


def kept_pids(nodes) -> dict[str, tuple[int, int | None]]:
    """Each bank's kept (worker, sidecar) pids in this process."""
    return {bank: (live.pid, live.sidecar and live.sidecar.pid) for bank, node in nodes.items()
            if (live := kept_worker._LIVE.get(str(node.work_dir / "histogram"))) is not None}


def keyed_sessions(node) -> list[str]:
    """The sessions a bank's kept sidecar agreed keys for, in order (from its log)."""
    log = (node.work_dir / "histogram" / "sidecar.log").read_text()
    return [line.split(" keys for ", 1)[1].split()[0] for line in log.splitlines() if " keys for " in line]


def test_a_kept_world_trains_every_round_on_one_server_and_one_worker_per_bank_with_fresh_keys(toy, monkeypatch):
    monkeypatch.setenv(RECORD_EGRESS_ENV, "1")
    nodes, contract = toy
    banks = sorted(nodes)
    kept = {bank: KeepsUpdates(node) for bank, node in nodes.items()}
    strategy = make_strategy(nodes)
    doc, servers, workers, sent_before = None, set(), [], dict.fromkeys(banks, 0)
    with processes_kept(strategy):
        for round_id in (1, 2, 3):
            doc, participants, _ = train_round(kept, strategy, banks, round_id, doc, contract, SETTINGS)
            assert participants == set(banks)
            for bank in banks:  # each round reports its own session's bytes (its key agreement on), none before
                sent = sum(egress_bytes(nodes[bank]))
                reported = ModelUpdate.from_bytes(kept[bank].updates[-1]).collective_bytes
                assert reported["sent"] == sent - sent_before[bank] > 16384 and reported["received"] > 16384
                sent_before[bank] = sent
            servers.add(strategy.world_state.server.process.pid)
            workers.append(kept_pids(nodes))
            assert strategy.last_timings["world"] == ("new" if round_id == 1 else "kept")
        assert len(servers) == 1 and workers[0] == workers[1] == workers[2] and len(workers[0]) == 4
        sessions = {bank: keyed_sessions(nodes[bank]) for bank in banks}
        assert all(len(s) == 3 and len(set(s)) == 3 for s in sessions.values()), "fresh keys every round"
        assert all([":r1:", ":r2:", ":r3:"] == [f":r{s.split(':r', 1)[1].split(':')[0]}:" for s in v]
                   for v in sessions.values())
        assert len({tuple(v) for v in sessions.values()}) == 1, "every bank keyed the same sessions"
    assert our_children() == [] and kept_worker._LIVE == {}, "the shutdown hook ends server and workers"
    pooled = pooled_chain(nodes, banks, strategy, 3, contract)
    raw = np.concatenate([nodes[b].data.X_holdout for b in banks])
    binned = strategy.bins.apply(raw)
    assert np.array_equal(model_json.to_booster(doc).predict(dmatrix(raw, None, FEATURES)),
                          pooled.predict(dmatrix(binned, None, FEATURES)))


def test_a_bank_dying_in_a_kept_world_fails_the_round_fast_and_the_next_round_runs_with_the_rest(toy):
    nodes, contract = toy
    many_trees = dataclasses.replace(SETTINGS, trees_per_round=400)
    strategy = make_strategy(nodes, many_trees)
    with processes_kept(strategy):
        strategy.settings = SETTINGS
        doc, _, _ = train_round(nodes, strategy, sorted(nodes), 1, None, contract, SETTINGS)
        strategy.settings = many_trees
        dying = Dies(nodes["beta"])
        with pytest.raises(RoundFailed, match="round 2: .*beta failed"):
            train_round({**nodes, "beta": dying}, strategy, sorted(nodes), 2, doc, contract, many_trees)
        assert dying.killed_at is not None and time.monotonic() - dying.killed_at < 45
        assert strategy.world_state is None and our_children() == [], "the failed world's processes are gone"
        strategy.settings = SETTINGS
        healthy = {b: n for b, n in nodes.items() if b != "beta"}
        doc2, participants, _ = train_round(healthy, strategy, sorted(healthy), 2, doc, contract, SETTINGS)
        assert participants == set(healthy) and strategy.last_timings["world"] == "new"
        assert len(model_json.trees(doc2)) == 2 * SETTINGS.trees_per_round
    assert our_children() == []


def test_a_bank_that_lost_its_kept_worker_between_rounds_costs_a_new_world_not_the_round(toy):
    nodes, contract = toy
    strategy = make_strategy(nodes)
    with processes_kept(strategy):
        doc, _, _ = train_round(nodes, strategy, sorted(nodes), 1, None, contract, SETTINGS)
        first = kept_pids(nodes)
        os.kill(first["gamma"][0], signal.SIGKILL)  # the bank's worker is gone; its node does not know yet
        stat = Path(f"/proc/{first['gamma'][0]}/stat")
        while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # dead, not yet reaped
            time.sleep(0.02)
        doc, participants, _ = train_round(nodes, strategy, sorted(nodes), 2, doc, contract, SETTINGS)
        assert participants == set(nodes) and strategy.last_timings["world"] == "new"
        assert all(pids[0] != first[b][0] for b, pids in kept_pids(nodes).items())
    assert our_children() == []
    pooled = pooled_chain(nodes, sorted(nodes), strategy, 2, contract)
    binned = strategy.bins.apply(nodes["delta"].data.X_holdout)
    assert np.array_equal(model_json.to_booster(doc).predict(dmatrix(binned, None, FEATURES)),
                          pooled.predict(dmatrix(binned, None, FEATURES)))


def test_a_kept_worker_refuses_a_round_of_a_world_it_did_not_train(toy):
    nodes, contract = toy
    strategy = make_strategy(nodes)
    strategy.bins = strategy.shared_bins(nodes, sorted(nodes))
    session = HistogramSession(bank="alpha", round_id=2, server_address="127.0.0.1:1", world_size=3, rank=0,
                               bins=strategy.bins.to_dict(), banks=["alpha", "beta", "gamma"], secagg_session="s:1",
                               world_id="wdeadbeef", world_round=1)
    task = strategy.configure(2, "alpha", 0, None, contract["hash"])
    with pytest.raises(WorkerFailed, match="histogram_worker_lost: round 1 of world wdeadbeef"):
        start_worker(nodes["alpha"].work_dir, nodes["alpha"].data, contract["hash"], task.to_bytes(), session,
                     nodes["alpha"].histogram_tls)
    bad = dataclasses.replace(session, world_id="", world_round=1)
    assert "world round" in bad.world_problem()


# ---------------------------------------------------------------------------- bytes on the wire

class MisReports(KeepsUpdates):
    """A bank whose update reports ``counted`` as its collective bytes."""

    def __init__(self, node, counted):
        super().__init__(node)
        self.counted = counted

    def train_histogram(self, task_bytes, session_bytes):
        body = json.loads(super().train_histogram(task_bytes, session_bytes))
        self.updates[-1] = json.dumps({**body, "collective_bytes": self.counted}).encode()
        return self.updates[-1]


def test_a_rounds_traffic_holds_each_banks_collectives_as_its_sidecar_sent_them_and_a_malformed_count_is_refused(
        toy, tmp_path, monkeypatch):
    """Each bank's report of its sidecar's bytes with the federated server is its round's ``collectives`` exchange:
    what its egress record shows, far above its task and update. A malformed report refuses the bank's update by
    name (and so the collective round: every bank's update is needed) and records nothing."""
    from aggregator.protocol import phases, traffic
    from aggregator.protocol.plan import Plan
    from aggregator.protocol.state import RoundState
    from aggregator.protocol.training import checks
    from aggregator.protocol.workspace import Workspace

    monkeypatch.setenv(RECORD_EGRESS_ENV, "1")
    nodes, contract = toy
    banks = sorted(nodes)
    strategy = make_strategy(nodes)
    plan = Plan(model_name="wire", strategy=strategy.name, rounds=1, seed=strategy.seed, settings=SETTINGS,
                contract_hash=contract["hash"], feature_names=FEATURES, banks=banks, excluded={},
                consortium_params=strategy.consortium_params, federation_id="wire")
    ws = Workspace(tmp_path / "aggregator", plan.model_name)
    r = RoundState(ws, plan, 1, None, strategy)
    sent = {bank: KeepsUpdates(node) for bank, node in nodes.items()}
    sent["delta"] = MisReports(nodes["delta"], {"sent": -1, "received": 10})
    with pytest.raises(RoundFailed, match="world was"):
        phases.run_stages(r, sent)
    assert [(x["bank"], x["check"]) for x in checks(r)["rejections"]] == [("delta", "collective_bytes_malformed")]
    records = {p.stem: ws.read_json(p) for p in (ws.round_dir(1) / traffic.FOLDER).glob("*.json")}
    honest = [bank for bank in banks if bank != "delta"]
    assert sorted(records) == sorted([f"updates__{b}" for b in banks] + [f"collectives__{b}" for b in honest])
    totals = traffic.totals(ws.round_dir(1))
    for bank in honest:
        collectives, exchange = records[f"collectives__{bank}"], records[f"updates__{bank}"]
        assert ModelUpdate.from_bytes(sent[bank].updates[0]).collective_bytes == {
            "sent": collectives["sent"], "received": collectives["received"]}
        assert collectives["sent"] == sum(egress_bytes(nodes[bank]))
        assert exchange == {"bank": bank, "received": strategy.asked[bank], "sent": len(sent[bank].updates[0])}
        assert totals[bank] == {way: collectives[way] + exchange[way] for way in ("received", "sent")}
        assert collectives["sent"] > 5 * exchange["sent"] and collectives["received"] > 5 * exchange["received"]
    assert totals["delta"] == {"received": strategy.asked["delta"], "sent": len(sent["delta"].updates[0])}
    assert sum(egress_bytes(nodes["delta"])) > 0, "delta did exchange its collectives; only its report is refused"
    assert our_children() == []


# ---------------------------------------------------------------------------- channel security

def test_a_bank_refuses_plain_grpc_off_loopback_and_tls_without_its_certificate(toy):
    nodes, contract = toy
    node = nodes["alpha"]
    bins = make_strategy(nodes).shared_bins(nodes, sorted(nodes))
    task = TrainTask("alpha", 1, "none", contract["hash"], 1, {}).to_bytes()

    def session(**kw):
        return HistogramSession(**{"bank": "alpha", "round_id": 1, "server_address": "127.0.0.1:1", "world_size": 1,
                                   "rank": 0, "bins": bins.to_dict(), **kw})

    with pytest.raises(WorkerFailed, match="refusing plain gRPC"):
        start_worker(node.work_dir, node.data, contract["hash"], task, session(server_address="10.0.0.5:5000"), None)
    with pytest.raises(WorkerFailed, match="requires TLS"):
        start_worker(node.work_dir, node.data, contract["hash"], task, session(tls=True), None)
    with pytest.raises(WorkerFailed, match="feature contract"):
        start_worker(node.work_dir, node.data, "d" * 64, task, session(), None)
    world = {"world_size": 3, "banks": ["alpha", "beta", "gamma"], "secagg_session": "histogram:t:r1:a1:00"}
    with pytest.raises(WorkerFailed, match="secagg_required"):  # a bank does not join an unmasked round
        start_worker(node.work_dir, node.data, contract["hash"], task, session(**world, secagg=False), None)
    with pytest.raises(WorkerFailed, match="secagg_session: rank 0 is beta, not alpha"):
        start_worker(node.work_dir, node.data, contract["hash"], task,
                     session(**{**world, "banks": ["beta", "alpha", "gamma"]}), None)
    with pytest.raises(WorkerFailed, match="secagg_no_identity"):
        start_worker(node.work_dir, node.data, contract["hash"], task, session(**world), None)


def test_federated_server_stops_and_frees_its_port():
    server = FederatedServer(2).start()
    port, pid = server.port, server.process.pid
    assert server.alive()
    server.stop()
    assert not server.alive() and not Path(f"/proc/{pid}").exists()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # released
    broken = FederatedServer(1, tls=ServerTLS("/nonexistent.key", "/nonexistent.crt", "/nonexistent.ca"),
                             startup_timeout_s=30, attempts=1)
    started = time.monotonic()
    with pytest.raises(ServerFailed):
        broken.start()
    assert time.monotonic() - started < 30 and not broken.alive()


def test_a_federated_server_exits_when_its_aggregator_is_killed(tmp_path):
    import subprocess
    import sys

    pid_file = tmp_path / "server.pid"
    code = ("import sys, time; from aggregator.federated_server import FederatedServer; "
            f"server = FederatedServer(3).start(); open({str(pid_file)!r}, 'w').write(str(server.process.pid)); "
            "time.sleep(600)")
    aggregator = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert aggregator.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        server_pid = int(pid_file.read_text())
        os.kill(aggregator.pid, signal.SIGKILL)  # no stop(), no finally: only the server's own watch is left
        aggregator.wait(10)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{server_pid}").exists() and "Z" not in Path(f"/proc/{server_pid}/stat").read_text(
                ).rsplit(")", 1)[1].split()[:1]:
            assert time.monotonic() < deadline, "the federated server outlived its aggregator"
            time.sleep(0.2)
    finally:
        if aggregator.poll() is None:
            aggregator.kill()


def test_a_round_over_tls_with_consortium_certificates(toy, tmp_path):
    nodes, contract = toy
    banks = sorted(nodes)
    server_tls = certify(nodes, tmp_path / "pki-tls")
    with FederatedServer(1, tls=server_tls) as server:  # the server runs TLS-only
        deadline = time.monotonic() + 10
        while "listening" not in server.log_tail() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Federated server listening" in server.log_tail() and "Insecure" not in server.log_tail()
    strategy = make_strategy(nodes)
    strategy.server_tls = server_tls
    doc, participants, _ = train_round(nodes, strategy, banks, 1, None, contract, SETTINGS)
    assert participants == set(banks)
    job = json.loads((nodes["alpha"].work_dir / "histogram" / "job.json").read_text())
    # the sidecar holds the TLS channel; the worker only talks to the sidecar on loopback
    assert job["session"]["tls"] is True and job["tls"] is None
    assert job["sidecar"]["tls"]["client_cert"] == nodes["alpha"].histogram_tls.client_cert
    binned = strategy.bins.apply(nodes["alpha"].data.X_holdout)
    pooled = pooled_chain(nodes, banks, strategy, 1, contract)
    assert np.array_equal(model_json.to_booster(doc).predict(dmatrix(binned, None, FEATURES)),
                          pooled.predict(dmatrix(binned, None, FEATURES)))
    assert our_children() == []


# ---------------------------------------------------------------------------- end to end

E2E = FederationSettings(trees_per_round=5, colsample_bytree=1.0)


class BinnedRows:
    """A bank's view with its rows binned by the shared edges, for the centralized reference fit."""

    def __init__(self, node, bins: GlobalBins):
        self.node, self.bank = node, node.bank
        d = node.data
        self.data = BankDataset(d.feature_names, bins.apply(d.X_train), d.y_train, bins.apply(d.X_holdout),
                                d.y_holdout, d.holdout_start)

    def summary(self):
        return self.node.summary()

    def evaluate(self, model_bytes):
        from bank_node.evaluation import evaluation_report

        doc = json.loads(model_bytes)
        scores = model_json.to_booster(doc).predict(dmatrix(self.data.X_holdout, None, self.data.feature_names))
        return evaluation_report(self.bank, model_json.model_id(doc), scores, self.data.y_holdout).to_bytes()


@pytest.mark.slow
def test_histogram_federation_equals_the_centralized_strategy_on_binned_rows(consortium, uri):
    from aggregator.drivers.baselines import run_centralized
    from aggregator.tracking import FederationTracker

    nodes, contract = consortium.nodes, consortium.contract
    tracker = FederationTracker(uri, "e2e-histogram")
    federated = run_federation(nodes, "histogram", 2, tracker, contract, E2E, seed=3)
    versions = MlflowClient(uri, registry_uri=uri).search_model_versions("name='e2e-histogram'")
    assert sorted(int(v.version) for v in versions) == [1, 2] and federated.model_uri == "models:/e2e-histogram/2"
    tags = {int(v.version): v.tags for v in versions}[2]
    assert tags["fedfraud.strategy"] == "histogram"
    assert tags["fedfraud.participating_banks"] == ",".join(sorted(nodes))
    _, registered = tracker.champion()
    banks = sorted(nodes)
    for b in banks:  # masking was on (the default): each bank's sidecar masked its sums
        audit = (nodes[b].work_dir / "histogram" / "collectives.jsonl").read_text().splitlines()
        assert sum(json.loads(line)["masked"] for line in audit) > 10, b

    # the same bins the federation derived, from the same counts
    bins = make_strategy(nodes, E2E).shared_bins(nodes, banks)
    views = {b: BinnedRows(nodes[b], bins) for b in banks}
    centralized_settings = dataclasses.replace(E2E, subsample=1.0)
    central = run_centralized(views, 2, FederationTracker(uri, "e2e-histogram-central"), contract,
                              centralized_settings, seed=3)
    _, central_booster = FederationTracker(uri, "e2e-histogram-central").champion()
    names = contract["names"]
    for b in banks:
        raw = registered.predict(dmatrix(nodes[b].data.X_holdout, None, names))
        assert np.array_equal(raw, central_booster.predict(dmatrix(views[b].data.X_holdout, None, names))), b
        assert np.array_equal(registered.predict(dmatrix(views[b].data.X_train, None, names)),
                              central_booster.predict(dmatrix(views[b].data.X_train, None, names))), b
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 - NaN-safe
    assert same(federated.evaluation.pooled, central.evaluation.pooled)
    assert same(federated.evaluation.per_bank, central.evaluation.per_bank)
    assert our_children() == []


@pytest.mark.slow
def test_a_dead_bank_registers_nothing_and_the_retry_runs_with_the_healthy_banks(consortium, uri):
    from aggregator.tracking import FederationTracker

    nodes, contract = dict(consortium.nodes), consortium.contract
    lost = sorted(nodes)[1]
    settings = dataclasses.replace(E2E, trees_per_round=300, min_banks=3)
    client = MlflowClient(uri, registry_uri=uri)
    with pytest.raises(RoundFailed, match=f"{lost} failed"):
        run_federation({**nodes, lost: Dies(nodes[lost])}, "histogram", 1, FederationTracker(uri, "e2e-hist-retry"),
                       contract, settings, seed=4)
    assert client.search_model_versions("name='e2e-hist-retry'") == []
    assert our_children() == []
    healthy = {b: n for b, n in nodes.items() if b != lost}
    retry = run_federation(healthy, "histogram", 1, FederationTracker(uri, "e2e-hist-retry"), contract,
                           dataclasses.replace(settings, trees_per_round=5), seed=4)
    [version] = client.search_model_versions("name='e2e-hist-retry'")
    assert version.tags["fedfraud.participating_banks"] == ",".join(sorted(healthy))
    assert retry.model_uri == "models:/e2e-hist-retry/1" and set(retry.evaluation.per_bank) == set(healthy)


# ---------------------------------------------------------------------------- what the server sees

def recording_server(records: list):
    """``tests/bank_node/federated_recorder.py``'s ``recording_server``, that file loaded by path."""
    import importlib.util
    import sys

    recorder_module = sys.modules.get("federated_recorder")
    if recorder_module is None:
        path = Path(__file__).resolve().parents[1] / "bank_node" / "federated_recorder.py"
        spec = importlib.util.spec_from_file_location("federated_recorder", path)
        recorder_module = sys.modules["federated_recorder"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recorder_module)
    return recorder_module.recording_server(records)


@pytest.mark.slow
def test_the_server_sees_only_masked_sums_and_the_model_stays_the_pooled_fit(toy, monkeypatch):
    """The same round unmasked (the plaintext each bank sends) and masked (the default), both recorded at the
    server: every masked SUM is uniformly random words unrelated to the bank's plaintext, nothing else differs,
    no sketch is exchanged, and both models equal the pooled fit on the binned rows."""
    from aggregator.strategies import histogram as histogram_module
    from bank_node.secagg_sidecar import OFFER_SLOT_BYTES
    from fedfraud.secagg import federated_wire as fw
    from fedfraud.secagg.masking import decode, encode

    nodes, contract = toy
    nodes = {b: nodes[b] for b in ("alpha", "beta", "gamma")}
    banks = sorted(nodes)
    records: list = []
    monkeypatch.setattr(histogram_module, "FederatedServer", recording_server(records))
    monkeypatch.setenv("FEDFRAUD_SECAGG_ALLOW_UNMASKED", "1")
    plain = make_strategy(nodes)
    plain.secagg = False
    plain_doc, _, _ = train_round(nodes, plain, banks, 1, None, contract, SETTINGS)
    masked = make_strategy(nodes)
    assert masked.secagg, "masking is the default"
    masked_doc, participants, _ = train_round(nodes, masked, banks, 1, None, contract, SETTINGS)
    assert participants == set(banks)

    assert model_json.model_id(plain_doc) == model_json.model_id(masked_doc)
    pooled = pooled_chain(nodes, banks, masked, 1, contract)
    binned = masked.bins.apply(np.concatenate([nodes[b].data.X_holdout for b in banks]))
    assert np.array_equal(model_json.to_booster(masked_doc).predict(dmatrix(binned, None, FEATURES)),
                          pooled.predict(dmatrix(binned, None, FEATURES)))

    masked_words, plain_words, in_clear = [], [], set()
    for rank in range(len(banks)):
        sent_plain, sent_masked = records[0].by_rank(rank), records[1].by_rank(rank)
        offers = sent_masked.pop(0)  # call 0: the key offers (public keys and certificates), nothing else
        assert (offers.method, offers.request.sequence_number) == ("Allgather", 0)
        assert len(offers.request.send_buffer) == OFFER_SLOT_BYTES and b'"public_key"' in offers.request.send_buffer
        assert len(sent_plain) == len(sent_masked) > 10
        for plain_call, masked_call in zip(sent_plain, sent_masked):
            p, m = plain_call.request, masked_call.request
            assert (m.method, m.sequence_number) == (p.method, p.sequence_number + 1)
            if p.method == "Allreduce" and p.reduce_operation == fw.SUM:
                assert (m.data_type, m.reduce_operation) == (fw.UINT64, fw.SUM)
                words = np.frombuffer(m.send_buffer, "<u8")
                plaintext = p.values()
                own = (encode(plaintext.astype(np.float64)) if p.data_type in (0, 1, 2)
                       else plaintext.astype(np.int64).view(np.uint64))
                assert words.size == own.size
                if words.size >= 64:
                    assert abs(np.unpackbits(words.view(np.uint8)).mean() - 0.5) < 0.05, p.describe()
                masked_words.append(words)
                plain_words.append(own)
                # the server's sum of masked words is the plain round's sum (to fixed-point precision)
                total = np.frombuffer(masked_call.reply, "<u8")
                plain_total = np.frombuffer(plain_call.reply, dtype=plaintext.dtype)
                if p.data_type in (0, 1, 2):
                    assert np.allclose(decode(total), plain_total, rtol=1e-6, atol=len(banks) * 2.0**-32)
                else:
                    assert np.array_equal(total.view(np.int64), plain_total)
            else:  # passes in the clear, byte for byte what the plain round sent
                assert m.send_buffer == p.send_buffer and m.method != "AllgatherV", p.describe()
                in_clear.add((p.method, fw.OPS[p.reduce_operation] if p.method == "Allreduce" else "root"))
    # in the clear: the feature count (MAX) and rank 0's broadcast seed; no sketch (Allgather/AllgatherV)
    assert in_clear <= {("Allreduce", "MAX"), ("Broadcast", "root")}, in_clear
    masked_all, plain_all = np.concatenate(masked_words), np.concatenate(plain_words)
    assert masked_all.size > 5000
    assert_masked(masked_all, plain_all)
    assert our_children() == []


def test_a_strategy_built_per_round_bins_with_the_edges_an_earlier_round_of_its_federation_carried(tmp_path):
    """Airflow builds a strategy per round: round 2 must reuse round 1's shared bins (not count the grid
    again, nor bin differently), and only within the same federation."""
    from aggregator.protocol.plan import Plan
    from aggregator.protocol.state import store_carried, strategy_carried
    from aggregator.protocol.workspace import Workspace

    def plan(federation_id: str, strategy: str = "histogram") -> Plan:
        return Plan(model_name="m", strategy=strategy, rounds=3, seed=5, settings=SETTINGS, contract_hash="c" * 64,
                    feature_names=FEATURES, banks=["alpha", "beta", "gamma"], excluded={},
                    consortium_params=consortium_params(SETTINGS, 10, 990), federation_id=federation_id)

    ws = Workspace(tmp_path, "m")
    first = strategy_carried(ws, plan("f1"))
    assert first.bins is None
    first.bins = GlobalBins(tuple(np.array([0.5 * i, 1.0 + i], np.float32) for i in range(len(FEATURES))), 32)
    first.grid_banks = ["alpha", "beta", "gamma"]
    store_carried(ws, plan("f1"), first)
    later = strategy_carried(ws, plan("f1"))
    assert later.bins.digest == first.bins.digest and later.grid_banks == first.grid_banks
    assert strategy_carried(ws, plan("f2")).bins is None, "another federation's bins are not this one's"
    bagging = strategy_carried(ws, plan("f1", "bagging"))
    assert bagging.carried() == {} and not hasattr(bagging, "bins")
