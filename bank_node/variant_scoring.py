"""Scores of every variant of a score question: each model checked and scored once, not once per variant.

A variant is a model minus some trees (acceptance: "the candidate without bank b's trees", one per bank).
Scoring each variant as its own model costs (1 + n) passes over a model of ~n blocks at n banks: a
bank's work grew with the square of the banks. Here each model is validated once
(``parse_received_model``, the bank's ordinary entry check) and predicted once as a margin; a
variant's margin is that margin minus its dropped trees' leaf values (XGBoost's ``pred_leaf``, the
values read from the validated document), so a question costs about two passes per model.

The variant that drops nothing is XGBoost's own prediction, bit for bit; the others agree with
scoring the reduced model to float32 rounding (~1e-7), which moves a score across one of the
1,000 histogram bins only when it sits on a bin edge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bank_node.training import dmatrix
from fedfraud import model_json
from fedfraud.crosscheck import ScoreQuestion
from fedfraud.model_guard import parse_received_model

if TYPE_CHECKING:
    from bank_node.node import BankNode

ROWS_PER_CHUNK_CELLS = 1 << 22  # rows x trees of leaf indices held at once (16 MB of float32)


def variant_scores(node: "BankNode", question: ScoreQuestion) -> dict[str, tuple[dict, np.ndarray]]:
    """{label: (variant document, holdout scores)} for every variant of ``question``, in sorted label order.

    Every model is checked against the bank's policy and contract first (``ModelRefused`` names why not)."""
    data = node.data
    holdout = dmatrix(data.X_holdout, None, data.feature_names)
    limits = node.policy.received_limits()
    docs, boosters, margins, leaves = {}, {}, {}, {}
    out = {}
    for label in sorted(question.variants):
        name, drop = question.variant_spec(label)
        if name not in docs:
            docs[name] = parse_received_model(model_json.to_bytes(question.models[name]), limits, data.feature_names)
            boosters[name] = model_json.to_booster(docs[name])
        doc = docs[name]
        drop = sorted({i for i in drop if 0 <= i < len(model_json.trees(doc))})  # as drop_trees: others are absent
        if not drop:
            out[label] = (doc, boosters[name].predict(holdout))
            continue
        if name not in leaves:
            margins[name] = boosters[name].predict(holdout, output_margin=True).astype(np.float64)
            leaves[name] = _leaf_values(boosters[name], doc, data.X_holdout, data.feature_names)
        out[label] = (None, _sigmoid(margins[name] - leaves[name][:, drop].sum(axis=1, dtype=np.float64)))
    return out


def _sigmoid(margin: np.ndarray) -> np.ndarray:
    """binary:logistic's transform, returned as float32 as XGBoost predicts."""
    with np.errstate(over="ignore"):  # a very negative margin: exp overflows to inf, the score to 0
        return (1.0 / (1.0 + np.exp(-margin))).astype(np.float32)


def _leaf_values(booster, doc: dict, X: np.ndarray, feature_names: list[str]) -> np.ndarray:
    """(rows, trees) float32: the value of the leaf each holdout row reaches in each tree."""
    trees = model_json.trees(doc)
    values = [np.asarray(tree["split_conditions"], dtype=np.float32) for tree in trees]  # a leaf's value
    out = np.empty((len(X), len(trees)), dtype=np.float32)
    step = max(1, ROWS_PER_CHUNK_CELLS // max(1, len(trees)))
    for start in range(0, len(X), step):
        index = booster.predict(dmatrix(X[start:start + step], None, feature_names), pred_leaf=True)
        index = np.asarray(index, dtype=np.int64).reshape(-1, len(trees))
        for t, leaf in enumerate(values):
            out[start:start + step, t] = leaf[index[:, t]]
    return out
