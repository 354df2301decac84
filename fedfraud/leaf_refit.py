"""Leaf refit of a compacted model: per-leaf logistic-loss sums at a bank, a damped Newton step at the aggregator.

A model's leaves are numbered in one flat order (tree by tree, node id ascending within a tree), so a
bank's sums and the aggregator's step agree on which leaf a number belongs to. A bank computes, on its
own training rows, the gradient and hessian of the model's own objective (``binary:logistic`` with its
``scale_pos_weight``) at the model's margin, summed per leaf (``bank_node.masked_refit.leaf_sums``); the
aggregator adds the banks' sums (masked: it sees the total only), checks them (``check_sums``) and moves
every leaf by ``-eta * G / (H + lambda)`` (``newton_step``). Each row lies in one leaf of every tree, so
a simultaneous step on all trees overshoots by up to the number of trees: ``eta`` is a fraction of
``1 / trees``.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from fedfraud import model_json
from fedfraud.model_json import Doc


REFIT_SLOT = 2**33  # + the step: a bank's mask label, above every evaluation, acceptance, grid, counts or
# cross-evaluation slot
FRAC_BITS = 24  # masked sums up to 2**33 in magnitude; a per-leaf sum is exact to ~6e-8


class RefitError(ValueError):
    """A model or a set of sums a refit cannot use (the message names what is wrong)."""


def leaf_nodes(doc: Doc) -> list[np.ndarray]:
    """Each tree's leaf node ids, ascending: the flat leaf order is these, tree after tree."""
    return [np.flatnonzero(np.asarray(tree["left_children"]) == -1) for tree in model_json.trees(doc)]


def leaf_count(doc: Doc) -> int:
    return int(sum(len(nodes) for nodes in leaf_nodes(doc)))


def pos_weight(doc: Doc) -> float:
    """The model's ``scale_pos_weight`` (1 when it has none); only ``binary:logistic`` is refitted."""
    objective = doc["learner"]["objective"]
    if objective.get("name") != "binary:logistic":
        raise RefitError(f"leaf refit needs a binary:logistic model, not {objective.get('name')!r}")
    weight = float(objective.get("reg_loss_param", {}).get("scale_pos_weight", 1.0))
    if not (math.isfinite(weight) and weight > 0):
        raise RefitError(f"the model's scale_pos_weight is not a positive number: {weight}")
    return weight


def flat_leaves(doc: Doc, node_ids: np.ndarray) -> np.ndarray:
    """Rows' leaf node ids per tree (``pred_leaf`` output, rows x trees) as flat leaf positions."""
    nodes = leaf_nodes(doc)
    if node_ids.shape[1] != len(nodes):
        raise RefitError(f"{node_ids.shape[1]} trees of leaf ids for a model of {len(nodes)} trees")
    out = np.empty(node_ids.shape, dtype=np.int64)
    offset = 0
    for t, leaves in enumerate(nodes):
        position = np.full(int(leaves[-1]) + 1, -1, dtype=np.int64)
        position[leaves] = np.arange(len(leaves)) + offset
        column = position[node_ids[:, t].astype(np.int64)]
        if (column < 0).any():
            raise RefitError(f"tree {t}: a row ended in a node that is not a leaf")
        out[:, t] = column
        offset += len(leaves)
    return out


def gradients(margin: np.ndarray, y: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and hessian of the weighted logistic loss at ``margin`` (positives weigh ``weight``)."""
    p = 1.0 / (1.0 + np.exp(-margin))
    w = np.where(y > 0, weight, 1.0)
    return w * (p - y), np.maximum(w * p * (1.0 - p), 1e-16)


def sums(flat: np.ndarray, grad: np.ndarray, hess: np.ndarray, leaves: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-leaf sums of ``grad`` and ``hess`` over rows whose flat leaf positions are ``flat``."""
    repeat = flat.shape[1]
    G = np.bincount(flat.ravel(), weights=np.repeat(grad, repeat), minlength=leaves)
    H = np.bincount(flat.ravel(), weights=np.repeat(hess, repeat), minlength=leaves)
    return G, H


def loss_sum(margin: np.ndarray, y: np.ndarray, weight: float) -> float:
    """The weighted logistic loss summed over rows (positives weigh ``weight``)."""
    w = np.where(y > 0, weight, 1.0)
    return float(np.sum(w * (np.logaddexp(0.0, margin) - y * margin)))


def check_sums(doc: Doc, G: np.ndarray, H: np.ndarray, rows: int) -> None:
    """Refuse decoded sums no honest banks' rows can give (``RefitError`` naming the check): not finite, a
    negative hessian, per-tree totals that differ (every row lies in one leaf of every tree, so each tree's
    leaves sum to the same totals), totals beyond ``rows`` rows' bounds (|gradient| <= weight, hessian <= weight/4)."""
    nodes = leaf_nodes(doc)
    if len(G) != leaf_count(doc) or len(H) != len(G):
        raise RefitError(f"refit_sums_shape: {len(G)} gradient and {len(H)} hessian sums for {leaf_count(doc)} leaves")
    if not (np.all(np.isfinite(G)) and np.all(np.isfinite(H))):
        raise RefitError("refit_sums_not_finite: a decoded sum is NaN or infinite")
    if len(G) == 0:
        return
    slack = 1e-4 * max(len(nodes[0]), 1)  # fixed-point rounding of each bank's words
    if float(H.min()) < -slack:
        raise RefitError(f"refit_sums_negative_hessian: a leaf's hessian sum is {float(H.min()):.6g}")
    bounds = np.cumsum([0] + [len(n) for n in nodes])
    for name, values in (("gradient", G), ("hessian", H)):
        totals = np.add.reduceat(values, bounds[:-1])
        spread = float(totals.max() - totals.min())
        if spread > slack * 10 + 1e-9 * float(np.abs(totals).max()):
            raise RefitError(f"refit_sums_inconsistent: the trees' {name} totals differ by {spread:.6g} "
                             "(every row lies in one leaf of every tree)")
    weight = pos_weight(doc)
    total_g, total_h = float(G[:len(nodes[0])].sum()), float(H[:len(nodes[0])].sum())
    if abs(total_g) > weight * rows + 1 or total_h > weight * rows / 4 + 1:
        raise RefitError(f"refit_sums_out_of_range: totals (gradient {total_g:.6g}, hessian {total_h:.6g}) beyond "
                         f"what {rows} rows can give")


def newton_step(doc: Doc, G: np.ndarray, H: np.ndarray, lam: float, eta: float) -> Doc:
    """A copy of ``doc`` whose every leaf moved by ``-eta * G / (H + lam)`` (its base weight too)."""
    if len(G) != leaf_count(doc) or len(H) != len(G):
        raise RefitError(f"{len(G)} gradient and {len(H)} hessian sums for a model of {leaf_count(doc)} leaves")
    step = -eta * np.asarray(G, dtype=np.float64) / (np.asarray(H, dtype=np.float64) + lam)
    out = copy.deepcopy(doc)
    offset = 0
    for tree, leaves in zip(model_json.trees(out), leaf_nodes(out)):
        for k, node in enumerate(leaves):
            value = float(np.float32(float(tree["split_conditions"][node]) + step[offset + k]))
            tree["split_conditions"][node] = value
            tree["base_weights"][node] = value
        offset += len(leaves)
    return out
