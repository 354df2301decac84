"""Bytes on the wire: per round, per bank and per direction, counted where a payload crosses.

Every bank exchange of a round is a question the bank receives and an answer it sends. They are
counted at the boundary, with the same accounting in every driver: in process where ``answer``
hands a question to a node and takes its answer (and ``train`` its task and update, a histogram
round's task and session too), in the service where a bank fetches a task's input and uploads its
result (a ``RemoteNode`` called in process is such a task, counted there once). One record per
exchange, ``round-N/traffic/<exchange>.json`` (an exchange fetched twice counts twice), summed by
``totals``. Counted: payload bytes (JSON messages); not counted: HTTP/TLS framing, summaries and the
cross-evaluation before round 1.

A histogram round's collectives (key agreement, masked sums, the MAX and Broadcast calls in the
clear) travel over gRPC between each bank's masking sidecar and the federated server, where no
exchange of ours sees them. Each bank's sidecar counts them (gRPC message payloads, request bytes
sent and reply bytes received, from the session's key agreement on), and the bank reports the
count in its update (``ModelUpdate.collective_bytes``): **bank-reported**, not measured here. The
update's parser bounds it (two integers in [0, 2**40] per direction, else the update is refused as
``collective_bytes_malformed``), and ``check`` records an accepted update's count as its own
exchange, ``collectives__<bank>``. A round run unmasked (no sidecar) reports none.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from pipelines.io import write_bytes

FOLDER = "traffic"
COLLECTIVES = "collectives"  # the exchange a bank's reported collective bytes are recorded as
ROUND_DIR = re.compile(r"round-\d+")
_lock = threading.Lock()


def _round_dir(answer: Path) -> Path | None:
    """The nearest ``round-<N>`` folder holding ``answer`` (None: not a round's exchange)."""
    return next((p for p in Path(answer).parents if ROUND_DIR.fullmatch(p.name)), None)


def record(answer: Path, bank: str, received: int = 0, sent: int = 0, add: bool = True) -> None:
    """Add ``received`` (question) and ``sent`` (answer) bytes to the exchange whose answer goes to ``answer``;
    ``add=False``: set them (a count the bank reported, recorded once however often it is read)."""
    folder = _round_dir(answer)
    if folder is None:
        return
    key = "__".join(Path(answer).relative_to(folder).with_suffix("").parts)
    path = folder / FOLDER / f"{key}.json"
    with _lock:
        counted = {"bank": bank, "received": 0, "sent": 0}
        if add and path.exists():
            counted = json.loads(path.read_bytes())
        counted["received"] += int(received)
        counted["sent"] += int(sent)
        write_bytes(json.dumps(counted, sort_keys=True).encode(), path)


def reported_collectives(collectives: Path, bank: str, counted: dict[str, int] | None) -> None:
    """A bank's own count of its histogram round's collectives (already bounded by the update's parser)."""
    if counted is not None:
        record(collectives, bank, received=counted["received"], sent=counted["sent"], add=False)


def in_process(node: object) -> bool:
    """False for a node whose exchanges are counted at the service's task boundary (``RemoteNode``)."""
    return not getattr(node, "COUNTED_AS_TASKS", False)


def totals(round_dir: Path) -> dict[str, dict[str, int]]:
    """{bank: {"received": bytes, "sent": bytes}} over every exchange of the round."""
    out: dict[str, dict[str, int]] = {}
    for path in sorted((Path(round_dir) / FOLDER).glob("*.json")):
        counted = json.loads(path.read_bytes())
        row = out.setdefault(counted["bank"], {"received": 0, "sent": 0})
        row["received"] += counted["received"]
        row["sent"] += counted["sent"]
    return out


def over_rounds(federation_root: Path, rounds: int) -> dict[str, dict[str, int]]:
    """``totals`` summed over rounds 1..``rounds`` of the federation at ``federation_root`` (benches)."""
    out: dict[str, dict[str, int]] = {}
    for round_id in range(1, rounds + 1):
        for bank, row in totals(Path(federation_root) / f"round-{round_id}").items():
            for way, n in row.items():
                out.setdefault(bank, {"received": 0, "sent": 0})[way] += n
    return out


def metrics(counted: dict[str, dict[str, int]]) -> dict[str, float]:
    """MLflow metrics: ``bytes.<bank>.sent`` / ``.received`` (the bank's view) and the round's totals."""
    values = {f"bytes.{bank}.{way}": float(n) for bank, row in counted.items() for way, n in row.items()}
    values.update({f"bytes.{way}": float(sum(row[way] for row in counted.values())) for way in ("sent", "received")})
    return values
