"""Embedded federation end to end: prepare each bank's node, then run the chosen strategy.

The CLI, the demo and the bench call this; in embedded mode each bank's node runs in this
process on its own data path and work folder, and still only hands the aggregator bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aggregator.baselines import run_centralized, run_local
from aggregator.federation import FederationResult, run_federation
from aggregator.settings import FederationSettings
from aggregator.tracking import FederationTracker, default_tracking_uri
from bank_node.node import BankNode
from pipelines.config import PipelineConfig
from pipelines.feature_contract import feature_contract

STRATEGY_CHOICES = ("bagging", "cyclic", "histogram", "local", "centralized")


@dataclass
class Consortium:
    nodes: dict[str, BankNode]
    config: PipelineConfig
    work_dir: Path

    @property
    def contract(self) -> dict:
        return feature_contract(self.config.features)


def prepare_consortium(banks: dict[str, Path], work_dir: Path, config: PipelineConfig,
                       settings: FederationSettings, on_progress: Callable[[str], None] = print) -> Consortium:
    """Create every bank's node and run its gate and feature pipeline (skipped when current)."""
    from pipelines.spark import get_spark

    spark = get_spark("fedfraud-banks")
    nodes = {}
    for bank, path in banks.items():
        on_progress(f"{bank}: validate + features")
        node = BankNode(bank, path, work_dir / "banks" / bank, config, settings.holdout_fraction, settings.alert_budget)
        node.prepare(spark)
        nodes[bank] = node
    return Consortium(nodes, config, work_dir)


def federate(consortium: Consortium, strategy: str, rounds: int, model_name: str, tracking_uri: str | None,
             settings: FederationSettings, seed: int,
             on_progress: Callable[[str], None] = print) -> dict[str, FederationResult]:
    """Run ``strategy``; returns {"": result} or, for ``local``, {bank: result}."""
    uri = tracking_uri or default_tracking_uri(consortium.work_dir)
    if strategy == "local":
        return run_local(consortium.nodes, rounds, uri, model_name, consortium.contract, settings, seed)
    tracker = FederationTracker(uri, model_name)
    if strategy == "centralized":
        return {"": run_centralized(consortium.nodes, rounds, tracker, consortium.contract, settings, seed)}
    return {"": run_federation(consortium.nodes, strategy, rounds, tracker, consortium.contract, settings, seed,
                               on_progress, work_dir=consortium.work_dir)}
