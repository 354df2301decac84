"""What a phase works on: one round of one federation, and the shape of a phase."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.plan import Plan
from aggregator.protocol import model_refs, traffic
from aggregator.protocol.workspace import Workspace
from aggregator.strategies import STRATEGIES, Strategy
from fedfraud.protocol import TaskKind
from pipelines.io import write_bytes

if TYPE_CHECKING:
    from aggregator.tracking import FederationTracker

AGGREGATOR, BANK = "aggregator", "bank"
log = logging.getLogger("fedfraud.rounds")


class Node(Protocol):
    """What the aggregator may ask of a bank: an embedded ``BankNode``, or a ``RemoteNode`` in the
    service. Collective strategies also ask ``bin_counts``, ``train_histogram``, ``abort_histogram``."""

    bank: str

    def summary(self) -> dict[str, Any]: ...
    def train(self, task_bytes: bytes) -> bytes: ...
    def evaluate(self, model_bytes: bytes) -> bytes: ...
    def offer(self, request_bytes: bytes) -> bytes: ...
    def masked_counts(self, task_bytes: bytes) -> bytes: ...
    def evaluate_masked(self, task_bytes: bytes) -> bytes: ...
    def score(self, question_bytes: bytes) -> bytes: ...


def strategy_for(plan: Plan) -> Strategy:
    return STRATEGIES[plan.strategy](plan.settings, plan.seed, plan.consortium_params, header=plan.header,
                                     train_rows=plan.train_rows)


def carried_path(ws: Workspace) -> Path:
    """What the federation's strategy carries from round to round (``Strategy.carried``)."""
    return ws.root / "strategy.json"


def strategy_carried(ws: Workspace, plan: Plan) -> Strategy:
    """The plan's strategy with what an earlier round of this federation carried (none: as built)."""
    strategy = strategy_for(plan)
    path = carried_path(ws)
    if path.exists():
        record = ws.read_json(path)
        if record.get("federation_id") == plan.federation_id and record.get("strategy") == plan.strategy:
            strategy.carry(record.get("state") or {})
    return strategy


def store_carried(ws: Workspace, plan: Plan, strategy: Strategy) -> None:
    state = strategy.carried()
    if state:
        ws.write_json({"federation_id": plan.federation_id, "strategy": plan.strategy, "state": state},
                      carried_path(ws))


@dataclass
class RoundState:
    """One round: its workspace, plan and strategy; ``stage`` is the banks training now. ``banks``: the round's
    banks, the plan's unless a driver runs it with fewer (the service's next attempt of a failed round: the
    banks still healthy); the plan (bank indices, model limits) stays the federation's."""

    ws: Workspace
    plan: Plan
    round_id: int
    tracker: "FederationTracker | None" = None
    strategy: Strategy | None = None
    stage: list[str] | None = None
    on_progress: Callable[[str], None] = field(default=lambda message: None, repr=False)
    banks: list[str] | None = None

    def __post_init__(self) -> None:
        self.plan = Plan.from_dict(self.plan)
        unknown = sorted(set(self.banks or ()) - set(self.plan.banks))
        if unknown:
            raise RoundFailed(f"round {self.round_id}: {unknown} are not banks of the plan {self.plan.banks}")
        self.banks = [b for b in self.plan.banks if self.banks is None or b in self.banks]
        if not self.plan.consortium_params:
            raise RoundFailed(f"round {self.round_id}: plan_unsettled: the banks' label counts were never summed "
                              "(aggregator.protocol.secure_planning), so the plan has no consortium parameters")
        self.strategy = self.strategy or strategy_carried(self.ws, self.plan)
        self.stage = self.stage if self.stage is not None else self.stages()[0]

    def stages(self) -> list[list[str]]:
        return self.strategy.stages(self.round_id, self.banks)

    def trains_in_one_task(self) -> bool:
        """True when one call must drive the whole training: stages in turn, or collective training."""
        return self.strategy.trains_in_one_task(self.round_id, self.banks)

    def path(self, kind: str, bank: str | None = None) -> Path:
        return self.ws.path(self.round_id, kind, bank)


@dataclass(frozen=True)
class Exchange:
    """One question to one bank: a task ``kind``, where its input lies, where its answer goes."""

    kind: str
    bank: str
    question: Path
    answer: Path
    part: str = ""  # tells apart a re-run's task from an earlier attempt's (same kind, bank and round)


@dataclass(frozen=True)
class Phase:
    """One step of a round. An aggregator phase is ``run(state)``; a bank phase is ``run(state, nodes)``
    in process, and ``exchanges(state, bank)`` says what a driver asks each bank of ``banks(state)``."""

    name: str
    side: str
    run: Callable[..., Any]
    per_stage: bool = False  # repeated for every stage of a round (cyclic turns)
    banks: Callable[[RoundState], list[str]] | None = None
    exchanges: Callable[[RoundState, str], list[Exchange]] | None = None
    state: str | None = None  # a bank phase: the round's state while banks answer


def node_call(node: Node, kind: str) -> Callable[[bytes], bytes]:
    """The node method that answers a task ``kind`` (a driver's bank task, or in process)."""
    calls = {TaskKind.TRAIN: "train", TaskKind.EVALUATE: "evaluate_masked", TaskKind.EVALUATE_CHAMPION:
             "evaluate_masked", TaskKind.ACCEPT: "score", TaskKind.KEYS: "offer", TaskKind.COUNTS: "masked_counts",
             TaskKind.REFIT: "refit_sums",
             TaskKind.LOCAL_MODEL: "local_model", TaskKind.CROSSVAL: "score"}
    return getattr(node, calls[kind])


def asking(nodes: dict[str, Node], phase: str, phase_log: logging.Logger) -> Callable[[list[Exchange]], None]:
    """A round-0 phase's ``ask`` with the nodes at hand (embedded drivers): each bank answers in turn; one that
    refuses or fails is logged here and named by the phase, which finds no answer."""
    def ask(exchanges: list[Exchange]) -> None:
        for x in exchanges:
            try:
                write_bytes(node_call(nodes[x.bank], x.kind)(x.question.read_bytes()), x.answer)
            except Exception as exc:
                phase_log.warning("%s: %s did not answer %s: %s", phase, x.bank, x.kind, exc)
    return ask


def answer(node: Node, exchanges: list[Exchange], r: RoundState | None = None) -> None:
    """The bank answers each question (a cyclic round's models by reference: ``model_refs``); its answers
    land where the exchanges say."""
    for ask in exchanges:
        question = ask.question.read_bytes()
        reply, received = model_refs.ask(r, ask.kind, ask.bank, question, node_call(node, ask.kind))
        if traffic.in_process(node):  # the in-process boundary
            traffic.record(ask.answer, ask.bank, received=received, sent=len(reply))
        write_bytes(reply, ask.answer)


def answer_tolerantly(r: RoundState, nodes: dict[str, Node], phase_banks: Callable[[RoundState], list[str]],
                      exchanges: Callable[[RoundState, str], list[Exchange]], what: str) -> None:
    """Every bank of a bank phase answers in process; one that cannot is logged and left out."""
    for bank in phase_banks(r):
        try:
            answer(nodes[bank], exchanges(r, bank), r)
        except Exception as exc:
            log.warning("bank %s could not %s in round %s: %s", bank, what, r.round_id, exc)
