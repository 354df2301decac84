"""The strategy interface: plan a round's stages, configure each bank's task, aggregate replies.

A round is a list of stages; the banks of one stage train in parallel on the same global
model and their accepted updates are aggregated before the next stage starts. Bagging is one
stage of every bank; cyclic is one stage per bank. A strategy in which banks build each tree
together (histogram federation) is a single stage whose training is collective.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence

from fedfraud.settings import FederationSettings, derive_seed
from fedfraud import model_json
from fedfraud.model_guard import ConsortiumHeader
from fedfraud.model_json import Doc
from fedfraud.wire import ModelUpdate, TrainTask


class Strategy(ABC):
    name: ClassVar[str]
    collective: ClassVar[bool] = False  # banks build every tree together (``train_collective``)

    def __init__(self, settings: FederationSettings, seed: int, consortium_params: dict[str, Any],
                 header: ConsortiumHeader | None = None, train_rows: dict[str, int] | None = None):
        self.settings = settings
        self.seed = seed
        self.consortium_params = consortium_params
        self.header = header  # the consortium's header (the plan's); the empty model is built from it
        self.train_rows = dict(train_rows or {})  # per bank, as recorded at planning (never an update's)

    def stages(self, round_id: int, banks: list[str]) -> list[list[str]]:
        """Groups of banks that train one after another within a round (default: all at once)."""
        return [list(banks)]

    def trains_in_one_task(self, round_id: int, banks: list[str]) -> bool:
        """True when one call must drive the round's training: several stages in turn, or collective."""
        return self.collective or len(self.stages(round_id, banks)) > 1

    def configure(self, round_id: int, bank: str, bank_index: int, global_model: Doc | None,
                  contract_hash: str) -> TrainTask:
        """The task for one bank: trees on top of ``global_model``, a seed of its own."""
        params = {**self.consortium_params, "seed": derive_seed(self.seed, round_id, bank_index)}
        return TrainTask(
            bank=bank,
            round_id=round_id,
            base_model_id=model_json.model_id(global_model),
            contract_hash=contract_hash,
            num_trees=self.settings.trees_per_round,
            params=params,
            base_model=global_model,
        )

    @abstractmethod
    def aggregate(self, global_model: Doc | None, updates: list[ModelUpdate], round_banks: Sequence[str] = ()) -> Doc:
        """The next global model from the current one and this stage's accepted updates
        (``round_banks``: every bank of the round)."""

    def train_collective(self, nodes: dict[str, Any], tasks: dict[str, TrainTask], round_id: int,
                         on_progress: Callable[[str], None]) -> tuple[dict[str, bytes], list[Any]]:
        """A collective strategy's stage: (update bytes per bank, rejections of banks left out)."""
        raise NotImplementedError(f"{self.name} does not train collectively")

    def carried(self) -> dict[str, Any]:
        """What later rounds of the federation reuse (histogram: the shared bins); a driver that builds a
        strategy per round (Airflow tasks, a restarted service) stores it and hands it to ``carry``."""
        return {}

    def carry(self, state: dict[str, Any]) -> None:
        """Take back what an earlier round's strategy ``carried`` (the aggregator's own workspace)."""
        return None

    def start_from(self, global_model: Doc | None, updates: list[ModelUpdate]) -> Doc:
        """The model to append to: the global one, or the consortium header's empty model (never
        built from a bank's update; without a header, e.g. a bench's strategy, the first update's)."""
        if global_model is not None:
            return global_model
        return self.header.document([]) if self.header is not None else model_json.empty_like(updates[0].model)
