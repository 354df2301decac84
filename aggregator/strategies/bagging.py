"""Bagging: every bank grows trees on the same global model; all of them are appended.

Each bank's trees are scaled by its weight — its share of the consortium's training rows, or
1/B (uniform) — so a round moves the model by a weighted average of the banks' steps.
"""

from __future__ import annotations

from typing import Sequence

from aggregator.strategies.base import Strategy
from fedfraud import model_json
from fedfraud.model_json import Doc
from fedfraud.protocol import StrategyName
from fedfraud.wire import ModelUpdate


class Bagging(Strategy):
    name = StrategyName.BAGGING

    def weights(self, updates: list[ModelUpdate]) -> list[float]:
        if self.settings.weighting == "uniform":
            return [1.0 / len(updates)] * len(updates)
        rows = [u.counts["train_rows"] for u in updates]
        return [r / sum(rows) for r in rows]

    def aggregate(self, global_model: Doc | None, updates: list[ModelUpdate], round_banks: Sequence[str] = ()) -> Doc:
        ordered = sorted(updates, key=lambda u: u.bank)  # same model whatever the arrival order
        scaled = [model_json.scale_leaves(u.model, w) for u, w in zip(ordered, self.weights(ordered))]
        return model_json.append_trees(self.start_from(global_model, ordered), *scaled)
