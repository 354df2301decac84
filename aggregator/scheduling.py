"""What each task of the Airflow DAGs calls: small functions of plain, JSON-able arguments.

Embedded mode: a bank's task runs that bank's node here, on its own data path and work folder.
Networked mode: the same task waits, bounded, for the bank node's message to reach the
workspace through the aggregator service, and fails at the deadline.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def wait_for(path: Path, seconds: float, interval: float = 2.0) -> None:
    """Poll until ``path`` exists; fail with its name at the deadline (networked mode)."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not arrive within {seconds}s ({path.parent})")
        time.sleep(interval)


def prepare_bank(spec: RunSpec, bank: str) -> str:
    """Validate and build the bank's features (embedded) or wait for its summary (networked)."""
    if spec.mode == "networked":
        wait_for(spec.workspace.summary_path(bank), spec.wait_seconds)
        return bank
    from pipelines.spark import get_spark

    node = spec.node(bank)
    node.prepare(get_spark(f"fedfraud-{bank}"))
    rounds.record_summary(spec.workspace, node.summary())
    return bank


def open_federation(spec: RunSpec) -> list[str]:
    from pipelines.config import load_config
    from pipelines.feature_contract import feature_contract

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
    plan = _plan(spec)
    rounds.clear_round(spec.workspace, round_id)
    banks = [] if rounds.trains_in_one_task(plan, round_id) else rounds.open_round(spec.workspace, plan, round_id)
    write_bytes(json.dumps({"run_id": spec.run_id}).encode(), spec.workspace.path(round_id, "opened"))
    return banks


def train_bank(spec: RunSpec, round_id: int, bank: str) -> str:
    path = spec.workspace.path(round_id, "updates", bank)
    if spec.mode == "networked":
        wait_for(path, spec.wait_seconds)
    else:
        rounds.bank_train(spec.workspace, round_id, spec.node(bank))
    return bank


def aggregate_round(spec: RunSpec, round_id: int) -> list[str]:
    plan, ws = _opened_round(spec, round_id), spec.workspace
    if rounds.trains_in_one_task(plan, round_id):
        nodes = {b: spec.node(b) for b in plan["banks"]}
        rounds.train_in_process(ws, plan, round_id, nodes, spec.tracker())
    else:
        rounds.aggregate_round(ws, plan, round_id, spec.tracker())
    return plan["banks"]  # every bank evaluates the candidate, whether its update was accepted or not


def evaluate_bank(spec: RunSpec, round_id: int, bank: str) -> str:
    if spec.mode == "networked":
        wait_for(spec.workspace.path(round_id, "evaluations", bank), spec.wait_seconds)
    else:
        rounds.bank_evaluate(spec.workspace, round_id, spec.node(bank))
    return bank


def finish_round(spec: RunSpec, round_id: int) -> str:
    version, _, _ = rounds.finish_round(spec.workspace, _opened_round(spec, round_id), round_id, spec.tracker())
    return f"models:/{spec.model_name}/{version}"
