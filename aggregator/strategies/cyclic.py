"""Cyclic: banks add trees in turn; each starts from the model the previous bank left.

The order rotates by round so no bank always has the last word.
"""

from __future__ import annotations

from aggregator.strategies.base import Strategy
from fedfraud import model_json
from fedfraud.model_json import Doc
from fedfraud.wire import ModelUpdate


class Cyclic(Strategy):
    name = "cyclic"

    def stages(self, round_id: int, banks: list[str]) -> list[list[str]]:
        ordered = sorted(banks)
        shift = (round_id - 1) % len(ordered) if ordered else 0
        return [[bank] for bank in ordered[shift:] + ordered[:shift]]

    def aggregate(self, global_model: Doc | None, updates: list[ModelUpdate]) -> Doc:
        merged = self.start_from(global_model, updates)
        return model_json.append_trees(merged, *[u.model for u in sorted(updates, key=lambda u: u.bank)])
