"""Embedded federation end to end: every bank's node in this process, on its own data path and
work folder, still handing the aggregator nothing but bytes. The CLI, the demo and the benches
use it; it runs the protocol's phases (``aggregator.protocol.phases``) over a workspace.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aggregator.checks import Rejection
from aggregator.drivers.baselines import run_centralized, run_local
from aggregator.drivers.result import FederationResult
from aggregator.protocol import crossval, phases, secure_planning
from aggregator.protocol.plan import Plan
from aggregator.protocol.state import Node, RoundState, strategy_for
from aggregator.protocol.training import checks
from aggregator.protocol.workspace import Workspace
from aggregator.strategies import Strategy
from aggregator.tracking import FederationTracker, default_tracking_uri
from bank_node.kept_worker import stop_live_workers
from bank_node.masked_evaluation import SecAggCredentials
from bank_node.node import BankNode
from fedfraud import model_json, pki
from fedfraud.model_json import Doc
from fedfraud.protocol import StrategyName
from fedfraud.settings import FederationSettings
from pipelines.config import PipelineConfig
from pipelines.feature_contract import feature_contract
from pipelines.io import write_bytes

log = logging.getLogger("fedfraud.federation")
STRATEGY_CHOICES = StrategyName.CHOICES


@dataclass
class Consortium:
    nodes: dict[str, BankNode]
    config: PipelineConfig
    work_dir: Path

    @property
    def contract(self) -> dict:
        return feature_contract(self.config.features)


def prepare_consortium(banks: dict[str, Path], work_dir: Path, config: PipelineConfig,
                       settings: FederationSettings, on_progress: Callable[[str], None] = print,
                       share_metrics: bool = True) -> Consortium:
    """Create every bank's node (with a consortium certificate from ``work_dir/pki``) and run its gate
    and feature pipeline (skipped when current). ``share_metrics``: in process one operator holds every
    bank's data anyway, and the demo and benches report per-bank figures; a deployed bank's default is off."""
    from pipelines.spark import get_spark

    spark = get_spark("fedfraud-banks")
    credentials = embedded_credentials(Path(work_dir) / "pki", list(banks))
    nodes = {}
    for bank, path in banks.items():
        on_progress(f"{bank}: validate + features")
        node = BankNode(bank, path, work_dir / "banks" / bank, config, settings.holdout_fraction, settings.alert_budget,
                        secagg=credentials[bank], share_metrics=share_metrics)
        node.prepare(spark)
        nodes[bank] = node
    return Consortium(nodes, config, work_dir)


def embedded_credentials(folder: Path, banks: list[str]) -> dict[str, SecAggCredentials]:
    """Each bank's consortium certificate for secure aggregation in process: a consortium provisioned into
    ``folder`` once (a bank added later is issued its certificate), so embedded runs the same protocol."""
    folder = Path(folder)
    if not (folder / "ca" / "ca.crt").exists():
        pki.provision("fedfraud-embedded", [pki.AGGREGATOR, *sorted(banks)], folder, operators=())
    for bank in banks:
        if not (folder / bank / "cert.pem").exists():
            pki.issue(folder / "ca", bank, "bank", folder)
    return {b: SecAggCredentials.from_files(folder / "ca" / "ca.crt", folder / b / "cert.pem", folder / b / "key.pem")
            for b in banks}


def _with_credentials(nodes: dict[str, Node], folder: Path) -> None:
    """Give every ``BankNode`` without a consortium certificate one (nodes built outside ``prepare_consortium``)."""
    bare = {b: n for b, n in nodes.items() if isinstance(n, BankNode) and n.secagg is None}
    for bank, credentials in (embedded_credentials(folder, sorted(bare)) if bare else {}).items():
        bare[bank].secagg = credentials


def federate(consortium: Consortium, strategy: str, rounds: int, model_name: str, tracking_uri: str | None,
             settings: FederationSettings, seed: int,
             on_progress: Callable[[str], None] = print) -> dict[str, FederationResult]:
    """Run ``strategy``; returns {"": result} or, for ``local``, {bank: result}."""
    uri = tracking_uri or default_tracking_uri(consortium.work_dir)
    if strategy == StrategyName.LOCAL:
        return run_local(consortium.nodes, rounds, uri, model_name, consortium.contract, settings, seed)
    tracker = FederationTracker(uri, model_name)
    if strategy == StrategyName.CENTRALIZED:
        return {"": run_centralized(consortium.nodes, rounds, tracker, consortium.contract, settings, seed)}
    return {"": run_federation(consortium.nodes, strategy, rounds, tracker, consortium.contract, settings, seed,
                               on_progress, work_dir=consortium.work_dir)}


def run_federation(nodes: dict[str, Node], strategy_name: str, rounds: int, tracker: FederationTracker,
                   contract: dict[str, Any], settings: FederationSettings = FederationSettings(), seed: int = 0,
                   on_progress: Callable[[str], None] = lambda message: None,
                   work_dir: str | Path | None = None) -> FederationResult:
    """Run ``rounds`` rounds of ``strategy_name`` over ``nodes``; register every round's model.

    The same phases as the Airflow DAG and the service, in this process, over a workspace in
    ``work_dir`` (a temporary folder when not given)."""
    with (nullcontext(work_dir) if work_dir else tempfile.TemporaryDirectory(prefix="fedfraud-")) as root:
        ws = Workspace(root, tracker.model_name)
        _with_credentials(nodes, Path(root) / "pki")
        for node in nodes.values():
            phases.summarize(ws, node.summary())
        plan = phases.plan_federation(ws, tracker.model_name, strategy_name, rounds, seed, settings, contract,
                                      sorted(nodes))
        plan = secure_planning.run(ws, plan, nodes, on_progress)  # the label counts, summed masked
        plan = crossval.run(ws, plan, nodes, on_progress)  # before round 1: banks that poison are excluded
        plan = secure_planning.run(ws, plan, nodes, on_progress)  # the kept banks' sums (none excluded: as is)
        for bank, reason in plan.excluded.items():
            log.warning("bank %s excluded: %s", bank, reason)
        strategy = strategy_for(plan)  # one instance per federation (histogram keeps its bins)
        with processes_kept(strategy):  # histogram: one server and one worker per bank for the federation
            rejections: list[dict[str, str]] = []
            result = None
            for round_id in range(1, rounds + 1):
                ws.clear_round(round_id)
                r = RoundState(ws, plan, round_id, tracker, strategy, on_progress=on_progress)
                version, evaluation, history = phases.run_round(r, nodes)
                rejections += [{"round": str(round_id), **x} for x in checks(r)["rejections"]]
                on_progress(f"round {round_id}: pooled AUPRC {evaluation.pooled['auprc']:.4f} -> version {version}")
                result = FederationResult(tracker.model_uri(version), version, plan.federation_id, evaluation,
                                          history, list(rejections), plan.excluded)
    assert result is not None
    return result


@contextmanager
def processes_kept(strategy: Strategy):
    """Keep a collective strategy's processes (the histogram's federated server, the banks' workers) for
    every round inside; on leaving, however it ends, stop them all (the shutdown hook)."""
    if not hasattr(strategy, "keep_world"):
        yield strategy
        return
    strategy.keep_world = True
    try:
        yield strategy
    finally:
        strategy.keep_world = False
        strategy.close()
        stop_live_workers()


def train_round(nodes: dict[str, Node], strategy: Strategy, banks: list[str], round_id: int, global_doc: Doc | None,
                contract: dict[str, Any], settings: FederationSettings,
                on_progress: Callable[[str], None] = lambda message: None
                ) -> tuple[Doc | None, set[str], list[Rejection]]:
    """Only the training phases of one round (every stage: configure, train, check, aggregate), in a
    scratch workspace; returns (new global model, banks whose updates were accepted, named rejections)."""
    plan = Plan(model_name="round", strategy=strategy.name, rounds=max(1, round_id), seed=strategy.seed,
                settings=settings, contract_hash=contract["hash"], feature_names=list(contract["names"]),
                banks=list(banks), excluded={}, consortium_params=strategy.consortium_params, federation_id="scratch")
    with tempfile.TemporaryDirectory(prefix="fedfraud-round-") as root:
        ws = Workspace(root, plan.model_name)
        if global_doc is not None:
            write_bytes(model_json.to_bytes(global_doc), ws.path(round_id - 1, "model"))
        r = RoundState(ws, plan, round_id, None, strategy, on_progress=on_progress)
        phases.run_stages(r, nodes)
        verdict = checks(r)
        working = r.path("working")
        doc = ws.read_json(working) if working.exists() else global_doc
        return doc, set(verdict["participants"]), [Rejection(**x) for x in verdict["rejections"]]
