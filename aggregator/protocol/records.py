"""The poisoning defence's records in the workspace, read by the registry and written by its phases.

    <federation>/crossval/crossval.json      cross-evaluation: exclusions, every local model's figures
    <federation>/round-<r>/acceptance.json   acceptance: per stage, each bank's figures and contribution
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregator.protocol.workspace import Workspace


def acceptance_path(ws: Workspace, round_id: int) -> Path:
    return ws.round_dir(round_id) / "acceptance.json"


def read_acceptance(ws: Workspace, round_id: int) -> dict[str, Any]:
    path = acceptance_path(ws, round_id)
    return ws.read_json(path) if path.exists() else {"stages": []}


def contributions(ws: Workspace, round_id: int) -> dict[str, float]:
    """Each bank's contribution in a round: pooled AUPRC with minus without its update."""
    return {bank: row["contribution"] for stage in read_acceptance(ws, round_id)["stages"]
            for bank, row in stage["banks"].items() if "contribution" in row}


def crossval_dir(ws: Workspace) -> Path:
    return ws.root / "crossval"


def read_crossval(ws: Workspace) -> dict[str, Any] | None:
    path = crossval_dir(ws) / "crossval.json"
    return ws.read_json(path) if path.exists() else None
