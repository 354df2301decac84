"""The histogram strategy's session message, shared by the aggregator (who writes it) and each
bank (who joins the collective round with it), and the loopback rule for plain gRPC."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedfraud.wire import WireMessage

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


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


def loopback(address: str) -> bool:
    """True when ``host:port`` stays on this machine (the only place plain gRPC is allowed)."""
    return address.rsplit(":", 1)[0] in LOOPBACK_HOSTS
