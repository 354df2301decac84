"""The bank's ε ledger: what its private tasks have cost, kept in its work folder, and the accountant.

    <work_dir>/privacy/ledger.json   every charged task: its key, round, trees (releases) and noise multiplier
    <work_dir>/privacy/noise.key     32 secret random bytes that seed the bank's noise (never leaves)

Each tree of a bagging or cyclic task is one Gaussian mechanism of noise multiplier sigma
(``bank_node.privacy``); a histogram tree is ``max_depth + 1`` of them (``releases``,
``bank_node.histogram_privacy``).
``epsilon_spent`` composes them all with ``dp-accounting``'s privacy loss distributions (PLD,
pessimistic estimate: an upper bound) and reads ε at the policy's δ. ``charge`` runs BEFORE a task
trains: a task whose ε would pass the budget is refused (``TaskRefused("privacy_budget_exceeded")``)
and nothing is written; else the entry is written atomically first, so a crash after it can only
over-count. A task already charged (same task bytes, same training rows: the same noise, the same
update) is not charged again.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from dp_accounting.privacy_loss_distribution import PrivacyLossDistribution

from bank_node.policy import TaskRefused
from bank_node.privacy import MIN_NOISE_MULTIPLIER
from pipelines.io import write_bytes

DISCRETIZATION = 1e-3  # PLD grid of privacy-loss values; pessimistic rounding keeps ε an upper bound


def epsilon_spent(mechanisms: dict[float, int], delta: float) -> float:
    """ε at ``delta`` of ``count`` Gaussian mechanisms (sensitivity 1, std sigma) per sigma, composed."""
    composed = None
    for sigma, count in sorted(mechanisms.items()):
        if count <= 0:
            continue
        pld = PrivacyLossDistribution.from_gaussian_mechanism(
            float(sigma), sensitivity=1.0, value_discretization_interval=DISCRETIZATION).self_compose(int(count))
        composed = pld if composed is None else composed.compose(pld)
    return 0.0 if composed is None else max(0.0, float(composed.get_epsilon_for_delta(delta)))


def noise_for_budget(epsilon: float, delta: float, mechanisms: int, tolerance: float = 1e-3) -> float:
    """The least noise multiplier (at least ``MIN_NOISE_MULTIPLIER``) whose ``mechanisms`` compositions
    stay within ``epsilon`` at ``delta``."""
    low, high = MIN_NOISE_MULTIPLIER, max(1.0, MIN_NOISE_MULTIPLIER)
    if epsilon_spent({low: mechanisms}, delta) <= epsilon:
        return low
    while epsilon_spent({high: mechanisms}, delta) > epsilon:
        low, high = high, high * 2
        if high > 1e5:
            raise ValueError(f"no noise multiplier reaches ε {epsilon} for {mechanisms} mechanisms")
    while high - low > tolerance * high:
        middle = (low + high) / 2
        low, high = (middle, high) if epsilon_spent({middle: mechanisms}, delta) > epsilon else (low, middle)
    return high


class PrivacyLedger:
    """One bank's ε ledger (persists across restarts of its node or agent)."""

    def __init__(self, folder: str | Path, budget: float, delta: float):
        self.folder = Path(folder)
        self.budget, self.delta = float(budget), float(delta)

    @property
    def path(self) -> Path:
        return self.folder / "ledger.json"

    def entries(self) -> list[dict]:
        return json.loads(self.path.read_bytes())["entries"] if self.path.exists() else []

    def spent(self, extra: list[dict] = ()) -> float:
        """ε of every charged task (plus ``extra`` entries not written yet)."""
        mechanisms: Counter = Counter()
        for entry in [*self.entries(), *extra]:
            mechanisms[float(entry["noise_multiplier"])] += int(entry.get("releases", entry["trees"]))
        return epsilon_spent(dict(mechanisms), self.delta)

    def charge(self, key: str, round_id: int, trees: int, noise_multiplier: float, releases_per_tree: int = 1) -> float:
        """Charge a task (before it trains) and return ε spent with it; refuse it by name over budget.
        ``releases_per_tree``: Gaussian mechanisms per tree (a histogram tree: its levels and root sums)."""
        entries = self.entries()
        if any(entry["key"] == key for entry in entries):
            return self.spent()
        entry = {"key": key, "round_id": int(round_id), "trees": int(trees), "noise_multiplier": noise_multiplier}
        releases = f" ({trees * releases_per_tree} Gaussian releases)" if releases_per_tree != 1 else ""
        if releases:
            entry["releases"] = int(trees) * int(releases_per_tree)
        before, after = self.spent(), self.spent([entry])
        if after > self.budget:
            raise TaskRefused("privacy_budget_exceeded",
                              f"ε spent {before:.4g}; this task's {trees} trees{releases} would make it {after:.4g} "
                              f"> budget {self.budget:g} (δ {self.delta:g})")
        write_bytes(json.dumps({"delta": self.delta, "entries": [*entries, entry]}, indent=1).encode(), self.path)
        return after

    def noise_key(self) -> bytes:
        """The bank's secret noise key, made on first use."""
        path = self.folder / "noise.key"
        if not path.exists():
            write_bytes(os.urandom(32), path)
        return path.read_bytes()
