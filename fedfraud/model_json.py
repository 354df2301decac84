"""XGBoost models as JSON documents: the only model format that crosses a bank's boundary.

Helpers to slice off new trees, scrub training statistics, scale leaves and append trees.
No pickle anywhere: a model is ``xgboost``'s own JSON, parsed with ``json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any, Iterable

import xgboost as xgb

Doc = dict[str, Any]
# Per-node statistics that inference does not need; they would reveal gradient sums.
TRAINING_ONLY_FIELDS = ("loss_changes", "sum_hessian")


def to_doc(booster: xgb.Booster) -> Doc:
    return json.loads(booster.save_raw("json"))


def to_booster(doc: Doc) -> xgb.Booster:
    booster = xgb.Booster()
    booster.load_model(bytearray(json.dumps(doc).encode()))
    return booster


def to_bytes(doc: Doc) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def model_id(doc: Doc | None) -> str:
    """Short content hash that names a global model (``"none"`` before the first round)."""
    return "none" if doc is None else hashlib.sha256(to_bytes(doc)).hexdigest()[:16]


def trees(doc: Doc) -> list[Doc]:
    return doc["learner"]["gradient_booster"]["model"]["trees"]


def num_feature(doc: Doc) -> int:
    return int(doc["learner"]["learner_model_param"]["num_feature"])


def is_leaf(tree: Doc, node: int) -> bool:
    return tree["left_children"][node] == -1


def leaf_values(doc: Doc) -> Iterable[float]:
    for tree in trees(doc):
        for node, value in enumerate(tree["split_conditions"]):
            if is_leaf(tree, node):
                yield float(value)


def new_trees_only(booster: xgb.Booster, base_rounds: int) -> Doc:
    """The trees added after the first ``base_rounds`` boosting rounds, as a model document."""
    return to_doc(booster[base_rounds:]) if base_rounds else to_doc(booster)


def scrub_training_stats(doc: Doc) -> Doc:
    """Zero what inference does not read: loss changes, hessian sums, inner-node weights."""
    for tree in trees(doc):
        for field in TRAINING_ONLY_FIELDS:
            tree[field] = [0.0] * len(tree[field])
        tree["base_weights"] = [
            value if is_leaf(tree, node) else 0.0 for node, value in enumerate(tree["split_conditions"])
        ]
    return doc


def scale_leaves(doc: Doc, factor: float) -> Doc:
    """Return a copy whose every leaf value (and so every tree's output) is multiplied by ``factor``."""
    scaled = copy.deepcopy(doc)
    for tree in trees(scaled):
        for field in ("split_conditions", "base_weights"):
            tree[field] = [v * factor if is_leaf(tree, n) else v for n, v in enumerate(tree[field])]
    return scaled


def append_trees(base: Doc, *additions: Doc) -> Doc:
    """A model with ``base``'s trees followed by each addition's trees (one tree per iteration).

    Trees are shared, not copied (an appended tree is a new dict only for its ``id``): models here are
    never edited in place (``scale_leaves``, ``leaf_refit.newton_step`` copy first), and copying the whole
    forest on every cyclic turn made each turn cost O(model)."""
    forest = list(trees(base))
    for addition in additions:
        forest.extend({**tree, "id": len(forest)} for tree in trees(addition))
    return with_trees(base, forest)


def empty_like(doc: Doc) -> Doc:
    """``doc`` with no trees: the starting point that keeps its base score and objective (a copy: the
    trees are left out before copying, not copied and dropped)."""
    return copy.deepcopy(with_trees(doc, []))


def with_trees(doc: Doc, forest: list[Doc], tree_info: list | None = None) -> Doc:
    """``doc`` holding ``forest`` (one tree per iteration; ``tree_info`` all 0 unless given), copied along the
    path to the trees only: the trees and everything beside them are shared."""
    booster = doc["learner"]["gradient_booster"]
    model = booster["model"]
    count = len(forest)
    param = {**model["gbtree_model_param"]}
    param["num_trees"] = str(count) if isinstance(param.get("num_trees"), str) else count
    new_model = {**model, "trees": forest, "tree_info": [0] * count if tree_info is None else tree_info,
                 "iteration_indptr": list(range(count + 1)), "gbtree_model_param": param}
    return {**doc, "learner": {**doc["learner"], "gradient_booster": {**booster, "model": new_model}}}


def all_finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)
