"""Structural validation of every model document, at both ends of a round.

XGBoost 3.2 trusts a model's JSON: an out-of-range split index segfaults ``predict``, a child
cycle hangs ``get_score``, a leaf finite in float64 can be inf in float32. Nothing received is
loaded before it passes here. Each tree is checked (array types and lengths, children forming one
tree from the root, iteratively; split indices, categorical splits, depth, node count, leaf bounds
in float32) and rebuilt from allowed fields only, inside the consortium header
(``fedfraud.model_header``), so a bank's header never survives. A refusal is a ``ModelRefused``
with a stable ``check`` name. Pure: no aggregator or bank imports; nothing is handed to XGBoost here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from fedfraud import model_json
from fedfraud.model_header import (OBJECTIVE, ConsortiumHeader, Doc, ModelRefused, consortium_header, finite32,
                                   header_from_model, parse_base_score)
from fedfraud.wire import ModelUpdate

__all__ = ["CHECKS", "MAX_MODEL_BYTES", "MAX_MODEL_DEPTH", "MAX_MODEL_TREES", "ConsortiumHeader",
           "ModelLimits", "ModelRefused", "consortium_header", "header_from_model",
           "parse_model_bytes", "parse_received_model", "parse_update_bytes", "rebuild_model", "rebuild_trees",
           "rebuild_update"]

CHECKS = frozenset({
    "array_length", "categorical_split", "child_out_of_range", "cycle_or_shared_node", "header_mismatch",
    "leaf_out_of_range", "malformed", "no_trees", "not_finite", "split_index_out_of_range", "too_deep",
    "too_large", "too_many_nodes", "too_many_trees", "unreachable_node", "wrong_type",
})
# Per-node arrays XGBoost writes and needs to load; statistics among them are zeroed on rebuild.
NODE_ARRAYS = ("left_children", "right_children", "parents", "split_indices", "split_conditions", "split_type",
               "default_left", "base_weights", "loss_changes", "sum_hessian")
CATEGORY_ARRAYS = ("categories", "categories_nodes", "categories_segments", "categories_sizes")
NO_PARENT = 2147483647  # XGBoost's parent of the root
# Byte budget: a rebuilt node serialises to ~46 bytes (measured; ~56 as XGBoost writes it), at most ~100.
BYTES_PER_NODE, HEADER_BYTES = 256, 64 * 1024
# What a bank accepts by default (bank_node.policy); the aggregator's global model never outgrows it,
# and a task carrying it stays under the wire's TrainTask bound (128 MiB).
MAX_MODEL_DEPTH, MAX_MODEL_TREES, MAX_MODEL_BYTES = 8, 10_000, 96 * 1024 * 1024


@dataclass(frozen=True)
class ModelLimits:
    """Bounds a model document must meet; defaults suit one round's update (depth 6 trees)."""

    max_depth: int = 8
    max_nodes_per_tree: int = 2 ** 9 - 1
    max_trees: int = 500
    max_bytes: int = 32 * 1024 * 1024
    max_abs_leaf: float = 100.0

    @classmethod
    def for_depth(cls, max_depth: int, max_trees: int = 500, **others: Any) -> "ModelLimits":
        """Limits whose node bound is the full binary tree of ``max_depth`` and, unless given,
        whose byte bound is what that many full trees can take (a few hundred KiB per 20 trees)."""
        nodes = 2 ** (max_depth + 1) - 1
        others.setdefault("max_bytes", HEADER_BYTES + max_trees * nodes * BYTES_PER_NODE)
        return cls(max_depth=max_depth, max_nodes_per_tree=nodes, max_trees=max_trees, **others)

    @classmethod
    def accepted(cls, max_depth: int = MAX_MODEL_DEPTH, max_trees: int = MAX_MODEL_TREES,
                 max_bytes: int = MAX_MODEL_BYTES, **others: Any) -> "ModelLimits":
        """A whole model a bank accepts (by default: ``bank_node.policy``'s defaults)."""
        return cls.for_depth(max_depth, max_trees=max_trees, max_bytes=max_bytes, **others)


def _field(mapping: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(mapping, dict):
        raise ModelRefused("wrong_type", f"{where}: expected an object, got {type(mapping).__name__}")
    if key not in mapping:
        raise ModelRefused("malformed", f"{where}: missing {key!r}")
    value = mapping[key]
    if not isinstance(value, kind):
        raise ModelRefused("wrong_type", f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelRefused("wrong_type", f"{where}: expected an integer, got {type(value).__name__}")
    return value


def _count(value: Any, where: str) -> int:
    """A count as XGBoost writes it (``"7"``) or as a plain integer."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ModelRefused("wrong_type", f"{where}: expected a non-negative count, got {str(value)[:32]!r}")


def _children(tree: Doc, n: int, where: str) -> tuple[list[int], list[int]]:
    left = [_integer(v, f"{where} left_children[{i}]") for i, v in enumerate(tree["left_children"])]
    right = [_integer(v, f"{where} right_children[{i}]") for i, v in enumerate(tree["right_children"])]
    for node, (lo, hi) in enumerate(zip(left, right)):
        if (lo == -1) != (hi == -1):
            raise ModelRefused("child_out_of_range", f"{where} node {node}: children {lo}, {hi} (one is a leaf marker)")
        for child in (lo, hi):
            if child != -1 and not 1 <= child < n:
                raise ModelRefused("child_out_of_range", f"{where} node {node}: child {child} not in 1..{n - 1}")
    return left, right


def _depths(left: list[int], right: list[int], max_depth: int, where: str) -> list[int]:
    """Depth of every node, walking from the root with an explicit stack (no recursion)."""
    depth = [-1] * len(left)
    depth[0], stack, reached = 0, [0], 1
    while stack:
        node = stack.pop()
        if left[node] == -1:
            continue
        for child in (left[node], right[node]):
            if depth[child] != -1:
                raise ModelRefused("cycle_or_shared_node", f"{where}: node {child} is reached again from node {node}")
            depth[child] = depth[node] + 1
            if depth[child] > max_depth:
                raise ModelRefused("too_deep", f"{where}: node {child} at depth {depth[child]} > {max_depth}")
            stack.append(child)
            reached += 1
    if reached != len(left):
        raise ModelRefused("unreachable_node", f"{where}: node {depth.index(-1)} is not reachable from the root")
    return depth


def _rebuild_tree(tree: Any, index: int, limits: ModelLimits, num_feature: int) -> Doc:
    where = f"tree {index}"
    n = _count(_field(tree, "tree_param", dict, where).get("num_nodes"), f"{where} num_nodes")
    if n < 1:
        raise ModelRefused("malformed", f"{where}: num_nodes is 0")
    if n > limits.max_nodes_per_tree:
        raise ModelRefused("too_many_nodes", f"{where}: {n} nodes > {limits.max_nodes_per_tree}")
    for name in NODE_ARRAYS:
        if len(_field(tree, name, list, where)) != n:
            raise ModelRefused("array_length", f"{where}: {name} has {len(tree[name])} entries, num_nodes is {n}")
    for name in CATEGORY_ARRAYS:
        if not isinstance(tree.get(name, []), list):
            raise ModelRefused("wrong_type", f"{where}.{name}: expected list")
        if tree.get(name):
            raise ModelRefused("categorical_split", f"{where}: {name} is not empty")
    for node, kind in enumerate(tree["split_type"]):
        if _integer(kind, f"{where} split_type[{node}]") != 0:
            raise ModelRefused("categorical_split", f"{where} node {node}: split_type {kind}")
    left, right = _children(tree, n, where)
    _depths(left, right, limits.max_depth, where)
    leaf = [child == -1 for child in left]
    features = [_integer(v, f"{where} split_indices[{i}]") for i, v in enumerate(tree["split_indices"])]
    for node, feature in enumerate(features):
        if not 0 <= feature < num_feature:
            raise ModelRefused("split_index_out_of_range",
                               f"{where} node {node}: split index {feature} not in 0..{num_feature - 1}")
    values = [finite32(v, f"{where} node {i} split_condition") for i, v in enumerate(tree["split_conditions"])]
    for node, value in enumerate(values):
        if leaf[node] and abs(value) > limits.max_abs_leaf:
            raise ModelRefused("leaf_out_of_range",
                               f"{where} node {node}: leaf {value!r} beyond ±{limits.max_abs_leaf}")
    default_left = [_integer(v, f"{where} default_left[{i}]") for i, v in enumerate(tree["default_left"])]
    if any(v not in (0, 1) for v in default_left):
        raise ModelRefused("wrong_type", f"{where}: default_left must be 0 or 1")
    parents = [NO_PARENT] * n
    for node in range(n):
        if not leaf[node]:
            parents[left[node]] = parents[right[node]] = node
    return {
        "base_weights": [v if leaf[i] else 0.0 for i, v in enumerate(values)],
        **{name: [] for name in CATEGORY_ARRAYS},
        "default_left": default_left, "id": index, "left_children": left, "loss_changes": [0.0] * n,
        "parents": parents, "right_children": right, "split_conditions": values,
        "split_indices": [0 if leaf[i] else f for i, f in enumerate(features)], "split_type": [0] * n,
        "sum_hessian": [0.0] * n,
        "tree_param": {"num_deleted": "0", "num_feature": str(num_feature), "num_nodes": str(n),
                       "size_leaf_vector": "1"},
    }


def rebuild_trees(trees_json: Any, limits: ModelLimits, num_feature: int, rebuilt: int = 0) -> list[Doc]:
    """Every tree validated and rebuilt from allowed fields, training statistics zeroed; the first
    ``rebuilt`` are kept as they are (the caller's own output of this function, at the same indices)."""
    if not isinstance(trees_json, list):
        raise ModelRefused("wrong_type", f"trees: expected a list, got {type(trees_json).__name__}")
    if len(trees_json) > limits.max_trees:
        raise ModelRefused("too_many_trees", f"{len(trees_json)} trees > {limits.max_trees}")
    return trees_json[:rebuilt] + [_rebuild_tree(tree, index, limits, num_feature)
                                   for index, tree in enumerate(trees_json[rebuilt:], start=rebuilt)]


def _check_declared(learner: Doc, header: ConsortiumHeader) -> None:
    """What the document says about itself must agree with the consortium (it is then replaced)."""
    params = _field(learner, "learner_model_param", dict, "learner")
    declared = _count(params.get("num_feature"), "learner num_feature")
    if declared != header.num_feature:
        raise ModelRefused("header_mismatch", f"num_feature {declared}, consortium has {header.num_feature}")
    if params.get("num_class", "0") not in ("0", 0) or params.get("num_target", "1") not in ("1", 1):
        raise ModelRefused("header_mismatch", "num_class / num_target: the consortium model is one binary output")
    score = parse_base_score(_field(params, "base_score", str, "learner_model_param"))
    if not math.isclose(score, header.base_score, rel_tol=1e-6):
        raise ModelRefused("header_mismatch", f"base_score {score!r}, consortium has {header.base_score!r}")
    objective = _field(_field(learner, "objective", dict, "learner"), "name", str, "objective")
    if objective != OBJECTIVE:
        raise ModelRefused("header_mismatch", f"objective {objective[:40]!r}, consortium uses {OBJECTIVE}")
    names = learner.get("feature_names", [])
    types = learner.get("feature_types", [])
    if not isinstance(names, list) or not isinstance(types, list):
        raise ModelRefused("wrong_type", "feature_names and feature_types must be lists")
    if names and header.feature_names and names != list(header.feature_names):
        raise ModelRefused("header_mismatch", "feature_names differ from the consortium's feature contract")
    if "c" in types:
        raise ModelRefused("categorical_split", "feature_types declares a categorical feature")


def rebuild_model(doc: Any, limits: ModelLimits, header: ConsortiumHeader, rebuilt_trees: int = 0) -> Doc:
    """The validated model rebuilt inside ``header``: tree ids, ``tree_info``,
    ``iteration_indptr`` and ``gbtree_model_param`` made consistent (one tree per iteration).

    ``rebuilt_trees``: how many leading trees are this process's own output of ``rebuild_model`` under the
    same limits and header, at the same indices (the aggregator appending a stage to its working model);
    they are kept as they are. Never a count from another party."""
    if not isinstance(doc, dict):
        raise ModelRefused("wrong_type", f"a model must be a JSON object, got {type(doc).__name__}")
    learner = _field(doc, "learner", dict, "model")
    _check_declared(learner, header)
    booster = _field(learner, "gradient_booster", dict, "learner")
    if booster.get("name") != "gbtree":
        raise ModelRefused("header_mismatch", f"booster {str(booster.get('name'))[:20]!r}, consortium uses gbtree")
    model = _field(booster, "model", dict, "gradient_booster")
    cats = model.get("cats", {})
    if not isinstance(cats, dict) or any(cats.get(k) for k in ("enc", "feature_segments", "sorted_idx")):
        raise ModelRefused("categorical_split", "the model carries a category encoder")
    rebuilt = header.document(rebuild_trees(_field(model, "trees", list, "model"), limits, header.num_feature,
                                            rebuilt_trees))
    size = len(model_json.to_bytes(rebuilt))
    if size > limits.max_bytes:
        raise ModelRefused("too_large", f"rebuilt model is {size} bytes > {limits.max_bytes}")
    return rebuilt


def rebuild_update(update: ModelUpdate, limits: ModelLimits, header: ConsortiumHeader) -> ModelUpdate:
    """``update`` with its model validated and rebuilt; an update must carry at least one tree."""
    doc = rebuild_model(update.model, limits, header)
    if not model_json.trees(doc):
        raise ModelRefused("no_trees", "the update carries no tree")
    return dataclasses.replace(update, model=doc)


def _bounded(data: Any, max_bytes: int) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ModelRefused("wrong_type", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ModelRefused("too_large", f"{len(data)} bytes > {max_bytes}")
    return bytes(data)


def _refuse_constant(name: str) -> None:
    raise ModelRefused("not_finite", f"JSON constant {name}")


def _parse(data: Any, max_bytes: int) -> Any:
    raw = _bounded(data, max_bytes)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise ModelRefused("malformed", f"not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise ModelRefused("malformed", "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer beyond Python's digit limit
        raise ModelRefused("malformed", f"not JSON: {str(exc)[:120]}") from None


def parse_model_bytes(data: Any, limits: ModelLimits, header: ConsortiumHeader) -> Doc:
    """Bytes received as a model: size bounded before parsing, strict UTF-8 JSON, then rebuilt."""
    return rebuild_model(_parse(data, limits.max_bytes), limits, header)


def parse_received_model(data: Any, limits: ModelLimits, feature_names: list[str]) -> Doc:
    """A bank's entry: the aggregator's model bytes, checked against the bank's own contract
    (``header_from_model``) and rebuilt; a model the aggregator rebuilt comes back identical."""
    doc = _parse(data, limits.max_bytes)
    return rebuild_model(doc, limits, header_from_model(doc, feature_names))


def parse_update_bytes(data: Any, limits: ModelLimits, header: ConsortiumHeader,
                       max_bytes: int | None = None) -> ModelUpdate:
    """A ``ModelUpdate`` from bytes (``wire`` parsing, bounded), its model rebuilt."""
    raw = _bounded(data, limits.max_bytes if max_bytes is None else max_bytes)
    try:
        update = ModelUpdate.from_bytes(raw, max_bytes=len(raw))
    except RecursionError:
        raise ModelRefused("malformed", "JSON nested too deeply") from None
    except ValueError as exc:  # WireFormatError, or an integer beyond Python's digit limit
        check = getattr(exc, "check", None) or ("not_finite" if "JSON constant" in str(exc) else "malformed")
        raise ModelRefused(check, str(exc)[:160]) from None
    return rebuild_update(update, limits, header)
