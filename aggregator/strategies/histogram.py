"""Histogram federation: banks grow every tree together and get the pooled model, bit for bit.

A round is one **collective** stage. The banks ready when it starts form the world (quorum is
checked then). Each bank runs a worker process (``bank_node.histogram_worker``) that joins
XGBoost's federated communicator in row-split mode. The aggregator runs the federated server
(``aggregator.federated_server``) in its own process for that round only. For every tree
node, each bank sends its gradient/hessian histograms over the *shared* bins
(``fedfraud.binning``). The server sums them, and every bank picks the same split from the
sums. So every bank ends the round holding the same K new trees. They are exactly the trees
a pooled fit on the same binned rows grows.

Two choices make "exactly" hold:

* **Shared bins.** Before the first round the banks send counts over a fixed grid, masked
  (``histogram_bins``: the aggregator learns the pooled counts only), and the aggregator derives
  at most ``max_bin`` edges per feature. Banks bin with them, and cut points come from the public
  edges, not from a sketch of each bank's rows. A bank left out of the grid counts is left out
  of the round.
* **No row subsampling** (``subsample`` = 1). XGBoost draws its row sample in each process
  over that process's own row indices, so no federated sample equals a pooled one. Column
  sampling is seeded the same at every rank (one seed per round for all banks), so it matches.

**Secure aggregation** (on by default; ``FEDFRAUD_HISTOGRAM_SECAGG=0`` turns it off, and banks
refuse that unless they allow it): each bank's worker joins through its masking sidecar
(``bank_node.secagg_sidecar``), so every SUM reaches the server as pairwise-masked words and
the server learns only sums. Each attempt is its own key session (``secagg_session``: a fresh
name for every attempt; banks make fresh X25519 keys for it), and needs at least three banks.

The round's model is the update every bank returns. All must be identical, or the round
fails. Then evaluation, registration and promotion run as for every other strategy. A bank
that fails mid-round fails the round: every worker is killed, the server is stopped,
nothing is registered, and ``RoundFailed`` names the bank. A retry starts a new world from the
banks still healthy.

**Kept worlds** (``keep_world``, set by a driver that keeps this object for the whole federation: the
embedded driver, the bench). The server is started once per *world* (the same banks, the same masking)
and kept across rounds, and each bank keeps its worker and sidecar for it (the session's ``world_id`` and
``world_round``). Every round still agrees fresh keys (its own session). A failure stops the server and
ends the world, and a change of banks starts a new one. A bank that lost its kept worker between rounds
refuses at once (``histogram_worker_lost``): the world is ended and the round runs once more in a new
one. ``close()`` stops the server; the driver calls it when the federation ends. Drivers that build a
strategy per round (Airflow tasks, the service) keep today's one-round worlds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

from fedfraud.binning import GlobalBins, Grid
from fedfraud.grid_counts import GridLayout
from aggregator.checks import Rejection
from aggregator.federated_server import LOOPBACK, FederatedServer, ServerFailed, ServerTLS
from aggregator.protocol.errors import RoundFailed
from aggregator.strategies.base import Strategy
from aggregator.strategies.histogram_bins import clear_shared_bins, masked_shared_bins
from fedfraud import model_json
from fedfraud.histogram_session import HistogramSession, loopback
from fedfraud.model_json import Doc
from fedfraud.secagg.masking import MIN_PARTIES
from fedfraud.protocol import StrategyName
from fedfraud.wire import ModelUpdate, TrainTask

log = logging.getLogger("fedfraud.histogram")


@dataclass
class World:
    """A federated server kept for the rounds of one set of banks."""

    server: FederatedServer
    banks: list[str]
    secagg: bool
    world_id: str
    rounds: int = 0  # rounds trained in this world (each bank's kept worker must have trained as many)


class Histogram(Strategy):
    name = StrategyName.HISTOGRAM
    collective = True  # the round's training phase hands the whole stage to train_collective
    grid: ClassVar[Grid] = Grid()  # the consortium's fixed counting grid (a constant); min_count: pooled
    grid_layout: ClassVar[GridLayout] = GridLayout()  # the grid counts' public dense layout (masked)
    abort_grace_s: ClassVar[float] = 30.0
    server_startup_s: ClassVar[float] = 180.0  # importing XGBoost on a saturated machine took over 60 s
    nthread: ClassVar[int] = 1  # per bank process; embedded runs share the machine's cores

    def __init__(self, settings, seed: int, consortium_params: dict[str, Any], **planned: Any):
        super().__init__(settings, seed, {**consortium_params, "subsample": 1.0}, **planned)
        self.bins: GlobalBins | None = None
        self.world: list[str] = []
        self.grid_banks: list[str] = []  # the banks whose grid counts the shared bins pool
        self.grid_faults: list[dict[str, str]] = []  # banks left out of the grid counts, named
        self.round_timeout_s = float(os.environ.get("FEDFRAUD_HISTOGRAM_TIMEOUT", "1800"))
        # Where banks reach the server. Embedded: loopback. Networked: the aggregator's name, TLS required.
        self.server_host = os.environ.get("FEDFRAUD_FEDERATED_HOST", LOOPBACK)
        self.server_tls = ServerTLS.from_env()
        self.secagg = os.environ.get("FEDFRAUD_HISTOGRAM_SECAGG", "1") != "0"
        self.attempts = 0  # collective attempts of this federation (each is its own key session)
        self.keep_world = False  # keep the server (and the banks their workers) across rounds; close() ends it
        self.world_state: World | None = None
        self.last_timings: dict[str, Any] = {}  # the last collective stage: where its time went
        self.asked: dict[str, int] = {}  # the last collective stage: bytes of task and session handed each bank
        if self.server_tls is None and not loopback(f"{self.server_host}:0"):
            raise ServerFailed(f"the federated server on {self.server_host} needs TLS: set "
                               "FEDFRAUD_FEDERATED_SERVER_KEY, _SERVER_CERT, _CLIENT_CA (plain gRPC: 127.0.0.1 only)")

    def configure(self, round_id: int, bank: str, bank_index: int, global_model: Doc | None,
                  contract_hash: str) -> TrainTask:
        """Every rank gets the same seed: XGBoost draws column samples at each rank, and they must agree."""
        return super().configure(round_id, bank, 0, global_model, contract_hash)

    # ------------------------------------------------------------------ the collective stage

    def train_collective(self, nodes: dict[str, Any], tasks: dict[str, TrainTask], round_id: int,
                         on_progress: Callable[[str], None] = lambda message: None
                         ) -> tuple[dict[str, bytes], list[Rejection]]:
        """Run the stage with the banks ready now; returns (update bytes per bank, banks left out)."""
        left_out, world, self.asked = [], [], {}
        for bank in sorted(tasks):
            reason = self._not_ready(nodes[bank])
            if reason:
                log.warning("round %s: %s left out: %s", round_id, bank, reason)
                left_out.append(Rejection(bank, "bank_not_ready", reason))
            else:
                world.append(bank)
        quorum = max(1, self.settings.min_banks)
        if len(world) < quorum:
            raise RoundFailed(f"round {round_id}: {len(world)} bank(s) ready for the collective round, quorum is "
                                f"{quorum}; not ready: {[r.as_dict() for r in left_out]}")
        if self.secagg and len(world) < MIN_PARTIES:
            raise RoundFailed(f"round {round_id}: too_few_parties: {len(world)} bank(s) ready, masked sums need "
                              f"{MIN_PARTIES} (with two, each learns the other's histograms); not ready: "
                              f"{[r.as_dict() for r in left_out]}")
        if self.bins is None:
            on_progress(f"round {round_id}: shared bins from {len(world)} banks' grid counts")
            self.bins = self.shared_bins(nodes, world, round_id)
            dropped = {f["bank"]: f for f in self.grid_faults
                       if f["bank"] in world and f["bank"] not in self.grid_banks}
            left_out += [Rejection(bank, fault["check"], fault["detail"]) for bank, fault in sorted(dropped.items())]
            world = [bank for bank in world if bank not in dropped]
            if len(world) < quorum:
                raise RoundFailed(f"round {round_id}: {len(world)} bank(s) left after the grid counts, quorum is "
                                  f"{quorum}; left out: {[r.as_dict() for r in left_out]}")
        self.world = world
        on_progress(f"round {round_id}: {len(world)} banks grow {tasks[world[0]].num_trees} trees together")
        return self._run(nodes, {b: tasks[b] for b in world}, round_id), left_out

    def carried(self) -> dict[str, Any]:
        """The shared bins and the banks they pool: later rounds bin with the same edges, counted once."""
        return {"bins": self.bins.to_dict(), "grid_banks": list(self.grid_banks)} if self.bins is not None else {}

    def carry(self, state: dict[str, Any]) -> None:
        if state.get("bins") is not None:
            self.bins = GlobalBins.from_dict(state["bins"])
            self.grid_banks = [str(bank) for bank in state.get("grid_banks", [])]

    @staticmethod
    def _not_ready(node) -> str | None:
        try:
            summary = node.summary()
        except Exception as exc:  # unreachable: not part of this round's world
            return f"{exc.__class__.__name__}: {exc}"
        if not summary.get("training_allowed", False):
            return "declined to train: " + "; ".join(summary.get("decline_reasons", []))
        return None

    def shared_bins(self, nodes: dict[str, Any], banks: list[str], round_id: int = 0) -> GlobalBins:
        """Grid counts from every bank -> the consortium's edges. Masked (the default): the aggregator learns the
        pooled counts only (``histogram_bins``); ``grid_banks`` are the banks pooled, ``grid_faults`` those left
        out. Unmasked (``FEDFRAUD_HISTOGRAM_SECAGG=0``, banks must allow it): sparse counts in the clear."""
        if self.secagg:
            features = self.header.num_feature if self.header is not None else None
            bins, self.grid_banks, self.grid_faults = masked_shared_bins(
                nodes, banks, self.grid_layout, self.grid.min_count, self.settings.max_bin, self._federation_tag(),
                round_id, features)
        else:
            bins = clear_shared_bins(nodes, banks, self.grid, self.settings.max_bin)
            self.grid_banks, self.grid_faults = sorted(banks), []
        log.info("shared bins %s: %s bins per feature", bins.digest, [len(e) + 1 for e in bins.edges])
        return bins

    def _run(self, nodes: dict[str, Any], tasks: dict[str, TrainTask], round_id: int) -> dict[str, bytes]:
        world = sorted(tasks)
        assert self.bins is not None
        started = time.monotonic()
        live = self._world_for(world)
        fresh = live.rounds == 0
        pool = ThreadPoolExecutor(max_workers=len(world), thread_name_prefix="histogram-bank")
        ended = True
        try:
            key_session = self.key_session(round_id)
            sessions = {bank: HistogramSession(
                bank=bank, round_id=round_id, server_address=live.server.address, world_size=len(world), rank=rank,
                bins=self.bins.to_dict(), tls=self.server_tls is not None, timeout_s=self.round_timeout_s,
                nthread=self.nthread, secagg=self.secagg, banks=world if self.secagg else [],
                secagg_session=key_session if self.secagg else "", world_id=live.world_id if self.keep_world else "",
                world_round=live.rounds if self.keep_world else 0).to_bytes() for rank, bank in enumerate(world)}
            questions = {bank: tasks[bank].to_bytes() for bank in world}
            for bank in world:  # what each bank is handed, every attempt (``training.train`` counts it in process)
                self.asked[bank] = self.asked.get(bank, 0) + len(questions[bank]) + len(sessions[bank])
            futures: dict[Future, str] = {
                pool.submit(nodes[bank].train_histogram, questions[bank], sessions[bank]): bank for bank in world}
            try:
                if fresh:  # a kept server listens already (``_watch`` notices if it exits)
                    live.server.wait_ready()
                ready = time.monotonic()
                failure = self._watch(futures, live.server, started)
            except ServerFailed as exc:
                failure, ready = str(exc), time.monotonic()
            if failure:
                self._abort(nodes, world, futures, live.server)
                if not fresh and "histogram_worker_lost" in failure:  # a bank restarted between rounds
                    log.warning("round %s: %s; the round runs again in a new world", round_id, failure)
                    self.close()
                    ended = False  # the new world is the retry's to keep or end
                    return self._run(nodes, tasks, round_id)
                raise RoundFailed(f"round {round_id}: collective training failed ({failure}); "
                                  f"world was {world}; nothing registered")
            live.rounds += 1
            ended = not self.keep_world
            self.last_timings = {"world": "new" if fresh else "kept", "ready_s": ready - started,
                                 "stage_s": time.monotonic() - started}
            return {bank: future.result() for future, bank in futures.items()}
        finally:
            if ended:  # a one-round world, or any failure: the server never outlives it
                self.close()
            pool.shutdown(wait=False, cancel_futures=True)

    def _world_for(self, world: list[str]) -> World:
        """The kept world when it is this one and its server is alive; else a new world (its server launching)."""
        live = self.world_state
        if live is not None and self.keep_world and live.banks == world and live.secagg == self.secagg \
                and live.server.alive():
            return live
        self.close()
        server = FederatedServer(len(world), tls=self.server_tls, timeout_s=self.round_timeout_s + 60,
                                 startup_timeout_s=self.server_startup_s, host=self.server_host)
        server.launch()  # banks start binning and launching workers while the server comes up
        self.world_state = World(server, list(world), self.secagg, f"w{secrets.token_hex(8)}")
        return self.world_state

    def close(self) -> None:
        """Stop the kept server (the banks' kept workers exit when it stops listening); idempotent."""
        live, self.world_state = self.world_state, None
        if live is not None:
            live.server.stop()

    def key_session(self, round_id: int) -> str:
        """A fresh session name per attempt: the federation (its seed, params, bins), round, attempt, nonce."""
        self.attempts += 1
        federation = self._federation_tag(self.bins.digest)
        return f"histogram:{federation}:r{round_id}:a{self.attempts}:{secrets.token_hex(8)}"

    def _federation_tag(self, *more: str) -> str:
        return hashlib.sha256(json.dumps([self.seed, self.consortium_params, *more],
                                         sort_keys=True, default=str).encode()).hexdigest()[:12]

    def _watch(self, futures: dict[Future, str], server: FederatedServer, started: float) -> str | None:
        """None when every bank returned; else why the round must stop (first failure wins)."""
        while True:
            done, pending = wait(futures, timeout=1.0, return_when=FIRST_EXCEPTION)
            failed = {futures[f]: f.exception() for f in done if f.exception() is not None}
            if failed:
                return "; ".join(f"{bank} failed: {exc.__class__.__name__}: {exc}"
                                 for bank, exc in sorted(failed.items()))
            if not pending:
                return None
            if not server.alive():
                return f"federated server exited: {server.log_tail()}"
            if time.monotonic() - started > self.round_timeout_s:
                return f"no result within {self.round_timeout_s:.0f}s from {sorted(futures[f] for f in pending)}"

    def _abort(self, nodes, world, futures: dict[Future, str], server: FederatedServer) -> None:
        """Kill every bank's worker and the server, then wait (bounded) for the calls to return."""
        for bank in world:
            try:
                nodes[bank].abort_histogram()
            except Exception as exc:  # best effort: the bank's own watchdog ends its worker too
                log.warning("could not abort %s's worker: %s", bank, exc)
        server.stop()
        _, pending = wait(futures, timeout=self.abort_grace_s)
        if pending:
            log.warning("banks still running after abort: %s", sorted(futures[f] for f in pending))

    # ------------------------------------------------------------------ the round's model

    def aggregate(self, global_model: Doc | None, updates: list[ModelUpdate], round_banks: Sequence[str] = ()) -> Doc:
        """Every bank of the world holds the same trees: check that, then append them once."""
        banks = sorted(u.bank for u in updates)
        if banks != self.world:
            raise RoundFailed(f"collective round: accepted updates from {banks}, but the world was {self.world}")
        models = {model_json.model_id(u.model) for u in updates}
        if len(models) != 1:
            raise RoundFailed(f"collective round: banks returned {len(models)} different models")
        return model_json.append_trees(self.start_from(global_model, updates), updates[0].model)
