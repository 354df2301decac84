"""Where a federation's phases meet: one folder of JSON messages per federation.

    <work_dir>/federations/<model>/summaries/<bank>.json
    <work_dir>/federations/<model>/plan.json
    <work_dir>/federations/<model>/round-<r>/{tasks,updates,evaluations,champion_evaluations}/<bank>.json
    <work_dir>/federations/<model>/round-<r>/{working,checks,model,champion,outcome,registered}.json

Every file holds exactly a ``fedfraud.wire`` message or a step's JSON record, written
atomically, so any phase can be re-run from what the earlier ones left.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fedfraud.model_json import Doc
from pipelines.io import write_bytes


def dump(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1, default=str).encode()


class Workspace:
    def __init__(self, work_dir: str | Path, model_name: str):
        self.root = Path(work_dir) / "federations" / model_name

    def summary_path(self, bank: str) -> Path:
        return self.root / "summaries" / f"{bank}.json"

    @property
    def plan_path(self) -> Path:
        return self.root / "plan.json"

    def round_dir(self, round_id: int) -> Path:
        return self.root / f"round-{round_id}"

    def path(self, round_id: int, kind: str, bank: str | None = None) -> Path:
        """``kind`` is a folder (tasks, updates, evaluations, …) with ``bank``, else a file stem."""
        base = self.round_dir(round_id)
        return base / kind / f"{bank}.json" if bank else base / f"{kind}.json"

    def messages(self, round_id: int, kind: str) -> dict[str, bytes]:
        folder = self.round_dir(round_id) / kind
        return {p.stem: p.read_bytes() for p in sorted(folder.glob("*.json"))} if folder.exists() else {}

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_bytes())

    def write_json(self, obj: Any, path: Path) -> None:
        write_bytes(dump(obj), path)

    def clear_round(self, round_id: int) -> None:
        """Forget a round's files from an earlier run before it is opened again."""
        shutil.rmtree(self.round_dir(round_id), ignore_errors=True)

    def global_model(self, round_id: int) -> Doc | None:
        """The model the rounds before ``round_id`` produced (None before the first round)."""
        return self.read_json(self.path(round_id - 1, "model")) if round_id > 1 else None

    def working_model(self, round_id: int) -> Doc | None:
        """The model this round has aggregated so far (its stages before), else the global model."""
        working = self.path(round_id, "working")
        return self.read_json(working) if working.exists() else self.global_model(round_id)
