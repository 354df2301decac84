"""The histogram strategy's session message, shared by the aggregator (who writes it) and each
bank (who joins the collective round with it), and the loopback rule for plain gRPC.

``secagg`` (on unless the aggregator says otherwise, and a bank may refuse "otherwise"): the
bank's worker joins through its masking sidecar (``bank_node.secagg_sidecar``), which agrees
pairwise keys for ``secagg_session`` with the other ``banks`` (the world, by rank).

``world_id`` (empty: a one-round world, the processes exit after it): the aggregator keeps one federated
server for several rounds of the same banks, and each bank keeps its worker (and sidecar) for that world.
``world_round`` counts the world's earlier rounds: XGBoost's server numbers every collective call of a
world, so a bank whose worker has not trained exactly that many rounds of it must refuse at once
(``histogram_worker_lost``) instead of hanging; a fresh world (round 0) starts fresh processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedfraud.wire import WireMessage

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WORLD_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


@dataclass(frozen=True)
class HistogramSession(WireMessage):
    """How one bank joins one collective round: where the server is, its rank, the shared bins."""

    KIND: ClassVar[str] = "histogram session"

    bank: str
    round_id: int
    server_address: str
    world_size: int
    rank: int
    bins: dict[str, Any] = field(repr=False)
    tls: bool = False  # the server demands client certificates (the bank brings its own)
    timeout_s: float = 1800.0
    nthread: int = 1
    secagg: bool = True  # every SUM masked by the bank's sidecar
    banks: list[str] = field(default_factory=list)  # the world by rank (secagg: whom keys are agreed with)
    secagg_session: str = ""  # names (federation, round, attempt); fresh for every attempt
    world_id: str = ""  # a server kept for several rounds ("": this round only)
    world_round: int = 0  # the world's rounds before this one

    def world_problem(self) -> str | None:
        """Why the session's world is inconsistent (None when it is fine)."""
        if not 0 <= self.rank < self.world_size:
            return f"rank {self.rank} outside a world of {self.world_size}"
        if self.world_id and not WORLD_ID.match(self.world_id):
            return f"world id {self.world_id[:40]!r} is not a world name"
        if type(self.world_round) is not int or not 0 <= self.world_round < 1_000_000 or (
                self.world_round and not self.world_id):
            return f"world round {self.world_round!r} is not a round of a kept world"
        if self.secagg:
            if len(self.banks) != self.world_size or len(set(self.banks)) != len(self.banks):
                return f"banks {self.banks} are not a world of {self.world_size} distinct banks"
            if self.banks[self.rank] != self.bank:
                return f"rank {self.rank} is {self.banks[self.rank]}, not {self.bank}"
            if not self.secagg_session:
                return "no secure-aggregation session named"
        return None


def loopback(address: str) -> bool:
    """True when ``host:port`` stays on this machine (the only place plain gRPC is allowed)."""
    return address.rsplit(":", 1)[0] in LOOPBACK_HOSTS
