"""Scores of every variant of a score question, each model checked once and each tree scored once.

A variant is a model minus some trees (acceptance: "the candidate without bank b's trees", one per
bank). Scoring each variant as its own model costs (1 + n) passes over a model of ~n blocks at n
banks, so a bank's work grew with the square of the banks; and every stage and round the model it
is sent repeats the trees it scored before. Here:

* each model is validated once (``parse_received_model``, the bank's ordinary entry check);
* its holdout margin is the base margin plus every tree's leaf value (XGBoost's ``pred_leaf``, the
  values read from the validated document), added **one tree at a time in tree order** in float64;
* the running sums of the last models are kept (``MarginCache``), keyed by the content of their trees,
  so a model that starts with trees scored before only scores its new trees;
* a variant's margin is that sum minus its dropped trees' values (added in index order, one running
  sum per distinct set of dropped trees: memory grows with the variants, not with the trees).

The same trees give the same scores whether they were cached or not (the sums are sequential), so
results do not depend on what a bank was asked before. Scores agree with XGBoost's float32 prediction
of the reduced model to ~1e-7: a score moves to a neighbouring histogram bin only on a bin edge.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bank_node.model_cache import model_cache
from bank_node.training import dmatrix
from fedfraud import model_json
from fedfraud.crosscheck import ScoreQuestion
from fedfraud.model_guard import parse_received_model
from fedfraud.model_header import parse_base_score

if TYPE_CHECKING:
    from bank_node.node import BankNode

CELLS_PER_CHUNK = 1 << 22  # rows x trees of leaf indices held at once (16 MB of float32)
KEPT_MODELS = 4  # running sums a bank keeps (the last models it scored)


@dataclass
class _Sums:
    key: str  # the model's header (objective, base score)
    trees: list[str]  # digest of each tree, in order
    margin: np.ndarray  # float64: base margin + every tree's leaf value, added in tree order


class MarginCache:
    """A bank's running holdout margins of the last models it scored (nothing here leaves the bank)."""

    def __init__(self):
        self._kept: list[_Sums] = []
        self._lock = threading.Lock()

    def longest_prefix(self, key: str, trees: list[str]) -> _Sums | None:
        with self._lock:
            fits = [s for s in self._kept if s.key == key and s.trees == trees[:len(s.trees)]]
            return max(fits, key=lambda s: len(s.trees), default=None)

    def keep(self, sums: _Sums) -> None:
        with self._lock:
            others = [s for s in self._kept if (s.key, s.trees) != (sums.key, sums.trees)]
            self._kept = others[-(KEPT_MODELS - 1):] + [sums]


def variant_scores(node: "BankNode", question: ScoreQuestion) -> dict[str, tuple[dict | None, np.ndarray]]:
    """{label: (the model's document if nothing is dropped, holdout scores)} in sorted label order.

    Every model is checked against the bank's policy and contract first (``ModelRefused`` names why not)."""
    data = node.data
    specs = {label: question.variant_spec(label) for label in sorted(question.variants)}
    cache, limits, holdout = _cache(node), node.policy.received_limits(), None
    models: dict[str, _Scored] = {}
    out = {}
    for label, (name, drop) in specs.items():
        if name not in models:
            raw = model_json.to_bytes(question.models[name])
            doc = parse_received_model(raw, limits, data.feature_names)
            model_cache(node).keep(raw)  # validated: a later question may send it by reference
            if holdout is None:
                holdout = dmatrix(data.X_holdout, None, data.feature_names)
            drops = [d for n, d in specs.values() if n == name]
            models[name] = _Scored(doc, holdout, cache, drops)
        scored = models[name]
        dropped = scored.dropped(drop)
        margin = scored.margin - scored.drop_sums[dropped] if dropped else scored.margin
        out[label] = (None if dropped else scored.doc, _sigmoid(margin))
    return out


def _cache(node: "BankNode") -> MarginCache:
    """The node's cache for its current holdout (a new holdout, after ``prepare``, starts a new one)."""
    holder = node.__dict__.get("_margin_cache")
    if holder is None or holder[0] is not node.data:
        holder = (node.data, MarginCache())
        node.__dict__["_margin_cache"] = holder
    return holder[1]


class _Scored:
    """One validated model on the holdout: its margin, and the summed leaf values of each drop set asked.

    Memory: one float64 holdout vector per distinct drop set (at most the question's variants), never
    one per tree."""

    def __init__(self, doc: dict, holdout, cache: MarginCache, drops: list[list[int]]):
        self.doc, self.holdout = doc, holdout
        self.booster = model_json.to_booster(doc)
        trees = model_json.trees(doc)
        self.size, rows = len(trees), holdout.num_row()
        self._values = [np.asarray(tree["split_conditions"], dtype=np.float32) for tree in trees]  # a leaf's value
        param = doc["learner"]["learner_model_param"]
        key = json.dumps([doc["learner"]["objective"], param["base_score"]], sort_keys=True)
        digests = [hashlib.sha256(model_json.to_bytes({**tree, "id": 0})).hexdigest() for tree in trees]
        known = cache.longest_prefix(key, digests)
        if known is None:
            score = float(np.float32(parse_base_score(param["base_score"])))
            margin, start = np.full(rows, np.log(score / (1.0 - score)), dtype=np.float64), 0
        else:
            margin, start = known.margin.copy(), len(known.trees)
        sets = {d for d in map(self.dropped, drops) if d}
        self.drop_sums = {d: np.zeros(rows, dtype=np.float64) for d in sets}
        holding = {}  # tree -> the drop sets it is in
        for d in sets:
            for t in d:
                holding.setdefault(t, []).append(d)
        # every sum is added one tree at a time in index order: the cached prefix's dropped trees first
        for t, values in self._leaf_values([t for t in holding if t < start]):
            for d in holding[t]:
                self.drop_sums[d] += values
        for t, values in self._leaf_values(range(start, self.size)):
            margin += values
            for d in holding.get(t, ()):
                self.drop_sums[d] += values
        self.margin = margin
        cache.keep(_Sums(key, digests, margin))

    def dropped(self, drop: list[int]) -> tuple[int, ...]:
        """The trees a variant drops, as drop_trees does: sorted, each once, absent indices ignored."""
        return tuple(sorted({i for i in drop if 0 <= i < self.size}))

    def _leaf_values(self, indices):
        """(tree, each holdout row's leaf value in it) for these trees in index order, a slice of trees at a
        time (``CELLS_PER_CHUNK`` rows x trees of leaf indices)."""
        rows = self.holdout.num_row()
        for first, last in _runs(list(indices)):
            step = max(1, CELLS_PER_CHUNK // max(1, rows))
            for begin in range(first, last, step):
                end = min(last, begin + step)
                index = np.asarray(self.booster[begin:end].predict(self.holdout, pred_leaf=True), dtype=np.int64)
                index = index.reshape(rows, end - begin)
                for k, t in enumerate(range(begin, end)):
                    yield t, self._values[t][index[:, k]].astype(np.float64)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as [first, last) runs of consecutive trees."""
    runs: list[tuple[int, int]] = []
    for t in sorted(indices):
        if runs and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1)
        else:
            runs.append((t, t + 1))
    return runs


def _sigmoid(margin: np.ndarray) -> np.ndarray:
    """binary:logistic's transform, returned as float32 as XGBoost predicts."""
    with np.errstate(over="ignore"):  # a very negative margin: exp overflows to inf, the score to 0
        return (1.0 / (1.0 + np.exp(-margin))).astype(np.float32)
