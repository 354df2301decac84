"""Bytes a bank's masking sidecar exchanged with the aggregator's federated server, per key session.

The sidecar (``bank_node.secagg_sidecar``) counts every call it forwards upstream: the key agreement,
the masked sums, the MAX/bitwise Allreduces and Broadcasts it passes in the clear. ``sent`` is the
request payload, ``received`` the reply's (gRPC messages; HTTP/2 and TLS framing not counted), as in
the bank's ``egress`` record. The count restarts when a session starts (its re-key), and its file is
rewritten (atomically) after every call, before the worker gets its reply: once a round's update
exists, its session's count is complete. The node adds it to the update it returns
(``ModelUpdate.collective_bytes``), and the aggregator records it as the bank's own report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

WIRE_FILE = "wire.json"  # in the bank's histogram work folder


class WireCount:
    """The sidecar's running count for its current session, kept in ``path`` (None: counted, not kept)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.session, self.sent, self.received = "", 0, 0
        self._lock = threading.Lock()

    def start(self, session_id: str) -> None:
        """A new session (before its key agreement): its calls count from zero."""
        with self._lock:
            self.session, self.sent, self.received = session_id, 0, 0
            self._keep()

    def add(self, sent: int, received: int) -> None:
        with self._lock:
            self.sent += sent
            self.received += received
            self._keep()

    def _keep(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"session": self.session, "sent": self.sent, "received": self.received}))
        os.replace(tmp, self.path)


def session_count(path: Path, session_id: str) -> dict[str, int] | None:
    """{"sent", "received"} the sidecar counted for ``session_id``; None when its file is of no such session."""
    try:
        kept = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("session") != session_id or not session_id:
        return None
    return {"sent": int(kept["sent"]), "received": int(kept["received"])}


def with_collective_bytes(update_bytes: bytes, counted: dict[str, int] | None) -> bytes:
    """The worker's update with the session's count added (unchanged when there is none: an unmasked round)."""
    if counted is None:
        return update_bytes
    from fedfraud.wire import ModelUpdate

    update = ModelUpdate.from_bytes(update_bytes, max_bytes=len(update_bytes))
    return dataclasses.replace(update, collective_bytes=counted).to_bytes()
