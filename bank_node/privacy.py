"""Differential privacy for bagging and cyclic updates: noisy leaf values, clipped rows, the ε it costs.

With ``privacy.enabled`` in the agent's YAML, every task ``BankNode.train`` runs (bagging, cyclic, and the
local model shared for cross-evaluation) goes through ``private_trees``: it grows the trees one at a time and
replaces each new tree's leaf values, before the next tree is grown, by values the bank computes
itself from its own rows under clipping, plus Gaussian noise. The ledger and its accountant
(``bank_node.privacy_ledger``) charge every task before it trains and refuse one over budget.

The mechanism, per tree (the model before it — base model and the task's earlier, already noised
trees — is fixed; ``m_i`` is row i's margin under it, ``p_i = sigmoid(m_i)``):

* per-row gradient and hessian of the logistic loss, weighted (``scale_pos_weight`` for frauds):
  ``g_i = w_i (p_i - y_i)``, ``h_i = w_i p_i (1 - p_i)``; then clipped *after* weighting, as one row
  weight: ``s_i = min(1, C / |g_i|)``, ``g~_i = s_i g_i`` (|g~_i| <= C), ``h~_i = min(s_i h_i, B)`` with
  ``B = min(C, 0.25 max(1, scale_pos_weight))`` (h_i <= |g_i| and h_i <= 0.25 w_i for this loss);
* per leaf: ``G``, ``H`` the sums over its rows; ``v = -T_alpha(G) / (H + lambda)`` (XGBoost's leaf
  weight, alpha's soft threshold), with ``lambda = max(task lambda, privacy.leaf_lambda)``;
  then clipped, ``v~ = clip(v, -W, W)``, noised, ``v~ + N(0, (sigma Delta)^2)``, and times ``eta``.

Sensitivity. Add one row (g, h) to a leaf (removal is the same pair read backwards). Along the path
that adds a fraction t of it, ``v(t) = -(G + t g) / (H + t h + lambda)`` (where |G + t g| > alpha;
elsewhere v = 0) and ``dv/dt = -(g + v(t) h) / (H + t h + lambda)``. The clipped value moves only
while |v(t)| <= W, at a rate of at most ``(C + W B) / lambda``; so the clipped leaf changes by at most
``(C + W B) / lambda``, and never by more than ``2W``. Each row falls in exactly one leaf of a tree,
so one row changes one coordinate of the tree's leaf vector:

    Delta = min(2 W, (C + W B) / lambda)        (L2 sensitivity of one tree's leaf vector)

and noise of standard deviation ``sigma Delta`` per leaf makes each tree one Gaussian mechanism of
noise multiplier ``sigma``; ``eta`` scales value and noise alike (post-processing). A task of T trees
is T such mechanisms, composed adaptively (each tree's rows see the earlier noised trees); the
ledger composes them over every task with the PLD accountant, δ fixed.

What this does NOT protect, plainly: the trees' *structure* (which feature and threshold each split
uses) is chosen by XGBoost on the raw rows and leaves the bank unprivatised, so the guarantee holds
for the leaf values given the structure, not for the model. Row and class counts (summary, update),
holdout metrics in the update, cross-evaluation reports and the masked evaluation's histograms are
not covered either. Histogram rounds have their own mechanism (noise on the gradient sums before masking,
``bank_node.histogram_privacy``), charged to the same ledger.

Noise is seeded from a secret key kept in the bank's work folder (never the aggregator's seed alone,
which would let the aggregator subtract it), the task's bytes and a digest of the training rows: the
same task on the same rows gives the same update (re-sending it costs no ε), new rows get new noise.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import xgboost as xgb

from bank_node.policy import from_config_block
from bank_node.training import BASE_PARAMS, dmatrix
from fedfraud import model_json
from fedfraud.wire import ModelUpdate, TrainTask

MAX_EPSILON = ModelUpdate.MAX_EPSILON  # the largest ε an update may carry
# Below this the guarantee is vacuous (ε in the hundreds for a few dozen trees) and the accountant's grid
# of privacy-loss values grows without bound; a bank that wants no noise turns privacy off.
MIN_NOISE_MULTIPLIER = 0.3


@dataclass(frozen=True)
class PrivacyPolicy:
    """The bank's DP choices (agent YAML ``privacy:``); off by default."""

    enabled: bool = False
    epsilon_budget: float = 8.0  # total ε this bank will spend, across every task it trains
    delta: float = 1e-5
    noise_multiplier: float = 1.0  # sigma: noise standard deviation per leaf, in units of Delta
    gradient_clip: float = 1.0  # C, on each row's weighted gradient
    leaf_clip: float = 1.0  # W, on each leaf value before eta
    leaf_lambda: float = 20.0  # the least L2 regularisation of released leaf values (Delta shrinks with it)

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"privacy.enabled must be true or false, not {self.enabled!r}")
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"privacy.{f.name} must be a positive number, got {value!r}")
        if self.delta >= 1 or self.epsilon_budget > MAX_EPSILON:
            raise ValueError(f"privacy.delta must be < 1 and epsilon_budget <= {MAX_EPSILON:g}")
        if self.noise_multiplier < MIN_NOISE_MULTIPLIER:
            raise ValueError(f"privacy.noise_multiplier must be at least {MIN_NOISE_MULTIPLIER} "
                             f"(less is no guarantee), got {self.noise_multiplier!r}")

    @classmethod
    def from_dict(cls, raw: Any) -> "PrivacyPolicy":
        return from_config_block(cls, raw, "privacy")

    def leaf_terms(self, params: dict[str, Any]) -> tuple[float, float, float, float]:
        """(lambda, alpha, hessian bound B, scale_pos_weight) for a task's params."""
        lam = max(float(params.get("lambda", params.get("reg_lambda", 1.0))), self.leaf_lambda)
        spw = float(params.get("scale_pos_weight", 1.0))
        return lam, float(params.get("alpha", 0.0)), min(self.gradient_clip, 0.25 * max(1.0, spw)), spw

    def sensitivity(self, params: dict[str, Any]) -> float:
        """Delta: the L2 change of one tree's clipped leaf vector when one row is added or removed."""
        lam, _, bound, _ = self.leaf_terms(params)
        return min(2 * self.leaf_clip, (self.gradient_clip + self.leaf_clip * bound) / lam)


def clipped_gradients(margin: np.ndarray, y: np.ndarray, policy: PrivacyPolicy,
                      params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's weighted logistic gradient and hessian, clipped to |g| <= C and 0 <= h <= B."""
    _, _, bound, spw = policy.leaf_terms(params)
    p = 1.0 / (1.0 + np.exp(-margin.astype(np.float64)))
    weight = np.where(y > 0, spw, 1.0)
    g, h = weight * (p - y), weight * p * (1.0 - p)
    scale = np.minimum(1.0, policy.gradient_clip / np.maximum(np.abs(g), 1e-300))
    return g * scale, np.minimum(h * scale, bound)


def clipped_leaf_values(leaf_of_row: np.ndarray, leaves: np.ndarray, g: np.ndarray, h: np.ndarray,
                        policy: PrivacyPolicy, params: dict[str, Any]) -> np.ndarray:
    """The clipped leaf value of each of ``leaves`` (node ids) from its rows' clipped g and h (no noise)."""
    lam, alpha, _, _ = policy.leaf_terms(params)
    position = {int(node): i for i, node in enumerate(leaves)}
    index = np.fromiter((position[int(n)] for n in leaf_of_row), dtype=np.int64, count=len(leaf_of_row))
    G = np.bincount(index, weights=g, minlength=len(leaves))
    H = np.bincount(index, weights=h, minlength=len(leaves))
    shrunk = np.sign(G) * np.maximum(np.abs(G) - alpha, 0.0)
    return np.clip(-shrunk / (H + lam), -policy.leaf_clip, policy.leaf_clip)


def task_key(task_bytes: bytes, X: np.ndarray, y: np.ndarray) -> str:
    """What names one release in the ledger: the task's bytes and a digest of the training rows."""
    rows = hashlib.sha256(np.ascontiguousarray(X).tobytes() + np.ascontiguousarray(y).tobytes()).hexdigest()
    return hashlib.sha256(hashlib.sha256(task_bytes).hexdigest().encode() + rows.encode()).hexdigest()


def noise_seed(secret: bytes, key: str) -> int:
    """The noise generator's seed: the bank's secret key and the release's ``task_key``."""
    return int.from_bytes(hmac.new(secret, key.encode(), "sha256").digest()[:16], "big")


def train_private(task: TrainTask, task_bytes: bytes, data, policy: PrivacyPolicy, ledger) -> tuple[xgb.Booster, float]:
    """Charge the task to ``ledger`` (refused over budget), then train it privately: (booster, ε spent)."""
    key = task_key(task_bytes, data.X_train, data.y_train)
    epsilon = ledger.charge(key, task.round_id, task.num_trees, policy.noise_multiplier)
    seed = noise_seed(ledger.noise_key(), key)
    return private_trees(task, data.X_train, data.y_train, data.feature_names, policy, seed), epsilon


def private_trees(task: TrainTask, X: np.ndarray, y: np.ndarray, feature_names: list[str], policy: PrivacyPolicy,
                  seed: int) -> xgb.Booster:
    """As ``training.train_trees``, but each new tree's leaves are the clipped, noised values above,
    set before the next tree is grown (so its rows' gradients see the noised model)."""
    params = {**BASE_PARAMS, **task.params}
    eta = float(params.get("eta", params.get("learning_rate", 0.3)))
    scale = policy.noise_multiplier * policy.sensitivity(params)
    rng = np.random.default_rng(seed)
    train = dmatrix(X, y, feature_names)
    booster = model_json.to_booster(task.base_model) if task.base_model else None
    if booster is not None:
        params.pop("base_score", None)  # the global model fixes it for every bank
    first_seed = int(params.get("seed", 0))
    for k in range(task.num_trees):
        params["seed"] = (first_seed + 7919 * k) % (2 ** 31 - 1)  # a fresh subsample per tree
        booster = xgb.train(params, train, num_boost_round=1, xgb_model=booster)
        params.pop("base_score", None)
        last = booster.num_boosted_rounds() - 1
        doc = model_json.to_doc(booster)
        tree = model_json.trees(doc)[last]
        leaves = np.array([n for n in range(len(tree["left_children"])) if model_json.is_leaf(tree, n)])
        leaf_of_row = booster[last:].predict(train, pred_leaf=True).reshape(-1).astype(np.int64)
        stored = np.asarray(tree["split_conditions"], dtype=np.float64)
        margin = booster.predict(train, output_margin=True).astype(np.float64) - stored[leaf_of_row]
        g, h = clipped_gradients(margin, y, policy, params)
        values = clipped_leaf_values(leaf_of_row, leaves, g, h, policy, params)
        noised = eta * (values + rng.normal(0.0, scale, size=len(leaves)))
        for node, value in zip(leaves, noised):
            tree["split_conditions"][int(node)] = float(value)
            tree["base_weights"][int(node)] = float(value)
        booster = model_json.to_booster(doc)
    return booster
