"""The phases of a federation, declared once and in order.

A federation: every bank reports a summary, then the aggregator plans (``summarize``,
``plan_federation``). Then each round runs ``ROUND`` top to bottom. A new phase is one function
and one line below; drivers walk this declaration:

* in process (``aggregator.drivers.embedded``, and every driver for cyclic/histogram
  training): ``run_round`` / ``train_in_process`` call each phase with the nodes at hand;
* Airflow (``aggregator.drivers.airflow_*``) and the service (``aggregator.service``) hand a
  bank phase to each bank (its ``exchanges``) and run the aggregator phases between them with
  ``aggregator_phases_after``.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from aggregator.protocol import acceptance, registry, training
from aggregator.protocol import compaction, refit, secure_acceptance
from aggregator.protocol import secure_evaluation as secure
from aggregator.protocol.errors import PhaseRerun
from aggregator.protocol.plan import Plan, make_plan
from aggregator.protocol.state import AGGREGATOR, BANK, Node, Phase, RoundState, answer
from aggregator.protocol.workspace import Workspace
from fedfraud.settings import FederationSettings

log = logging.getLogger("fedfraud.rounds")
ROUND: tuple[Phase, ...] = (
    Phase("configure", AGGREGATOR, training.configure, per_stage=True),
    Phase("train", BANK, training.train, per_stage=True, banks=training.train_banks,
          exchanges=training.train_exchanges, state="training"),
    Phase("check", AGGREGATOR, training.check, per_stage=True),
    Phase("propose", AGGREGATOR, acceptance.propose, per_stage=True),
    Phase("propose_compaction", AGGREGATOR, compaction.propose, per_stage=True),
    Phase("accept_keys", BANK, secure_acceptance.keys, per_stage=True, banks=secure_acceptance.keys_banks,
          exchanges=secure_acceptance.keys_exchanges, state="acceptance_keys"),
    Phase("relay_accept", AGGREGATOR, secure_acceptance.relay, per_stage=True),
    Phase("accept", BANK, acceptance.accept, per_stage=True, banks=acceptance.accept_banks,
          exchanges=acceptance.accept_exchanges, state="accepting"),
    Phase("gate", AGGREGATOR, acceptance.gate, per_stage=True),
    Phase("aggregate", AGGREGATOR, training.aggregate, per_stage=True),
    Phase("compact", AGGREGATOR, compaction.compact),
    Phase("candidate", AGGREGATOR, training.publish_candidate),
    Phase("refit_session", AGGREGATOR, refit.open_session),
    Phase("refit_keys", BANK, refit.keys, banks=refit.keys_banks, exchanges=refit.keys_exchanges,
          state="refit_keys"),
    Phase("refit_relay", AGGREGATOR, refit.relay),
    Phase("refit", BANK, refit.refit, banks=refit.refit_banks, exchanges=refit.refit_exchanges, state="refitting"),
    Phase("refit_step", AGGREGATOR, refit.step),
    Phase("session", AGGREGATOR, secure.open_session),
    Phase("keys", BANK, secure.keys, banks=secure.keys_banks, exchanges=secure.keys_exchanges, state="exchanging_keys"),
    Phase("relay", AGGREGATOR, secure.relay),
    Phase("evaluate", BANK, secure.evaluate, banks=secure.evaluate_banks,
          exchanges=secure.evaluation_exchanges, state="evaluating"),
    Phase("register", AGGREGATOR, registry.register_and_promote),
)
BANK_PHASES: tuple[Phase, ...] = tuple(p for p in ROUND if p.side == BANK)
STAGE_PHASES: tuple[Phase, ...] = tuple(p for p in ROUND if p.per_stage)
assert ROUND[:len(STAGE_PHASES)] == STAGE_PHASES, "per-stage phases open the round"


# ---- the federation's opening phases -----------------------------------------------------------


def summarize(ws: Workspace, summary: dict[str, Any]) -> None:
    """A bank reports it is prepared: counts, contract hash, data window, readiness."""
    ws.write_json(summary, ws.summary_path(summary["bank"]))


def plan_federation(ws: Workspace, model_name: str, strategy: str, rounds: int, seed: int,
                    settings: FederationSettings, contract: dict[str, Any], banks: list[str],
                    run_id: str | None = None) -> Plan:
    """Plan from the summaries of the banks that prepared; check the quorum."""
    ws.plan_path.unlink(missing_ok=True)
    shutil.rmtree(ws.root / "planning", ignore_errors=True)  # a new plan sums its banks' label counts afresh
    summaries = {b: ws.read_json(ws.summary_path(b)) for b in banks if ws.summary_path(b).exists()}
    missing = sorted(set(banks) - set(summaries))
    plan = make_plan(summaries, missing, model_name, strategy, rounds, seed, settings, contract, run_id)
    ws.write_json(plan.to_dict(), ws.plan_path)
    return plan


# ---- walking the declaration -------------------------------------------------------------------


def bank_phase(name: str) -> Phase:
    return next(p for p in BANK_PHASES if p.name == name)


def aggregator_phases_after(bank_phase_name: str | None) -> list[Phase]:
    """The aggregator phases after the named bank phase (None: from the start), up to the next bank phase."""
    start = 0 if bank_phase_name is None else ROUND.index(bank_phase(bank_phase_name)) + 1
    found = []
    for phase in ROUND[start:]:
        if phase.side == BANK:
            break
        found.append(phase)
    return found


def run_aggregator_phases(r: RoundState, after: str | None) -> Any:
    """Run ``aggregator_phases_after(after)``; returns the last phase's result."""
    result = None
    for phase in aggregator_phases_after(after):
        result = phase.run(r)
    return result


def answer_at(r: RoundState, phase: Phase, node: Node) -> None:
    """One bank answers every question a bank phase asks it (a driver's mapped bank task)."""
    answer(node, phase.exchanges(r, node.bank), r)


def run_phase(r: RoundState, phase: Phase, nodes: dict[str, Node]) -> Any:
    return phase.run(r, nodes) if phase.side == BANK else phase.run(r)


def run_stages(r: RoundState, nodes: dict[str, Node]) -> None:
    """The per-stage phases for every stage of the round (cyclic turns, collective training)."""
    for stage in r.stages():
        r.stage = stage
        _run_with_reruns(r, nodes, STAGE_PHASES, 0)


def run_stage_span(r: RoundState, nodes: dict[str, Node], first: str, stop: str) -> None:
    """The current stage's phases from ``first`` up to ``stop`` (excluded), in process."""
    names = [p.name for p in STAGE_PHASES]
    for phase in STAGE_PHASES[names.index(first):names.index(stop)]:
        run_phase(r, phase, nodes)


def finish_stage(r: RoundState, nodes: dict[str, Node], name: str) -> None:
    """The current stage's phases from ``name`` on, in process (a driver resuming a re-run bank phase)."""
    _run_with_reruns(r, nodes, STAGE_PHASES, STAGE_PHASES.index(bank_phase(name)))


def train_in_process(r: RoundState, nodes: dict[str, Node]) -> Any:
    """Every stage with these nodes, then the aggregator phases up to the next bank phase;
    returns the last one's result (``candidate``: the round's outcome)."""
    run_stages(r, nodes)
    result = None
    for phase in ROUND[len(STAGE_PHASES):]:
        if phase.side == BANK:
            break
        result = phase.run(r)
    return result


def run_refit(r: RoundState, nodes: dict[str, Node]) -> None:
    """The leaf refit's phases after ``refit_session`` (keys, relay, its steps), in process (a driver whose
    every bank node is at hand: Airflow's embedded aggregate task)."""
    names = [p.name for p in ROUND]
    _run_with_reruns(r, nodes, ROUND[names.index("refit_keys"):names.index("session")], 0)


def run_round(r: RoundState, nodes: dict[str, Node]) -> Any:
    """A whole round in process; returns what its last phase returns (``register``: version, evaluation, history)."""
    run_stages(r, nodes)
    return run_from(r, nodes, ROUND[len(STAGE_PHASES)].name)


def run_from(r: RoundState, nodes: dict[str, Node], name: str) -> Any:
    """The round's phases from ``name`` to the end in process; a ``PhaseRerun`` goes back to its bank phase
    (the phase that raises it bounds its attempts)."""
    return _run_with_reruns(r, nodes, ROUND, next(i for i, p in enumerate(ROUND) if p.name == name))


def _run_with_reruns(r: RoundState, nodes: dict[str, Node], sequence: tuple[Phase, ...], start: int) -> Any:
    """``sequence[start:]`` in process; a ``PhaseRerun`` goes back to its bank phase (the phase that raises
    it bounds its re-runs). Returns the last phase's result."""
    while True:
        try:
            result = None
            for phase in sequence[start:]:
                result = run_phase(r, phase, nodes)
            return result
        except PhaseRerun as rerun:
            log.warning("round %s: %s", r.round_id, rerun)
            start = sequence.index(bank_phase(rerun.phase))
