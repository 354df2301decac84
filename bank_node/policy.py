"""A bank's own policy: which training tasks it accepts and which models it loads.

The aggregator decides the consortium's parameters; the bank decides what it will run. A task
outside these bounds (too deep, too fast a learning rate, label-pure leaves, unknown
parameters, too many trees) is refused before any data is touched, with the bound it broke.
The same policy bounds every model the bank receives (``ModelLimits`` for ``model_guard``).
Set in the agent's YAML under ``policy:``; an embedded ``BankNode`` gets the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from fedfraud.model_guard import MAX_MODEL_BYTES, MAX_MODEL_DEPTH, MAX_MODEL_TREES, ModelLimits
from fedfraud.wire import TrainTask

# "1": this bank joins unmasked histogram sessions and answers grid counts in the clear (benches only)
ALLOW_UNMASKED_ENV = "FEDFRAUD_SECAGG_ALLOW_UNMASKED"

# Every parameter a task may set; anything else (objective, updater, process_type, …) is refused.
KNOWN_PARAMS = frozenset({"max_depth", "eta", "learning_rate", "min_child_weight", "lambda", "reg_lambda", "alpha",
                          "gamma", "subsample", "colsample_bytree", "max_bin", "scale_pos_weight", "base_score",
                          "seed"})


class TaskRefused(RuntimeError):
    """A task outside the bank's policy: ``check`` names the bound, the message says which value."""

    def __init__(self, check: str, detail: str):
        super().__init__(f"{check}: {detail}")
        self.check, self.detail = check, detail


def from_config_block(cls, raw: Any, key: str):
    """The dataclass ``cls`` from the agent YAML's ``key:`` block (absent: its defaults); a block that is
    not a mapping, or an unknown key in it, is refused by name."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ValueError(f"{key} must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown}; known: {[f.name for f in fields(cls)]}")
    return cls(**raw)


@dataclass(frozen=True)
class TrainingPolicy:
    """Bounds on the training params a bank accepts and on the models it loads (config: ``policy``)."""

    max_depth: int = MAX_MODEL_DEPTH
    max_eta: float = 0.3
    min_child_weight: float = 1.0  # the least min_child_weight accepted (0 grows label-pure leaves)
    min_lambda: float = 1.0  # the least L2 regularisation accepted (XGBoost's default is 1)
    max_trees_per_task: int = 500  # the consortium default max_trees_per_update
    min_bin: int = 16
    max_bin: int = 1024
    max_scale_pos_weight: float = 1000.0
    max_model_trees: int = MAX_MODEL_TREES  # a received model (global, candidate, champion)
    max_model_bytes: int = MAX_MODEL_BYTES
    max_abs_leaf: float = 100.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"policy.{f.name} must be a non-negative number, got {value!r}")

    @classmethod
    def from_dict(cls, raw: Any) -> "TrainingPolicy":
        return from_config_block(cls, raw, "policy")

    def received_limits(self) -> ModelLimits:
        """What a model sent to this bank must meet before it is loaded."""
        return ModelLimits.accepted(int(self.max_depth), max_trees=int(self.max_model_trees),
                                    max_bytes=int(self.max_model_bytes), max_abs_leaf=float(self.max_abs_leaf))

    def check(self, task: TrainTask) -> None:
        """Raise ``TaskRefused`` naming the first bound ``task`` breaks."""
        if not isinstance(task.params, dict):
            raise TaskRefused("policy_params", "params must be an object")
        unknown = sorted(set(task.params) - KNOWN_PARAMS)
        if unknown:
            raise TaskRefused("policy_unknown_param", f"this bank does not accept the parameters {unknown[:8]}")
        p = task.params
        _integer("num_trees", task.num_trees, 1, self.max_trees_per_task)
        _integer("max_depth", p.get("max_depth", 6), 1, self.max_depth)
        _number("eta", p.get("eta", p.get("learning_rate", 0.3)), 0.0, self.max_eta, low_open=True)
        _number("min_child_weight", p.get("min_child_weight", 1.0), self.min_child_weight, math.inf)
        _number("lambda", p.get("lambda", p.get("reg_lambda", 1.0)), self.min_lambda, math.inf)
        _number("alpha", p.get("alpha", 0.0), 0.0, math.inf)
        _number("gamma", p.get("gamma", 0.0), 0.0, math.inf)
        _number("subsample", p.get("subsample", 1.0), 0.0, 1.0, low_open=True)
        _number("colsample_bytree", p.get("colsample_bytree", 1.0), 0.0, 1.0, low_open=True)
        _integer("max_bin", p.get("max_bin", 256), self.min_bin, self.max_bin)
        _number("scale_pos_weight", p.get("scale_pos_weight", 1.0), 0.0, self.max_scale_pos_weight, low_open=True)
        _number("base_score", p.get("base_score", 0.5), 0.0, 1.0, low_open=True, high_open=True)
        _integer("seed", p.get("seed", 0), 0, 2 ** 31 - 1)


def _integer(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TaskRefused(f"policy_{name}", f"{name} {str(value)[:24]} is outside this bank's bounds [{low}, {high}]")


def _number(name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise TaskRefused(f"policy_{name}", f"{name} {str(value)[:24]} is outside this bank's bounds {bounds}")
