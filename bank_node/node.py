"""The bank's node in embedded mode: its data stays here; only bytes of JSON go in and out.

The aggregator talks to a node through calls — ``summary``, ``train``, ``offer`` and
``evaluate_masked`` (secure aggregation), ``score``, … — whose inputs and outputs are exactly the
messages of ``fedfraud.wire``, so the networked agent can carry the same calls over HTTP.

Nothing received is trusted: a task must fit the bank's ``TrainingPolicy`` and its base model,
like every model sent for evaluation, is validated and rebuilt (``fedfraud.model_guard``)
against the bank's own feature contract before XGBoost sees it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

from bank_node.dataset import BankDataset, load_dataset, spark_training_rows
from bank_node.evaluation import DEFAULT_ALERT_BUDGET, evaluation_report, finite, holdout_metrics
from bank_node.model_cache import expand, model_cache
from bank_node.policy import TaskRefused, TrainingPolicy
from bank_node.privacy import PrivacyPolicy, train_private
from bank_node.training import EXTERNAL_MEMORY_ROWS, build_update, predict_rows, train_trees, train_trees_spark
from fedfraud import model_json
from fedfraud.crosscheck import ScoreQuestion
from fedfraud.model_guard import ModelRefused, header_from_model, parse_received_model, rebuild_model
from fedfraud.wire import CLEAR_COUNTS, TrainTask
from pipelines.build import CONTRACT_FILE, FEATURES_DIR, VALIDATION_DIR
from pipelines.config import PipelineConfig
from pipelines.feature_contract import load_contract
from pipelines.validation import REPORT_FILE, shareable_reasons

FINGERPRINT_FILE = "input_fingerprint.json"
SPILL_DIR = "spill"  # the training and holdout matrices, in unnamed files (``dataset.load_dataset``)
XGB_CACHE_DIR = "xgb-cache"  # XGBoost's pages of the quantized training rows, above ``external_memory_rows``


class BankDeclined(RuntimeError):
    """The bank's own checks say it must not train (e.g. its fraud rate is out of band)."""


def input_fingerprint(path: Path, config: PipelineConfig) -> dict[str, Any]:
    """What decides whether prepared features are still current: input files and config."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    stat = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    digest = hashlib.sha256(json.dumps([stat, repr(config)]).encode()).hexdigest()
    return {"input": str(path), "digest": digest}


class BankNode:
    def __init__(self, bank: str, raw_path: str | Path, work_dir: str | Path, config: PipelineConfig,
                 holdout_fraction: float = 0.2, alert_budget: float = DEFAULT_ALERT_BUDGET, engine: str = "local",
                 histogram_tls=None, policy: TrainingPolicy | None = None, secagg=None, share_metrics: bool = False,
                 share_local_model: bool = True, privacy: PrivacyPolicy | None = None,
                 external_memory_rows: int | None = EXTERNAL_MEMORY_ROWS):
        self.bank = bank
        self.raw_path = Path(raw_path)
        self.work_dir = Path(work_dir)
        self.config = config
        self.holdout_fraction = holdout_fraction
        self.alert_budget = alert_budget
        self.engine = engine  # "local" (one machine) or "spark" (SparkXGBClassifier)
        self.histogram_tls = histogram_tls  # ClientTLS for the federated channel; else FEDFRAUD_FEDERATED_* env vars
        self._histogram_worker = None
        self.policy = policy or TrainingPolicy()  # what this bank accepts to train and to load
        self.secagg = secagg  # masked_evaluation.SecAggCredentials or its loader: signs key offers (None: cannot mask)
        self.share_metrics = share_metrics  # per-bank metrics leave only if the bank says so
        self.share_local_model = share_local_model  # cross-evaluation: may its local model be scored at the others?
        self.privacy = privacy or PrivacyPolicy()  # DP: leaf values; histogram: gradient sums; off by default
        self.external_memory_rows = external_memory_rows  # more training rows: XGBoost pages them on disk (None: never)
        if self.privacy.enabled and engine != "local":
            raise ValueError(f"{bank}: privacy needs engine 'local' (the Spark engine grows trees without it)")

    def secagg_credentials(self):
        """The bank's ``SecAggCredentials`` (a loader, e.g. the agent's TLS files, is called on first use); else
        those of its histogram channel's consortium certificate (as its masking sidecar uses them), or None."""
        if callable(self.secagg):
            self.secagg = self.secagg()
        if self.secagg is None and self.histogram_tls is not None:
            from bank_node.masked_evaluation import SecAggCredentials

            tls = self.histogram_tls
            self.secagg = SecAggCredentials.from_files(tls.server_ca, tls.client_cert, tls.client_key)
        return self.secagg

    @cached_property
    def secagg_store(self):
        from bank_node.masked_evaluation import SessionStore

        return SessionStore(self.work_dir / "secagg", self.bank)

    @cached_property
    def privacy_ledger(self):
        from bank_node.privacy_ledger import PrivacyLedger

        return PrivacyLedger(self.work_dir / "privacy", self.privacy.epsilon_budget, self.privacy.delta)

    def is_prepared(self) -> bool:
        """True when features exist for exactly this input and config (no Spark needed)."""
        marker = self.work_dir / FINGERPRINT_FILE
        return marker.exists() and json.loads(marker.read_text()) == input_fingerprint(self.raw_path, self.config)

    def prepare(self, spark) -> dict[str, Any]:
        """Validate and build features unless they are current for this input and config."""
        from pipelines.build import build_bank_features

        if not self.is_prepared():
            build_bank_features(spark, self.raw_path, self.work_dir, self.config)
            (self.work_dir / FINGERPRINT_FILE).write_text(json.dumps(input_fingerprint(self.raw_path, self.config)))
        self.__dict__.pop("data", None)
        return self.report

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.work_dir / VALIDATION_DIR / REPORT_FILE).read_text())

    @cached_property
    def contract(self) -> dict[str, Any]:
        return load_contract(self.work_dir / CONTRACT_FILE)

    @cached_property
    def data(self) -> BankDataset:
        names = self.contract["names"]
        return load_dataset(self.work_dir / FEATURES_DIR, names, self.holdout_fraction, self.work_dir / SPILL_DIR)

    def summary(self) -> dict[str, Any]:
        """What the bank tells the aggregator before a round: row counts, contract, readiness (its label
        counts leave only masked: ``masked_counts``)."""
        report = self.report
        counts = self.data.counts()
        return {
            "bank": self.bank,
            "contract_hash": self.contract["hash"],
            "counts": {key: counts[key] for key in CLEAR_COUNTS},
            "training_allowed": report["training_allowed"],
            "decline_reasons": shareable_reasons(report["decline_reasons"]),  # the rule, not the bank's figure
            "data_window": [report["event_time_min"], report["event_time_max"]],
            "holdout_start": self.data.holdout_start,
        }

    def train(self, task_bytes: bytes) -> bytes:
        """Run one training task (within the bank's policy, base model validated; sent by reference: rebuilt
        from a model this bank holds first, ``bank_node.model_cache``); return the update's bytes."""
        task_bytes = expand(self, task_bytes, TrainTask.MAX_BYTES, "training task")
        task = self.accepted_task(task_bytes)
        self._require_training_allowed()
        data = self.data
        epsilon = None
        if self.privacy.enabled:  # charged before it trains; refused over budget (bank_node/privacy.py)
            booster, epsilon = train_private(task, task_bytes, data, self.privacy, self.privacy_ledger)
        elif self.engine == "spark":
            from pipelines.spark import get_spark

            rows = spark_training_rows(get_spark("fedfraud-bank"), self.work_dir / FEATURES_DIR, data)
            booster = train_trees_spark(task, rows, data.feature_names)
        else:
            booster = train_trees(task, data.X_train, data.y_train, data.feature_names,
                                  cache_dir=self.training_cache(data))
        metrics = {}
        if self.share_metrics:  # the new trees' holdout metrics are per-bank figures: they leave only if shared
            scores = predict_rows(booster, data.X_holdout, data.feature_names)
            metrics = finite(holdout_metrics(scores, data.y_holdout, self.alert_budget))
        return build_update(task, booster, data.counts(), metrics, epsilon).to_bytes()

    def accepted_task(self, task_bytes: bytes) -> TrainTask:
        """The task if this bank accepts it: for this bank, inside its policy, its base model
        validated and rebuilt; else ``TaskRefused`` naming why."""
        task = TrainTask.from_bytes(task_bytes)
        if task.bank != self.bank:
            raise TaskRefused("wrong_bank", f"task for {str(task.bank)[:40]} sent to {self.bank}")
        self.policy.check(task)
        if task.base_model is None:
            return task
        try:
            header = header_from_model(task.base_model, self.contract["names"])
            base = rebuild_model(task.base_model, self.policy.received_limits(), header)
        except ModelRefused as refused:
            raise TaskRefused(f"base_model_{refused.check}", refused.detail) from None
        model_cache(self).keep(model_json.to_bytes(task.base_model))  # validated: a later task may refer to it
        return dataclasses.replace(task, base_model=base)

    def _require_training_allowed(self) -> None:
        report = self.report
        if not report["training_allowed"]:
            reasons = shareable_reasons(report["decline_reasons"])  # the failure leaves the bank too
            raise BankDeclined(f"{self.bank} declines to train: {'; '.join(reasons)}")

    def offer(self, request_bytes: bytes) -> bytes:
        """Secure aggregation: this bank's signed ephemeral key offer for a session."""
        from bank_node.masked_evaluation import make_offer

        return make_offer(self, request_bytes)

    def masked_counts(self, task_bytes: bytes) -> bytes:
        """Planning: this bank's label counts (positives, holdout positives) as masked words."""
        from bank_node.masked_counts import masked_counts

        return masked_counts(self, task_bytes)

    def refit_sums(self, task_bytes: bytes) -> bytes:
        """Compaction's leaf refit: the task model's per-leaf loss sums on the training rows, as masked words."""
        from bank_node.masked_refit import masked_refit_sums

        return masked_refit_sums(self, task_bytes)

    def evaluate_masked(self, task_bytes: bytes) -> bytes:
        """The round's evaluation: histograms as masked words, metrics only if ``share_metrics``."""
        from bank_node.masked_evaluation import evaluate_masked

        return evaluate_masked(self, task_bytes)

    def evaluate(self, model_bytes: bytes) -> bytes:
        """Score the holdout with a model (validated and rebuilt first: a ``ModelRefused`` names what is
        wrong with it); return metrics and histograms (cross-evaluation, acceptance, masking's input)."""
        data = self.data
        doc = parse_received_model(model_bytes, self.policy.received_limits(), data.feature_names)
        booster = model_json.to_booster(doc)
        scores = predict_rows(booster, data.X_holdout, data.feature_names)
        report = evaluation_report(self.bank, model_json.model_id(doc), scores, data.y_holdout, self.alert_budget)
        return dataclasses.replace(report, metrics=finite(report.metrics)).to_bytes()

    def score(self, question_bytes: bytes) -> bytes:
        """Score a cross-evaluation or acceptance question's models on the holdout (reports only); models sent
        by reference are rebuilt from models this bank holds first (``bank_node.model_cache``)."""
        from bank_node.acceptance import score_question

        return score_question(self, expand(self, question_bytes, ScoreQuestion.MAX_BYTES, "score question"))

    def local_model(self, task_bytes: bytes) -> bytes:
        """This bank's model from its rows alone, for cross-evaluation (refused unless shared)."""
        from bank_node.acceptance import local_model

        return local_model(self, task_bytes)

    def fit_local(self, params: dict[str, Any], num_trees: int):
        """A model from this bank's rows alone (the local-only baseline; nothing leaves the bank)."""
        data = self.data
        task = TrainTask(bank=self.bank, round_id=0, base_model_id="none", contract_hash=self.contract["hash"],
                         num_trees=num_trees, params=params)
        return train_trees(task, data.X_train, data.y_train, data.feature_names, cache_dir=self.training_cache(data))

    def training_cache(self, data: BankDataset) -> Path | None:
        """Where XGBoost pages the quantized training rows (``training.training_matrix``): on disk in this
        bank's workspace above ``external_memory_rows`` rows, else None (in memory). Same model either way."""
        if self.external_memory_rows is None or len(data.y_train) <= self.external_memory_rows:
            return None
        return self.work_dir / XGB_CACHE_DIR

    # Histogram federation (aggregator/strategies/histogram.py): banks grow each tree together.

    def bin_counts(self, task_bytes: bytes) -> bytes:
        """Counts of this bank's training rows over the consortium's grid, as masked words (a ``GridCountTask``);
        in the clear only for a plain grid and a bank that allows unmasked sessions (bank_node/masked_grid.py)."""
        from bank_node.masked_grid import clear_grid_counts, is_masked_task, masked_grid_counts

        if is_masked_task(task_bytes):
            return masked_grid_counts(self, task_bytes)
        return clear_grid_counts(self, task_bytes)

    def train_histogram(self, task_bytes: bytes, session_bytes: bytes) -> bytes:
        """Join a collective round in a worker process of this bank; return its update's bytes."""
        from bank_node.collective_bytes import WIRE_FILE, session_count, with_collective_bytes
        from bank_node.histogram_worker import ClientTLS, HistogramSession, start_worker

        task = self.accepted_task(task_bytes)
        self._require_training_allowed()
        session = HistogramSession.from_bytes(session_bytes)
        if session.bank != self.bank:
            raise ValueError(f"session for {session.bank} sent to {self.bank}")
        private = None
        if self.privacy.enabled:  # charged before it trains; refused over budget (bank_node/histogram_privacy.py)
            from bank_node.histogram_privacy import charge_histogram

            private = charge_histogram(self, task, task_bytes, session, session_bytes)
        worker = start_worker(self.work_dir, self.data, self.contract["hash"], task.to_bytes(), session,
                              self.histogram_tls or ClientTLS.from_env(), credentials=self.secagg_credentials(),
                              private=private)
        self._histogram_worker = worker
        try:
            update = worker.result()
        finally:
            self._histogram_worker = None
        counted = session_count(self.work_dir / "histogram" / WIRE_FILE, session.secagg_session)
        return with_collective_bytes(update, counted)  # the sidecar's bytes with the server, this session's

    def abort_histogram(self) -> None:
        """Kill this bank's running worker, if any (the round failed elsewhere)."""
        worker = self._histogram_worker
        if worker is not None:
            worker.kill()
