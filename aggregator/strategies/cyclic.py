"""Cyclic: banks add trees in turn; each starts from the model the previous bank left.

Each bank's trees are scaled by 1/B (B banks in the round), so a whole round moves the model as
far as one bank's K trees would — the same step as a bagging round — instead of B times that,
which overfits to whichever banks come last. The order rotates by round so no bank always has
the last word.
"""

from __future__ import annotations

from typing import Sequence

from aggregator.strategies.base import Strategy
from fedfraud import model_json
from fedfraud.model_json import Doc
from fedfraud.protocol import StrategyName
from fedfraud.wire import ModelUpdate


class Cyclic(Strategy):
    name = StrategyName.CYCLIC

    def stages(self, round_id: int, banks: list[str]) -> list[list[str]]:
        ordered = sorted(banks)
        shift = (round_id - 1) % len(ordered) if ordered else 0
        return [[bank] for bank in ordered[shift:] + ordered[:shift]]

    def aggregate(self, global_model: Doc | None, updates: list[ModelUpdate], round_banks: Sequence[str] = ()) -> Doc:
        merged = self.start_from(global_model, updates)
        if not round_banks:
            raise ValueError("cyclic aggregation needs the round's banks (each turn is scaled by 1/B)")
        turns = len(round_banks)  # banks taking a turn this round
        scaled = [model_json.scale_leaves(u.model, 1.0 / turns) for u in sorted(updates, key=lambda u: u.bank)]
        return model_json.append_trees(merged, *scaled)
