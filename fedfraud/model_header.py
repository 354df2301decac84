"""The consortium's model header: the learner fields every model document carries.

The aggregator builds the header itself (objective, base score, feature count, names and
types) from values it decided at planning; a bank's header is never copied. Trees are
validated and rebuilt by ``fedfraud.model_guard``; this module only builds documents around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Doc = dict[str, Any]
OBJECTIVE = "binary:logistic"
FEATURE_TYPES = ("float", "q")  # numeric types only; "c" (categorical) is never allowed
MIN_BASE_SCORE = 1e-6  # the clamp aggregator.settings.consortium_params applies
XGBOOST_JSON_VERSION = [3, 2, 0]
FLOAT32_MAX = 3.4028234663852886e38
# XGBoost reads every JSON number as float32: a magnitude below FLT_MAX + half an ulp (2**103) rounds
# to a finite float32 (XGBoost itself writes its FLT_MAX sentinels as 3.4028235E38); anything else is inf.
FLOAT32_ROUNDS_FINITE = FLOAT32_MAX + 2.0**103


class ModelRefused(Exception):
    """A model document refused by a named, stable ``check``; ``detail`` says exactly what."""

    def __init__(self, check: str, detail: str):
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail


def finite32(value: Any, where: str) -> float:
    """``value`` as a float that is a finite float32; else ``wrong_type`` / ``not_finite``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelRefused("wrong_type", f"{where}: expected a number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:
        raise ModelRefused("not_finite", f"{where}: integer too large for a float") from None
    if not abs(as_float) < FLOAT32_ROUNDS_FINITE:  # also false for NaN
        raise ModelRefused("not_finite", f"{where}: {as_float!r} is not finite in float32")
    return as_float


@dataclass(frozen=True)
class ConsortiumHeader:
    """What every model of a federation declares; built from the aggregator's own decisions."""

    num_feature: int
    base_score: float
    feature_names: tuple[str, ...] = ()
    feature_types: tuple[str, ...] = ()  # () is what training writes today (numeric features)
    scale_pos_weight: float = 1.0

    def __post_init__(self):
        if isinstance(self.num_feature, bool) or not isinstance(self.num_feature, int) or self.num_feature < 1:
            raise ModelRefused("header_mismatch", f"num_feature {self.num_feature!r} is not a positive integer")
        score = finite32(self.base_score, "base_score")
        if not MIN_BASE_SCORE <= score <= 1 - MIN_BASE_SCORE:
            raise ModelRefused("header_mismatch",
                               f"base_score {score!r} outside [{MIN_BASE_SCORE}, 1 - {MIN_BASE_SCORE}]")
        if finite32(self.scale_pos_weight, "scale_pos_weight") <= 0:
            raise ModelRefused("header_mismatch", f"scale_pos_weight {self.scale_pos_weight!r} is not positive")
        for field, values in (("feature_names", self.feature_names), ("feature_types", self.feature_types)):
            if values and len(values) != self.num_feature:
                raise ModelRefused("header_mismatch", f"{len(values)} {field} for {self.num_feature} features")
        if not all(isinstance(n, str) and n for n in self.feature_names) or len(set(self.feature_names)) != len(
                self.feature_names):
            raise ModelRefused("header_mismatch", "feature names must be distinct non-empty strings")
        if any(t not in FEATURE_TYPES for t in self.feature_types):
            raise ModelRefused("header_mismatch", f"feature types must be among {FEATURE_TYPES}")

    def document(self, trees: list[Doc]) -> Doc:
        """A complete XGBoost JSON model: this header around ``trees`` (already rebuilt)."""
        count = len(trees)
        return {
            "learner": {
                "attributes": {},
                "feature_names": list(self.feature_names),
                "feature_types": list(self.feature_types),
                "gradient_booster": {
                    "model": {
                        "cats": {"enc": [], "feature_segments": [], "sorted_idx": []},
                        "gbtree_model_param": {"num_parallel_tree": "1", "num_trees": str(count)},
                        "iteration_indptr": list(range(count + 1)),
                        "tree_info": [0] * count,
                        "trees": [{**tree, "id": index} for index, tree in enumerate(trees)],
                    },
                    "name": "gbtree",
                },
                "learner_model_param": {
                    "base_score": f"[{float(self.base_score)!r}]",
                    "boost_from_average": "0",
                    "num_class": "0",
                    "num_feature": str(self.num_feature),
                    "num_target": "1",
                },
                "objective": {"name": OBJECTIVE,
                              "reg_loss_param": {"scale_pos_weight": repr(float(self.scale_pos_weight))}},
            },
            "version": list(XGBOOST_JSON_VERSION),
        }


def consortium_header(feature_names: list[str], params: dict[str, Any],
                      feature_types: tuple[str, ...] = ()) -> ConsortiumHeader:
    """The aggregator's header: the contract's ordered names and the planned consortium params
    (``base_score``, ``scale_pos_weight`` from ``aggregator.settings.consortium_params``)."""
    return ConsortiumHeader(num_feature=len(feature_names), base_score=params["base_score"],
                            feature_names=tuple(feature_names), feature_types=tuple(feature_types),
                            scale_pos_weight=params.get("scale_pos_weight", 1.0))


def parse_base_score(text: Any) -> float:
    """A number XGBoost wrote as a string: ``"[2E-1]"`` (3.2's ``base_score``) or ``"0.2"``."""
    if not isinstance(text, str) or len(text) > 64:
        raise ModelRefused("wrong_type", f"expected a short numeric string, got {type(text).__name__}")
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return float(inner)
    except ValueError:
        raise ModelRefused("malformed", f"base_score {text[:32]!r} is not a number") from None


def header_from_model(doc: Any, feature_names: list[str]) -> ConsortiumHeader:
    """The header a *bank* accepts from the aggregator's model: base score, ``scale_pos_weight``
    and feature types are read from the model (the aggregator decides them) and checked; the
    objective and feature count must be the consortium's, the names the bank's own contract.
    On a model the aggregator rebuilt, the bank's rebuild is identical (same ``model_id``)."""
    try:
        learner = doc["learner"]
        score = parse_base_score(learner["learner_model_param"]["base_score"])
        objective = learner["objective"]["name"]
        weight = learner["objective"].get("reg_loss_param", {}).get("scale_pos_weight", "1")
        types = learner.get("feature_types", [])
    except (KeyError, TypeError, AttributeError):
        raise ModelRefused("malformed", "model has no learner / learner_model_param / objective") from None
    if objective != OBJECTIVE:
        raise ModelRefused("header_mismatch", f"objective {str(objective)[:40]!r}, consortium uses {OBJECTIVE}")
    if not isinstance(types, list):
        raise ModelRefused("wrong_type", "feature_types must be a list")
    return ConsortiumHeader(num_feature=len(feature_names), base_score=score, feature_names=tuple(feature_names),
                            feature_types=tuple(types), scale_pos_weight=parse_base_score(weight))
