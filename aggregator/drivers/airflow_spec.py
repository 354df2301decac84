"""A DAG run's parameters (``RunSpec``) and the bounded wait the networked tasks use."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aggregator.protocol.workspace import Workspace
from fedfraud.protocol import StrategyName
from fedfraud.settings import FederationSettings, requested_settings

MODES = ("embedded", "networked")


@dataclass(frozen=True)
class RunSpec:
    """A DAG run's parameters, resolved."""

    banks: dict[str, str]
    model_name: str
    strategy: str = StrategyName.BAGGING
    rounds: int = 3
    min_banks: int = 1
    trees_per_round: int = 20
    seed: int = 0
    mode: str = "embedded"
    work_dir: str = "work/airflow"
    tracking_uri: str | None = None
    wait_seconds: int = 1800
    crossval: bool = True  # the poisoning defence's cross-evaluation before round 1
    champion_gate: bool = True  # a first champion must beat the best single-bank local model
    acceptance_delta: float | str | None = "auto"  # the acceptance gate's allowed drop (README "Poisoning defence")
    compaction: bool = False  # bagging: the banks judge smaller models every round (README "Compaction")
    options: dict[str, Any] = field(default_factory=dict)  # any other request option (crossval_masked, …)
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
        spec = cls(banks=dict(banks), work_dir=work_dir, run_id=run_id, **known)
        assert spec.settings  # building them refuses a bad option by name, before any task runs
        return spec

    @property
    def settings(self) -> FederationSettings:
        named = {"crossval": self.crossval, "champion_gate": self.champion_gate,
                 "acceptance_delta": self.acceptance_delta, "compaction": self.compaction}
        twice = sorted(set(self.options) & set(named))
        if twice:
            raise ValueError(f"options {twice} are DAG params of their own: set them there, not in 'options'")
        return requested_settings(self.trees_per_round, self.min_banks, {**named, **self.options})

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.work_dir, self.model_name)

    def tracker(self):
        from aggregator.tracking import FederationTracker, default_tracking_uri

        return FederationTracker(self.tracking_uri or default_tracking_uri(Path(self.work_dir)), self.model_name)


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
