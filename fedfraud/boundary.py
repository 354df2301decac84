"""What may leave a bank, declared: each outgoing message kind, its fields and their nested shapes.

The README's section "What crosses a bank's boundary" is the prose; this is the same list made
checkable. ``outgoing_problem(kind, payload)`` names the first field that is not allowed (or not of its
declared shape); ``answer_kind(task_kind)`` says which message answers a task; ``http_problem`` and
``federated_problem`` check what a networked agent sends over HTTP and what a bank's masking sidecar
sends on the histogram strategy's federated channel. The boundary tests record every byte a bank sends
and run it through here; ``README_NAMES`` ties each kind to the words the README lists it by.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

from fedfraud.protocol import TaskKind
from fedfraud.scores import BINS
from fedfraud.secagg import federated_wire as fw


@dataclass(frozen=True)
class Fields:
    """A JSON object holding only these fields (each may be absent)."""

    fields: dict[str, Any]


@dataclass(frozen=True)
class MapOf:
    """A JSON object of names (``keys``, if given, the only ones allowed) to values of one shape."""

    value: Any
    keys: frozenset[str] | None = None


@dataclass(frozen=True)
class ListOf:
    item: Any
    length: int | None = None


@dataclass(frozen=True)
class OneOf:
    shapes: tuple[Any, ...]


@dataclass(frozen=True)
class Text:
    """A string matching ``pattern`` (whole)."""

    pattern: str


@dataclass(frozen=True)
class Zeros:
    """A list of numbers that are all zero (training statistics scrubbed from a tree)."""


BASE64 = Text(r"[A-Za-z0-9+/]*={0,2}")
METRICS = MapOf(float, frozenset({"auprc", "roc_auc", "recall_at_1pct_fpr", "precision_at_budget"}))
COUNTS = Fields({"train_rows": int, "holdout_rows": int})  # row counts only: label counts leave masked
TREE = Fields({
    "id": int, "left_children": ListOf(int), "right_children": ListOf(int), "parents": ListOf(int),
    "split_indices": ListOf(int), "split_conditions": ListOf(float), "split_type": ListOf(int),
    "default_left": ListOf(int), "base_weights": ListOf(float), "loss_changes": Zeros(), "sum_hessian": Zeros(),
    "categories": ListOf(int, 0), "categories_nodes": ListOf(int, 0), "categories_segments": ListOf(int, 0),
    "categories_sizes": ListOf(int, 0),
    "tree_param": Fields(dict.fromkeys(("num_deleted", "num_feature", "num_nodes", "size_leaf_vector"), str)),
})
MODEL = Fields({  # XGBoost's model JSON, new trees only; no attributes, no categories
    "version": ListOf(int),
    "learner": Fields({
        "attributes": MapOf(str, frozenset()),
        "feature_names": ListOf(str), "feature_types": ListOf(str),
        "learner_model_param": Fields(dict.fromkeys(
            ("base_score", "boost_from_average", "num_class", "num_feature", "num_target"), str)),
        "objective": Fields({"name": str, "reg_loss_param": Fields({"scale_pos_weight": str})}),
        "gradient_booster": Fields({"name": str, "model": Fields({
            "gbtree_model_param": Fields({"num_parallel_tree": str, "num_trees": str}),
            "iteration_indptr": ListOf(int), "tree_info": ListOf(int), "trees": ListOf(TREE),
            "cats": Fields({"enc": ListOf(int, 0), "feature_segments": ListOf(int, 0), "sorted_idx": ListOf(int, 0)}),
        })}),
    }),
})
EVALUATION_REPORT = Fields({"bank": str, "model_id": str, "positives": int, "negatives": int, "metrics": METRICS,
                            "hist_pos": ListOf(int, BINS), "hist_neg": ListOf(int, BINS)})

OUTGOING: dict[str, Fields] = {
    "summary": Fields({"bank": str, "contract_hash": str, "counts": COUNTS, "training_allowed": bool,
                       "decline_reasons": ListOf(str), "data_window": ListOf(OneOf((str, None)), 2),
                       "holdout_start": OneOf((str, None))}),
    "update": Fields({"bank": str, "round_id": int, "base_model_id": str, "contract_hash": str, "seed": int,
                      "counts": COUNTS, "metrics": METRICS, "model": MODEL,
                      "privacy_epsilon": float,  # only from a bank that trains privately (bank_node/privacy.py)
                      # histogram rounds: bytes the bank's sidecar exchanged with the federated server (a count)
                      "collective_bytes": Fields({"sent": int, "received": int})}),
    "key offer": Fields({"bank": str, "session": str, "public_key": BASE64, "certificate": str, "signature": BASE64}),
    # planning: the bank's label counts (positives, holdout positives) as pairwise-masked words
    "masked counts": Fields({"bank": str, "session": str, "words": BASE64}),
    "masked evaluation": Fields({"bank": str, "model_id": str, "session": str, "purpose": str, "words": BASE64,
                                 "metrics": METRICS}),
    # acceptance and cross-evaluation (masked, the defaults): per variant scored, its histograms as pairwise-masked
    # words (cross-evaluation: zeros in the bank's own model's slot); acceptance: the label of the round's key
    # session they are masked under (bank_node/acceptance_keys.py)
    "masked score answer": Fields({"bank": str, "round_id": int, "purpose": str, "session": str,
                                   "question": Text(r"[0-9a-f]{64}"), "words": MapOf(BASE64),
                                   "label": OneOf((Text(r"stage-\d{1,4}/(first|pairs)/attempt-\d{1,2}/[0-9a-f]{16}"),
                                                   None))}),
    # acceptance_masked or crossval_masked off (a consortium's choice): one evaluation report per variant scored
    # (documented: in the clear)
    "evaluation reports": Fields({"bank": str, "round_id": int, "purpose": str, "reports": MapOf(EVALUATION_REPORT)}),
    # the histogram strategy's planning: the dense grid counts as pairwise-masked words (fedfraud/grid_counts.py);
    # the sparse clear counts (cells, counts) leave only a bank that allows unmasked sessions (benches): not declared
    "masked grid counts": Fields({"bank": str, "session": str, "words": BASE64}),
    "failure": Fields({"reason": str}),  # a task the bank could not do: why, in words
}
# How README's section lists each kind (a phrase that must appear there).
README_NAMES = {"summary": "counts", "update": "an update", "key offer": "key offer",
                "masked counts": "masked planning counts",
                "masked evaluation": "masked evaluation", "masked score answer": "masked acceptance answer",
                "evaluation reports": "evaluation reports",
                "masked grid counts": "masked grid counts", "failure": "failure"}
ANSWERS = {
    TaskKind.SUMMARY: "summary", TaskKind.TRAIN: "update", TaskKind.HISTOGRAM: "update",
    TaskKind.LOCAL_MODEL: "update", TaskKind.KEYS: "key offer", TaskKind.EVALUATE: "masked evaluation",
    TaskKind.EVALUATE_CHAMPION: "masked evaluation", TaskKind.CROSSVAL: ("masked score answer", "evaluation reports"),
    TaskKind.ACCEPT: ("masked score answer", "evaluation reports"), TaskKind.BIN_COUNTS: "masked grid counts",
    TaskKind.COUNTS: "masked counts", TaskKind.REFIT: "masked counts",  # refit: the same fields, longer words
}


def answer_kinds(task_kind: str) -> tuple[str, ...]:
    """Every outgoing kind that may answer a task of ``task_kind`` (acceptance: masked, or in the clear)."""
    kinds = ANSWERS[task_kind]
    return kinds if isinstance(kinds, tuple) else (kinds,)


def answer_kind(task_kind: str, body: Any = None) -> str:
    """The outgoing kind that answers a task of ``task_kind``: of several, the first that ``body`` fits (else
    the first, so that its problem is the one named)."""
    kinds = answer_kinds(task_kind)
    if body is not None:
        return next((k for k in kinds if outgoing_problem(k, body) is None), kinds[0])
    return kinds[0]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shape_problem(shape: Any, value: Any, where: str) -> str | None:
    """The first place where ``value`` leaves ``shape``, named by its path; None when it fits."""
    if shape is None:
        return None if value is None else f"{where}: expected null, got {type(value).__name__}"
    if shape is bool or shape is str:
        return None if isinstance(value, shape) else f"{where}: expected {shape.__name__}, got {type(value).__name__}"
    if shape is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{where}: expected an integer, got {type(value).__name__}"
    if shape is float:
        return None if _is_number(value) else f"{where}: expected a number, got {type(value).__name__}"
    if isinstance(shape, Text):
        ok = isinstance(value, str) and re.fullmatch(shape.pattern, value)
        return None if ok else f"{where}: expected text matching {shape.pattern}"
    if isinstance(shape, Zeros):
        ok = isinstance(value, list) and all(_is_number(v) and v == 0 for v in value)
        return None if ok else f"{where}: expected zeros only (a training statistic that must be scrubbed)"
    if isinstance(shape, OneOf):
        problems = [shape_problem(s, value, where) for s in shape.shapes]
        return None if None in problems else problems[0]
    if isinstance(shape, ListOf):
        if not isinstance(value, list):
            return f"{where}: expected a list, got {type(value).__name__}"
        if shape.length is not None and len(value) != shape.length:
            return f"{where}: expected {shape.length} items, got {len(value)}"
        for index, item in enumerate(value):
            if problem := shape_problem(shape.item, item, f"{where}[{index}]"):
                return problem
        return None
    if not isinstance(value, dict):
        return f"{where}: expected an object, got {type(value).__name__}"
    for key, item in value.items():
        allowed = shape.fields.get(key, ...) if isinstance(shape, Fields) else (
            shape.value if shape.keys is None or key in shape.keys else ...)
        if allowed is ...:
            return f"{where}.{str(key)[:60]}: field not allowed to leave the bank"
        if problem := shape_problem(allowed, item, f"{where}.{key}"):
            return problem
    return None


def _inner_weights_problem(model: dict) -> str | None:
    for index, tree in enumerate(model["learner"]["gradient_booster"]["model"]["trees"]):
        for node, (left, weight) in enumerate(zip(tree["left_children"], tree["base_weights"])):
            if left != -1 and weight != 0:
                return f"update.model.trees[{index}].base_weights[{node}]: an inner node's weight must be zeroed"
    return None


def outgoing_problem(kind: str, payload: Any) -> str | None:
    """Why ``payload`` (parsed JSON, or its bytes) may not leave a bank as ``kind``; None when it may."""
    if kind not in OUTGOING:
        return f"{kind}: not a kind of message a bank sends"
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = json.loads(bytes(payload).decode("utf-8"))
        except ValueError as exc:
            return f"{kind}: not JSON ({str(exc)[:80]})"
    problem = shape_problem(OUTGOING[kind], payload, kind)
    if problem is None and kind == "update" and "model" in payload:
        problem = _inner_weights_problem(payload["model"])
    return problem


# ---- networked: the agent's HTTP requests -----------------------------------------------------------

TASK_ID = r"[A-Za-z0-9_.-]{1,128}"
ROUTES = {  # (method, path pattern) -> what its body may be: None (empty), "answer" (by task kind), "failure"
    ("GET", r"/v1/tasks/next"): None, ("GET", rf"/v1/tasks/{TASK_ID}/input"): None,
    ("POST", r"/v1/heartbeat"): None, ("PUT", rf"/v1/tasks/{TASK_ID}/result"): "answer",
    ("PUT", rf"/v1/tasks/{TASK_ID}/failure"): "failure",
}
QUERY = {"/v1/tasks/next": {"wait"}}
HEADERS = frozenset({"host", "accept", "accept-encoding", "connection", "user-agent", "content-length",
                     "content-type"})


def http_problem(method: str, path: str, query: dict[str, Any], headers: list[str], body: bytes,
                 task_kind: str | None) -> str | None:
    """Why one HTTP request may not leave a bank: an unknown route, query parameter, header, or a body
    that is not the declared answer to its task (``task_kind``: the kind of the task it answers)."""
    route = next((r for r in ROUTES if r[0] == method and re.fullmatch(r[1], path)), None)
    if route is None:
        return f"{method} {path[:80]}: not a request a bank makes"
    extra = set(query) - QUERY.get(path, set())
    if extra:
        return f"{method} {path}: query parameter {sorted(extra)[0]} not allowed"
    stray = sorted({h.lower() for h in headers} - HEADERS)
    if stray:
        return f"{method} {path}: header {stray[0]} not allowed"
    expected = ROUTES[route]
    if expected is None:
        return None if not body else f"{method} {path}: carries {len(body)} bytes; it may carry none"
    if expected == "answer":
        if task_kind is None:
            return f"{method} {path}: an answer to a task the bank was never given"
        expected = answer_kind(task_kind, body)
    return outgoing_problem(expected, body)


# ---- the histogram strategy: what the masking sidecar sends to the federated server --------------------

FEDERATED_KINDS = ("key offer slot", "masked sum", "feature count", "seed broadcast")


def federated_kind(request: fw.Request) -> str | None:
    """Which declared kind a federated call is, or None."""
    if request.method == "Allgather" and request.sequence_number == 0:
        return "key offer slot"
    if request.method == "Allreduce" and request.reduce_operation == fw.SUM and fw.DTYPE_NAMES.get(
            request.data_type) == "UINT64":
        return "masked sum"
    if request.method == "Allreduce" and fw.OPS.get(request.reduce_operation) == "MAX" and len(
            request.send_buffer) <= 8:
        return "feature count"
    if request.method == "Broadcast" and len(request.send_buffer) <= 8:
        return "seed broadcast"
    return None


def federated_problem(request: fw.Request) -> str | None:
    """Why one call on the federated channel may not leave a bank: not a declared kind (a plain SUM, a
    sketch's ``AllgatherV``, ...), or a key offer slot holding anything but a key offer."""
    kind = federated_kind(request)
    if kind is None:
        return f"federated {request.describe()}: not a call a bank's sidecar may send"
    if kind == "key offer slot":
        data = request.send_buffer
        length = int.from_bytes(data[:4], "big")
        if not 0 < length <= len(data) - 4 or data[4 + length:].strip(b"\0"):
            return "federated key offer slot: anything but zero padding after the offer"
        return outgoing_problem("key offer", data[4:4 + length])
    if kind == "masked sum" and len(request.send_buffer) % 8:
        return f"federated {request.describe()}: not whole uint64 words"
    return None


def masked_words(text: str) -> bytes:
    """A masked evaluation's words as raw bytes (for a randomness test)."""
    return base64.b64decode(text, validate=True)
