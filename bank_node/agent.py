"""The bank's agent: ``fedfraud node run --config FILE``. It runs next to the bank's data and
only ever connects out, to the aggregator, with the bank's own certificate.

Each task it fetches is one call on the bank's ``BankNode``: ``summary`` (validate + build
features first if the data changed), ``train``, ``keys`` (a signed key offer), ``evaluate`` /
``evaluate_champion`` (masked), ``bin_counts`` or ``histogram`` (join the round's federated server
as a client). Only the result leaves: an update, a summary of counts, a key offer, masked
histograms (and metrics if ``share_metrics``).

A ledger in the agent's work folder keeps every result before it is uploaded, so a task is
computed once and uploaded once: after a crash or a lost answer, the kept bytes are re-sent and
the aggregator's ``duplicate`` verdict ends it. A refusal (4xx) is logged, never retried.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfraud.protocol import TaskKind
from fedfraud.config_file import ConfigError, TLSFiles, read_yaml
from fedfraud.transport import AggregatorClient, Retry, ServiceRefused
from fedfraud.wire import TrainTask, WireFormatError
from pipelines.io import write_bytes

__all__ = ["AgentConfig", "ConfigError", "heartbeat_age", "run_agent"]
log = logging.getLogger("fedfraud.agent")


@dataclass(frozen=True)
class AgentConfig:
    bank: str
    aggregator_url: str
    data: Path  # the bank's raw transactions
    work_dir: Path  # features, worker files and the agent's ledger: never leaves the bank
    tls: TLSFiles
    poll_seconds: float = 2.0  # heartbeat interval (the container's healthcheck file)
    remote_beat_seconds: float = 15.0  # tell the aggregator it is alive, also while it works on a task
    long_poll_seconds: float = 20.0
    retry: Retry = Retry()
    pipeline_config: Path | None = None  # the bank's pipeline config (default: the consortium's)
    policy: Any = None  # bank_node.policy.TrainingPolicy: the tasks this bank accepts (YAML ``policy:``)
    share_metrics: bool = False  # send per-bank evaluation metrics (histograms only ever leave masked)
    share_local_model: bool = True  # cross-evaluation: let the others score a model from this bank's rows
    privacy: Any = None  # bank_node.privacy.PrivacyPolicy: DP on leaf values and its ε budget (YAML ``privacy:``)

    @classmethod
    def load(cls, path: str | Path) -> "AgentConfig":
        required = {"bank", "aggregator_url", "data", "work_dir", "tls"}
        raw = read_yaml(Path(path), set(cls.__dataclass_fields__), required)
        raw["tls"] = TLSFiles.parse(raw["tls"], str(path))
        try:
            raw["retry"] = Retry(**raw.get("retry", {}))
        except TypeError as exc:
            raise ConfigError(f"{path}: retry takes attempts, backoff_seconds, max_backoff_seconds ({exc})") from exc
        from bank_node.policy import TrainingPolicy
        from bank_node.privacy import PrivacyPolicy

        try:
            raw["policy"] = TrainingPolicy.from_dict(raw.get("policy"))
            raw["privacy"] = PrivacyPolicy.from_dict(raw.get("privacy"))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        for key in ("data", "work_dir", "pipeline_config"):
            if raw.get(key) is not None:
                raw[key] = Path(raw[key])
        for key in ("share_metrics", "share_local_model"):
            if key in raw and not isinstance(raw[key], bool):
                raise ConfigError(f"{path}: {key} must be true or false, not {raw[key]!r}")
        if not raw["aggregator_url"].startswith("https://"):
            raise ConfigError(f"{path}: aggregator_url must be https:// (mutual TLS), got {raw['aggregator_url']}")
        return cls(**raw)

    @property
    def state_dir(self) -> Path:
        return self.work_dir / "agent"


class Ledger:
    """Per task: the result kept before upload, then a note of how the upload ended."""

    def __init__(self, folder: Path):
        self.folder = folder

    def result(self, task_id: str) -> bytes | None:
        path = self.folder / f"{task_id}.result"
        return path.read_bytes() if path.exists() else None

    def keep(self, task_id: str, body: bytes) -> None:
        write_bytes(body, self.folder / f"{task_id}.result")

    def close(self, task_id: str, outcome: str) -> None:
        write_bytes(json.dumps({"outcome": outcome, "at": time.time()}).encode(), self.folder / f"{task_id}.done")

    def closed(self, task_id: str) -> bool:
        return (self.folder / f"{task_id}.done").exists()

    def outcome(self, task_id: str) -> str:
        return json.loads((self.folder / f"{task_id}.done").read_bytes())["outcome"]


class Agent:
    def __init__(self, config: AgentConfig, client: AggregatorClient | None = None):
        from bank_node.histogram_worker import ClientTLS
        from bank_node.masked_evaluation import SecAggCredentials
        from bank_node.node import BankNode
        from fedfraud.settings import FederationSettings
        from pipelines.config import load_config

        settings = FederationSettings()  # holdout and alert budget are the consortium's defaults
        self.config = config
        self.node = BankNode(config.bank, config.data, config.work_dir / "node", load_config(config.pipeline_config),
                             settings.holdout_fraction, settings.alert_budget,
                             histogram_tls=ClientTLS(str(config.tls.ca), str(config.tls.key), str(config.tls.cert)),
                             policy=config.policy, share_metrics=config.share_metrics,
                             share_local_model=config.share_local_model, privacy=config.privacy,
                             secagg=lambda: SecAggCredentials.from_files(config.tls.ca, config.tls.cert,
                                                                         config.tls.key))  # read on first use
        self.client = client or AggregatorClient(config.aggregator_url, config.tls, config.retry)
        # its own connection, one attempt per beat: a beat never waits behind an upload or a retry
        self.beat_client = client or AggregatorClient(config.aggregator_url, config.tls, Retry(attempts=1),
                                                      timeout_s=10.0)
        self.ledger = Ledger(config.state_dir / "tasks")

    def beat(self) -> None:
        write_bytes(json.dumps({"bank": self.config.bank, "at": time.time()}).encode(),
                    self.config.state_dir / "heartbeat.json")

    def run(self, once: bool = False, stop: threading.Event | None = None) -> None:
        """Fetch and do tasks until stopped (``once``: until none is waiting)."""
        stop = stop or threading.Event()
        done = threading.Event()
        beating = threading.Thread(target=self._beat_until, args=(done,), daemon=True, name="heartbeat")
        beating.start()  # the heartbeat goes on during long work (a first feature build, training)
        log.info("%s: agent for %s started", self.config.bank, self.config.aggregator_url)
        try:
            while not stop.is_set():
                task = self.client.next_task(wait_s=0.0 if once else self.config.long_poll_seconds)
                if task is None:
                    if once:
                        return
                    continue
                self.handle(task)
        finally:
            done.set()

    def _beat_until(self, done: threading.Event) -> None:
        last_remote = 0.0
        while True:
            self.beat()
            if time.monotonic() - last_remote >= self.config.remote_beat_seconds:
                last_remote = time.monotonic()
                try:  # the aggregator gives up early on the tasks of a bank it has not heard from
                    self.beat_client.heartbeat()
                except Exception as exc:  # unreachable now: the next beat tries again
                    log.debug("%s: heartbeat not delivered: %s", self.config.bank, exc)
            if done.wait(self.config.poll_seconds):
                return

    def handle(self, task: dict) -> None:
        tid, kind = task["id"], task["kind"]
        if self.ledger.closed(tid):  # offered again after its answer was refused: end it, by name
            reason = f"this bank's answer was refused: {self.ledger.outcome(tid)}"
            self._send(tid, lambda: self.client.upload_failure(tid, reason))
            return
        body = self.ledger.result(tid)
        if body is None:
            try:
                data = self.client.task_input(tid) if task["has_input"] else b""
            except ServiceRefused as exc:
                log.warning("%s: input of task %s refused: %s", self.config.bank, tid, exc)
                self.ledger.close(tid, f"{exc.check}: {exc.detail}")
                return
            try:
                body = self.compute(kind, data)
            except Exception as exc:  # the bank cannot do it: say why, so the round need not wait
                log.warning("%s: %s for round %s failed: %s", self.config.bank, kind, task["round"], exc)
                reason = f"{exc.__class__.__name__}: {exc}"
                self._send(tid, lambda: self.client.upload_failure(tid, reason))
                return
            self.ledger.keep(tid, body)
        self._send(tid, lambda: self.client.upload_result(tid, body))

    def _send(self, tid: str, upload) -> None:
        try:
            upload()
            self.ledger.close(tid, "accepted")
        except ServiceRefused as exc:  # judged: never re-sent (a duplicate means it already arrived)
            log.warning("%s: task %s refused: %s", self.config.bank, tid, exc)
            self.ledger.close(tid, f"{exc.check}: {exc.detail}")

    def compute(self, kind: str, data: bytes) -> bytes:
        """One task on the bank's node; the returned bytes are all that leaves the bank."""
        node = self.node
        if kind not in TaskKind.ALL:
            raise ValueError(f"unknown task kind {kind!r}")
        if len(data) > TrainTask.MAX_BYTES:
            raise WireFormatError(f"{kind} input of {len(data)} bytes exceeds the {TrainTask.MAX_BYTES}-byte limit")
        if kind == TaskKind.SUMMARY:
            if not node.is_prepared():
                from pipelines.spark import get_spark

                node.prepare(get_spark(f"fedfraud-{self.config.bank}"))
            return json.dumps(node.summary()).encode()
        if kind == TaskKind.TRAIN:
            return node.train(data)
        if kind == TaskKind.KEYS:  # secure aggregation: a signed ephemeral key offer
            return node.offer(data)
        if kind == TaskKind.COUNTS:  # planning: label counts as masked words
            return node.masked_counts(data)
        if kind == TaskKind.REFIT:  # compaction's leaf refit: per-leaf loss sums as masked words
            return node.refit_sums(data)
        if kind in TaskKind.EVALUATIONS:  # histograms masked, metrics only if shared
            return node.evaluate_masked(data)
        if kind in TaskKind.SCORES:  # cross-evaluation and acceptance: reports only
            return node.score(data)
        if kind == TaskKind.LOCAL_MODEL:
            return node.local_model(data)
        if kind == TaskKind.BIN_COUNTS:
            return node.bin_counts(data)
        envelope = json.loads(data)
        return node.train_histogram(json.dumps(envelope["task"]).encode(), json.dumps(envelope["session"]).encode())


def run_agent(config: AgentConfig, once: bool = False, stop: threading.Event | None = None) -> None:
    Agent(config).run(once=once, stop=stop)


def heartbeat_age(config: AgentConfig) -> float | None:
    """Seconds since the agent last asked for work (None: never)."""
    path = config.state_dir / "heartbeat.json"
    return time.time() - path.stat().st_mtime if path.exists() else None
