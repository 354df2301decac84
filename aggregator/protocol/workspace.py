"""Where a federation's phases meet: one folder of JSON messages per federation.

    <work_dir>/federations/<model>/summaries/<bank>.json
    <work_dir>/federations/<model>/plan.json
    <work_dir>/federations/<model>/round-<r>/{tasks,updates,evaluations,champion_evaluations}/<bank>.json
    <work_dir>/federations/<model>/round-<r>/{working,working-rebuilt,checks,model,champion,outcome,registered}.json

Every file holds exactly a ``fedfraud.wire`` message or a step's JSON record, written
atomically, so any phase can be re-run from what the earlier ones left.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, TypeVar

from fedfraud import model_json
from fedfraud.model_json import Doc
from pipelines.io import write_bytes

T = TypeVar("T")
REMEMBERED, REMEMBER_FROM = 8, 1 << 16  # the last few parsed files of at least 64 KiB (models, questions)
_parsed: OrderedDict[tuple, Any] = OrderedDict()
_lock = threading.Lock()


def dump(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1, default=str).encode()


def _model_id(data: bytes) -> str:
    return model_json.model_id(json.loads(data))


def parsed(data: bytes, parse: Callable[[bytes], T]) -> T:
    """``parse(data)``, remembered by the bytes' sha256 for large files: a cyclic turn reads the working
    model and the stage's question several times, and hashing them is ~50× cheaper than parsing them. What
    it returns is shared between callers: never edit it in place (nothing here does)."""
    if len(data) < REMEMBER_FROM:
        return parse(data)
    key = (parse, hashlib.sha256(data).digest())
    with _lock:
        if key in _parsed:
            _parsed.move_to_end(key)
            return _parsed[key]
    value = parse(data)
    with _lock:
        _parsed[key] = value
        while len(_parsed) > REMEMBERED:
            _parsed.popitem(last=False)
    return value


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

    def read_message(self, path: Path, parse: Callable[[bytes], T]) -> T:
        """``parse`` of the file at ``path`` (a message this side wrote), remembered (``parsed``): shared."""
        return parsed(path.read_bytes(), parse)

    def write_json(self, obj: Any, path: Path) -> None:
        write_bytes(dump(obj), path)

    def clear_round(self, round_id: int) -> None:
        """Forget a round's files from an earlier run before it is opened again."""
        shutil.rmtree(self.round_dir(round_id), ignore_errors=True)

    def global_model(self, round_id: int) -> Doc | None:
        """The model the rounds before ``round_id`` produced (None before the first round; shared: never edit
        it in place, nor ``working_model``'s)."""
        return self.read_message(self.path(round_id - 1, "model"), json.loads) if round_id > 1 else None

    def model_id_of(self, path: Path) -> str:
        """``model_json.model_id`` of the model at ``path``, remembered (``parsed``) by its content."""
        return self.read_message(path, _model_id)

    def working_model_id(self, round_id: int) -> str:
        """``model_json.model_id`` of ``working_model`` ("none" before the first round's first stage)."""
        working = self.path(round_id, "working")
        if working.exists():
            return self.model_id_of(working)
        return self.model_id_of(self.path(round_id - 1, "model")) if round_id > 1 else model_json.model_id(None)

    def working_model(self, round_id: int) -> Doc | None:
        """The model this round has aggregated so far (its stages before), else the global model."""
        working = self.path(round_id, "working")
        return self.read_message(working, json.loads) if working.exists() else self.global_model(round_id)
