"""What each task of the Airflow DAGs calls: small functions of plain, JSON-able arguments.

Embedded mode: a bank's task runs that bank's node here, on its own data path and work folder.
Networked mode: the aggregator service (``aggregator.service``) runs the federation and the
banks' agents do the bank work; each task asks the service to act (start, plan, open a
round) or waits, bounded, for that bank's answer or the round's verdict, and fails by name
at the deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aggregator import rounds
from aggregator.settings import FederationSettings
from pipelines.io import write_bytes

MODES = ("embedded", "networked")


@dataclass(frozen=True)
class RunSpec:
    """A DAG run's parameters, resolved."""

    banks: dict[str, str]
    model_name: str
    strategy: str = "bagging"
    rounds: int = 3
    min_banks: int = 1
    trees_per_round: int = 20
    seed: int = 0
    mode: str = "embedded"
    work_dir: str = "work/airflow"
    tracking_uri: str | None = None
    wait_seconds: int = 1800
    run_id: str | None = None  # the scheduler's run: steps refuse state another run left behind

    @classmethod
    def from_params(cls, params: dict[str, Any], run_id: str | None = None) -> "RunSpec":
        banks = params.get("banks") or json.loads(os.environ.get("FEDFRAUD_BANKS", "{}"))
        if not banks:
            raise ValueError("no banks: set the 'banks' param, the Airflow Variable fedfraud_banks or $FEDFRAUD_BANKS")
        if params.get("mode", "embedded") not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__ and k != "banks"}
        work_dir = known.pop("work_dir", None) or os.environ.get("FEDFRAUD_WORK_DIR", "work/airflow")
        return cls(banks=dict(banks), work_dir=work_dir, run_id=run_id, **known)

    @property
    def settings(self) -> FederationSettings:
        return FederationSettings(trees_per_round=self.trees_per_round, min_banks=self.min_banks)

    @property
    def workspace(self) -> rounds.Workspace:
        return rounds.Workspace(self.work_dir, self.model_name)

    def tracker(self):
        from aggregator.tracking import FederationTracker, default_tracking_uri

        return FederationTracker(self.tracking_uri or default_tracking_uri(Path(self.work_dir)), self.model_name)

    def node(self, bank: str):
        from bank_node.node import BankNode
        from pipelines.config import load_config

        settings = self.settings
        return BankNode(bank, self.banks[bank], Path(self.work_dir) / "banks" / bank, load_config(),
                        settings.holdout_fraction, settings.alert_budget)


# ---- networked mode: the aggregator service does the work, these tasks ask and watch ----------

FINISHED_TASK = ("done", "failed", "expired")


def wait_until(fetch: Callable[[], Any], ready: Callable[[Any], bool], seconds: float, what: str,
               interval: float = 2.0) -> Any:
    """Poll ``fetch`` until ``ready`` holds for its value, and return that value; fail naming ``what``
    at the deadline."""
    deadline = time.monotonic() + seconds
    while not ready(value := fetch()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {seconds}s")
        time.sleep(interval)
    return value


def federation_key(spec: RunSpec) -> str:
    """The service's name for this run's federation: readable, URL-safe, unique per run."""
    raw = f"{spec.model_name}--{spec.run_id or 'manual'}"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', raw)[:80]}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}"


def _service():
    from fedfraud.transport import AggregatorClient

    return AggregatorClient.from_env()


def _round_state(spec: RunSpec, round_id: int, done: Callable[[dict], bool], what: str) -> dict[str, Any]:
    """The round's status once ``done`` holds; a failed round raises RoundFailed with its reason."""
    service, key = _service(), federation_key(spec)
    status = wait_until(lambda: service.round(key, round_id), lambda s: done(s) or s["state"] == "failed",
                        spec.wait_seconds, what)
    if status["state"] == "failed":
        raise rounds.RoundFailed(f"round {round_id}: {status['error']}")
    return status


def _bank_answer(spec: RunSpec, round_id: int, bank: str, kind: str) -> str:
    """Wait for ``bank``'s answer to its ``kind`` task; an expired or failed one fails this bank's task."""
    status = _round_state(spec, round_id, lambda s: s["tasks"].get(bank, {}).get(kind) in FINISHED_TASK,
                          f"{bank}'s {kind} for round {round_id}")
    state = status["tasks"][bank][kind]
    if state != "done":
        raise RuntimeError(f"{bank}: {kind} for round {round_id} {state} (see the round's status at the aggregator)")
    return bank


def _networked_prepare(spec: RunSpec, bank: str) -> str:
    service, key = _service(), federation_key(spec)
    request = {"model_name": spec.model_name, "strategy": spec.strategy, "rounds": spec.rounds, "seed": spec.seed,
               "min_banks": spec.min_banks, "trees_per_round": spec.trees_per_round, "banks": sorted(spec.banks)}
    service.start_federation(key, request)  # idempotent: every bank's task asks, the first creates it
    state = wait_until(lambda: service.federation(key)["summaries"].get(bank, {}).get("summary"),
                       lambda state: state in FINISHED_TASK, spec.wait_seconds, f"{bank}'s summary")
    if state != "done":
        raise RuntimeError(f"{bank}: summary {state}")
    return bank


# ---- the tasks -----------------------------------------------------------------------------


def prepare_bank(spec: RunSpec, bank: str) -> str:
    """Validate and build the bank's features (embedded) or wait for its summary (networked)."""
    if spec.mode == "networked":
        return _networked_prepare(spec, bank)
    from pipelines.spark import get_spark

    node = spec.node(bank)
    node.prepare(get_spark(f"fedfraud-{bank}"))
    rounds.record_summary(spec.workspace, node.summary())
    return bank


def open_federation(spec: RunSpec) -> list[str]:
    from pipelines.config import load_config
    from pipelines.feature_contract import feature_contract

    if spec.mode == "networked":
        status = _service().plan(federation_key(spec))
        if status["state"] != "planned":
            raise rounds.RoundFailed(status["error"])
        return status["banks"]
    contract = feature_contract(load_config().features)
    plan = rounds.open_federation(spec.workspace, spec.model_name, spec.strategy, spec.rounds, spec.seed,
                                  spec.settings, contract, sorted(spec.banks), run_id=spec.run_id)
    return plan["banks"]


def _opened_by_this_run(spec: RunSpec, marker: Path, what: str) -> dict[str, Any]:
    """The JSON at ``marker`` if this run wrote it; stale state from another run is refused."""
    content = spec.workspace.read_json(marker) if marker.exists() else {}
    if content.get("run_id") != spec.run_id:
        raise rounds.RoundFailed(f"{what} was not opened by this run (an earlier step failed)")
    return content


def _plan(spec: RunSpec) -> dict[str, Any]:
    return _opened_by_this_run(spec, spec.workspace.plan_path, "the federation")


def _opened_round(spec: RunSpec, round_id: int) -> dict[str, Any]:
    plan = _plan(spec)
    _opened_by_this_run(spec, spec.workspace.path(round_id, "opened"), f"round {round_id}")
    return plan


def open_round(spec: RunSpec, round_id: int) -> list[str]:
    """Write the round's tasks; cyclic and histogram rounds train in one task (``train_in_process``)."""
    if spec.mode == "networked":
        status = _service().open_round(federation_key(spec), round_id)
        return sorted(b for b, kinds in status["tasks"].items() if "train" in kinds and not status.get("collective"))
    plan = _plan(spec)
    rounds.clear_round(spec.workspace, round_id)
    banks = [] if rounds.trains_in_one_task(plan, round_id) else rounds.open_round(spec.workspace, plan, round_id)
    write_bytes(json.dumps({"run_id": spec.run_id}).encode(), spec.workspace.path(round_id, "opened"))
    return banks


def train_bank(spec: RunSpec, round_id: int, bank: str) -> str:
    if spec.mode == "networked":
        return _bank_answer(spec, round_id, bank, "train")
    rounds.bank_train(spec.workspace, round_id, spec.node(bank))
    return bank


def aggregate_round(spec: RunSpec, round_id: int) -> list[str]:
    if spec.mode == "networked":  # the service aggregates when every bank answered or at the deadline
        status = _round_state(spec, round_id, lambda s: s["state"] != "training", f"round {round_id}'s aggregation")
        return sorted(b for b, kinds in status["tasks"].items() if "evaluate" in kinds)
    plan, ws = _opened_round(spec, round_id), spec.workspace
    if rounds.trains_in_one_task(plan, round_id):
        nodes = {b: spec.node(b) for b in plan["banks"]}
        rounds.train_in_process(ws, plan, round_id, nodes, spec.tracker())
    else:
        rounds.aggregate_round(ws, plan, round_id, spec.tracker())
    return plan["banks"]  # every bank evaluates the candidate, whether its update was accepted or not


def evaluate_bank(spec: RunSpec, round_id: int, bank: str) -> str:
    if spec.mode == "networked":
        return _bank_answer(spec, round_id, bank, "evaluate")
    rounds.bank_evaluate(spec.workspace, round_id, spec.node(bank))
    return bank


def finish_round(spec: RunSpec, round_id: int) -> str:
    if spec.mode == "networked":
        status = _round_state(spec, round_id, lambda s: s["state"] == "registered", f"round {round_id}'s registration")
        return f"models:/{spec.model_name}/{status['version']}"
    version, _, _ = rounds.finish_round(spec.workspace, _opened_round(spec, round_id), round_id, spec.tracker())
    return f"models:/{spec.model_name}/{version}"
