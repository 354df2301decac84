"""The poisoning defence's records in the workspace, read by the registry and written by its phases.

    <federation>/crossval/crossval.json      cross-evaluation: exclusions, every local model's figures
    <federation>/round-<r>/acceptance.json   acceptance: per stage, each bank's figures and contribution

and, read here for the round report, the ε each privately training bank declared in its checked update.
"""

from __future__ import annotations

import json
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


def privacy_epsilons(ws: Workspace, round_id: int) -> dict[str, float]:
    """ε spent so far, as each bank declared it in its update that passed ``check`` (bounded and validated
    there: ``ModelUpdate.privacy_epsilon``); banks that do not train privately send none."""
    spent = {}
    for bank, data in ws.messages(round_id, "updates-checked").items():  # training.CHECKED
        epsilon = json.loads(data).get("privacy_epsilon")
        if epsilon is not None:
            spent[bank] = float(epsilon)
    return spent


def gate_metrics(ws: Workspace, round_id: int) -> dict[str, float]:
    """The acceptance gate's judgement of each bank in a round, as MLflow metrics: ``acceptance_drop.<bank>``
    (the others' pooled AUPRC without minus with its update) and ``acceptance_allowed_drop.<bank>`` (its δ)."""
    metrics = {}
    for stage in read_acceptance(ws, round_id)["stages"]:
        for bank, row in stage["banks"].items():
            if row.get("allowed_drop") is not None:
                metrics[f"acceptance_drop.{bank}"] = row["others_without"] - row["others_with"]
                metrics[f"acceptance_allowed_drop.{bank}"] = row["allowed_drop"]
    return metrics


def crossval_dir(ws: Workspace) -> Path:
    return ws.root / "crossval"


def read_crossval(ws: Workspace) -> dict[str, Any] | None:
    path = crossval_dir(ws) / "crossval.json"
    return ws.read_json(path) if path.exists() else None
