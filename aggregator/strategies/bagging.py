"""Bagging: every bank grows trees on the same global model; all of them are appended.

Each bank's trees are scaled by its weight — its share of the consortium's training rows as the
aggregator recorded them at planning (never an update's own claim), capped at
``settings.max_bank_share``, or 1/B (uniform) — so a round moves the model by a weighted
average of the banks' steps.
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
        if self.settings.weighting == "uniform" or not self.train_rows:
            return [1.0 / len(updates)] * len(updates)
        return capped_shares([self.train_rows.get(u.bank, 0) for u in updates], self.settings.max_bank_share)

    def aggregate(self, global_model: Doc | None, updates: list[ModelUpdate], round_banks: Sequence[str] = ()) -> Doc:
        ordered = sorted(updates, key=lambda u: u.bank)  # same model whatever the arrival order
        scaled = [model_json.scale_leaves(u.model, w) for u, w in zip(ordered, self.weights(ordered))]
        return model_json.append_trees(self.start_from(global_model, ordered), *scaled)


def capped_shares(rows: list[int], cap: float) -> list[float]:
    """Shares proportional to ``rows``, none above ``cap`` (the excess goes to the others in
    proportion); uniform when the rows are all zero; ``cap`` below 1/n acts as 1/n."""
    n = len(rows)
    if n == 0:
        return []
    if sum(rows) <= 0:
        return [1.0 / n] * n
    cap = max(cap, 1.0 / n)
    capped: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in capped]
        left, total = 1.0 - cap * len(capped), sum(rows[i] for i in free)
        shares = [cap if i in capped else (left * rows[i] / total if total else left / len(free)) for i in range(n)]
        over = {i for i in free if shares[i] > cap + 1e-12}
        if not over:
            return shares
        capped |= over
