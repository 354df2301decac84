"""Cyclic: banks add trees in turn; each starts from the model the previous bank left.

Each bank's trees are scaled by 1/B (B banks in the round), so a whole round moves the model as
far as one bank's K trees would — the same step as a bagging round — instead of B times that,
which overfits to whichever banks come last. The order rotates by round so no bank always has
the last word.
"""

from __future__ import annotations

from aggregator.strategies.base import Strategy
from fedfraud import model_json
from fedfraud.model_json import Doc
from fedfraud.wire import ModelUpdate


class Cyclic(Strategy):
    name = "cyclic"
    turns = 1  # banks taking a turn in the current round (set by ``stages``)

    def stages(self, round_id: int, banks: list[str]) -> list[list[str]]:
        ordered = sorted(banks)
        self.turns = max(1, len(ordered))
        shift = (round_id - 1) % len(ordered) if ordered else 0
        return [[bank] for bank in ordered[shift:] + ordered[:shift]]

    def aggregate(self, global_model: Doc | None, updates: list[ModelUpdate]) -> Doc:
        merged = self.start_from(global_model, updates)
        scaled = [model_json.scale_leaves(u.model, 1.0 / self.turns) for u in sorted(updates, key=lambda u: u.bank)]
        return model_json.append_trees(merged, *scaled)
