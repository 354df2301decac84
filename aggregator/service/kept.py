"""Collective strategies the service keeps for a federation's rounds.

A collective strategy that can keep its world (histogram: the federated server, per bank a worker and
a masking sidecar, and the shared bins) is built once per federation and reused by every round, so a
round does not start a server and one process per bank again, nor count the grid again. The world is
ended when the federation's last round is registered, when one of its rounds fails, and when the
service stops; a restarted service, and the next attempt of a failed round (with its healthy banks), start a new
world.
"""

from __future__ import annotations

import threading
from typing import Any

from aggregator.protocol.plan import Plan
from aggregator.protocol.state import strategy_carried, strategy_for
from aggregator.protocol.workspace import Workspace
from aggregator.strategies.base import Strategy


class KeptStrategies:
    """federation key -> its collective strategy, kept across rounds; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[str, Strategy] = {}

    def for_federation(self, key: str, plan: dict[str, Any], ws: Workspace | None = None) -> Strategy | None:
        """The federation's kept strategy (built on first use, with what its rounds carried in ``ws``: a new
        world after a failed round or a restart bins as the earlier rounds did); None when it keeps nothing."""
        with self._lock:
            strategy = self._kept.get(key)
            if strategy is None:
                strategy = strategy_carried(ws, Plan.from_dict(plan)) if ws else strategy_for(Plan.from_dict(plan))
                if not hasattr(strategy, "keep_world"):
                    return None
                strategy.keep_world = True
                self._kept[key] = strategy
            return strategy

    def release(self, key: str) -> None:
        """End the federation's kept world (the server stops; the banks' kept workers exit); idempotent."""
        with self._lock:
            strategy = self._kept.pop(key, None)
        if strategy is not None:
            strategy.keep_world = False
            strategy.close()

    def release_all(self) -> None:
        with self._lock:
            keys = list(self._kept)
        for key in keys:
            self.release(key)
