"""Airflow task bodies in embedded mode: a bank's task runs that bank's node in the worker, on
its own data path and work folder; the aggregator's tasks run the protocol's phases between.

Each round's DAG tasks map onto ``aggregator.protocol.phases.ROUND``: ``open`` runs the
aggregator phases before training, ``train``/``evaluate`` one bank's part of that bank phase,
``check``/``aggregate``/``register_and_promote`` the aggregator phases after it (``accept``: every
bank scores the candidate between ``check`` and ``aggregate``). Cyclic and histogram rounds train
inside ``check`` (in turn / all banks together).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aggregator.drivers.airflow_spec import RunSpec
from aggregator.drivers.embedded import embedded_credentials
from aggregator.protocol import crossval, phases, secure_planning
from aggregator.protocol.errors import PhaseRerun, RoundFailed
from aggregator.protocol.plan import Plan
from aggregator.protocol.state import RoundState
from bank_node.node import BankNode
from pipelines.config import load_config
from pipelines.io import write_bytes


class EmbeddedTasks:
    def __init__(self, spec: RunSpec):
        self.spec, self.ws = spec, spec.workspace

    def node(self, bank: str) -> BankNode:
        """The bank's node, with its consortium certificate once the federation is open (``open_federation``)."""
        settings, pki = self.spec.settings, Path(self.spec.work_dir) / "pki"
        credentials = embedded_credentials(pki, [bank])[bank] if (pki / bank / "cert.pem").exists() else None
        return BankNode(bank, self.spec.banks[bank], Path(self.spec.work_dir) / "banks" / bank, load_config(),
                        settings.holdout_fraction, settings.alert_budget, secagg=credentials)

    def prepare_bank(self, bank: str) -> str:
        """Validate and build the bank's features; its summary goes to the workspace."""
        from pipelines.spark import get_spark

        node = self.node(bank)
        node.prepare(get_spark(f"fedfraud-{bank}"))
        phases.summarize(self.ws, node.summary())
        return bank

    def open_federation(self) -> list[str]:
        from pipelines.feature_contract import feature_contract

        spec = self.spec
        plan = phases.plan_federation(self.ws, spec.model_name, spec.strategy, spec.rounds, spec.seed, spec.settings,
                                      feature_contract(load_config().features), sorted(spec.banks),
                                      run_id=spec.run_id)
        embedded_credentials(Path(spec.work_dir) / "pki", plan.banks)  # each bank signs its key offers
        nodes = {b: self.node(b) for b in plan.banks}
        plan = secure_planning.run(self.ws, plan, nodes)  # the banks' label counts, summed masked
        plan = crossval.run(self.ws, plan, nodes)  # may exclude banks, by name
        plan = secure_planning.run(self.ws, plan, nodes)  # the kept banks' sums (none excluded: as is)
        return plan.banks

    def open_round(self, round_id: int) -> list[str]:
        """Configure the round; the banks that train in their own task (none for cyclic and histogram)."""
        r = self._round(self._plan(), round_id)
        self.ws.clear_round(round_id)
        banks: list[str] = []
        if not r.trains_in_one_task():
            phases.run_aggregator_phases(r, after=None)
            banks = phases.bank_phase("train").banks(r)
        write_bytes(json.dumps({"run_id": self.spec.run_id}).encode(), self.ws.path(round_id, "opened"))
        return banks

    def train_bank(self, round_id: int, bank: str) -> str:
        return self._answer(round_id, "train", bank)

    def check_round(self, round_id: int) -> list[str]:
        """Check the updates, propose the candidate and (masked acceptance) exchange the session's keys with
        the nodes in this worker; the banks that score it (none when the round trains in one task: cyclic
        turns and histogram rounds run whole here, acceptance included)."""
        r = self._round(self._opened_round(round_id), round_id)
        if r.trains_in_one_task():
            phases.train_in_process(r, {b: self.node(b) for b in r.plan.banks})
            return []
        phases.run_aggregator_phases(r, after="train")
        phases.run_stage_span(r, {b: self.node(b) for b in r.plan.banks}, "accept_keys", "accept")
        return phases.bank_phase("accept").banks(r)

    def accept_bank(self, round_id: int, bank: str) -> str:
        return self._answer(round_id, "accept", bank)

    def aggregate_round(self, round_id: int) -> list[str]:
        """Gate, aggregate, publish the candidate, then the masked evaluation's key exchange (every bank's
        node is in this worker: each makes its own offer); the banks that evaluate. On a retry after the
        stage was aggregated (``working`` exists) only the phases after ``aggregate`` run again. The gate's
        second question (after a first-pass refusal) is answered here by the nodes, then the stage finishes."""
        r = self._round(self._opened_round(round_id), round_id)
        if not r.trains_in_one_task():
            stage_done = r.path("working").exists()
            for phase in phases.aggregator_phases_after("accept"):
                if phase.per_stage and stage_done:
                    continue
                try:
                    phase.run(r)
                except PhaseRerun as rerun:  # the gate's second question: the nodes are in this worker
                    phases.finish_stage(r, {b: self.node(b) for b in r.plan.banks}, rerun.phase)
                    stage_done = True
        phases.run_refit(r, {b: self.node(b) for b in r.plan.banks})  # nothing outside a refit round
        phases.run_aggregator_phases(r, after="refit")  # the masked evaluation's session
        keys = phases.bank_phase("keys")
        keys.run(r, {b: self.node(b) for b in keys.banks(r)})
        phases.run_aggregator_phases(r, after="keys")
        return phases.bank_phase("evaluate").banks(r)

    def evaluate_bank(self, round_id: int, bank: str) -> str:
        return self._answer(round_id, "evaluate", bank)

    def finish_round(self, round_id: int) -> str:
        """Register; a bank missing from the masked evaluation re-runs it here with the others' nodes."""
        r = self._round(self._opened_round(round_id), round_id)
        try:
            version, _, _ = phases.run_aggregator_phases(r, after="evaluate")
        except PhaseRerun as rerun:
            nodes = {b: self.node(b) for b in r.plan.banks}
            version, _, _ = phases.run_from(r, nodes, rerun.phase)
        return f"models:/{self.spec.model_name}/{version}"

    # ---- helpers ---------------------------------------------------------------------------

    def _answer(self, round_id: int, phase: str, bank: str) -> str:
        """One bank's part of a bank phase, on the round the aggregator opened."""
        r = RoundState(self.ws, self._plan(), round_id)
        phases.answer_at(r, phases.bank_phase(phase), self.node(bank))
        return bank

    def _round(self, plan: Plan, round_id: int) -> RoundState:
        return RoundState(self.ws, plan, round_id, self.spec.tracker())

    def _opened_by_this_run(self, marker: Path, what: str) -> dict[str, Any]:
        """The JSON at ``marker`` if this run wrote it; stale state from another run is refused."""
        content = self.ws.read_json(marker) if marker.exists() else {}
        if content.get("run_id") != self.spec.run_id:
            raise RoundFailed(f"{what} was not opened by this run (an earlier step failed)")
        return content

    def _plan(self) -> Plan:
        return Plan.from_dict(self._opened_by_this_run(self.ws.plan_path, "the federation"))

    def _opened_round(self, round_id: int) -> Plan:
        plan = self._plan()
        self._opened_by_this_run(self.ws.path(round_id, "opened"), f"round {round_id}")
        return plan
