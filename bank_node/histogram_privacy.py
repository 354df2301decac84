"""Differential privacy for histogram rounds: clipped gradients in the bank's worker, Gaussian noise on the
gradient and hessian sums its masking sidecar sends, added inside the bank before they are masked.

In a histogram round XGBoost (row split) releases, per tree, through SUM allreduces of DOUBLE words
(logged from a federation of toy banks, xgboost 3.2.0): the node histograms of each depth level
(``2 x total_bins`` values per node built: gradient and hessian per bin of every feature; the sibling
of a built node comes from subtraction, not a release) and the root's gradient and hessian sums (2
values). Split gains, children's sums and leaf values are all computed from those released sums, so
they are post-processing. The other collectives carry no gradient: MAX/bitwise checks, a Broadcast of
the column-sampling seed, and one INT32 SUM of the matrix shape (the row count).

The mechanism (``PrivateHistogram``):

* the worker trains with a custom objective: the logistic loss's gradient and hessian, with
  ``scale_pos_weight``, clipped as ``bank_node.privacy.clipped_gradients`` does (|g| <= C, 0 <= h <= B,
  B = min(C, 0.25 max(1, scale_pos_weight))), so one row adds at most (C, B) to each bin it falls in;
* one row falls in one node per depth level and, in that node, in at most one bin per feature
  (none for a missing value). Adding or removing it moves one level's release by at most
  ``Delta_level = sqrt(F (C^2 + B^2))`` in L2 (F features) and the root sums by at most
  ``Delta_root = sqrt(C^2 + B^2)``;
* the sidecar adds N(0, (sigma Delta)^2) to every value of each such call, so the root sums and each
  level (however XGBoost batches its nodes into calls: a row is in one of them) are Gaussian mechanisms
  of noise multiplier sigma. A tree of ``max_depth`` D costs D + 1 of them, and a task of T trees
  T (D + 1), composed by the bank's ledger (``bank_node.privacy_ledger``) with its bagging releases.

Each bank adds its FULL noise sigma Delta, not the distributed share sigma^2 Delta^2 / n. Every bank
receives the sum in the clear (XGBoost needs it) and knows its own contribution and noise: with shares,
the other banks together could subtract theirs and leave a victim protected by sigma / sqrt(n) only. The
guarantee here holds against the aggregator and any coalition of the other banks; the price is a
summed noise sqrt(n) times the target (measured in ``bench/privacy.py --strategy histogram``).

Refused by name in the sidecar, so no unaccounted gradient sum leaves: a float SUM that is neither
shape (``privacy_unknown_sum``) and more root or level releases than the task was charged for
(``privacy_unaccounted_release``). Each attempt of a round (a fresh session) is charged again and
noised afresh: the noise seed is the bank's secret key with the task, the rows and the session.

Covered, unlike bagging's leaf noise: the trees' structure, since XGBoost chooses every split from the
noised sums (post-processing). Not protected, plainly: the row count (the INT32 shape sum, and the
matrix checks' MAX words), and everything the bank sends outside the collective (summary counts, the
update's metadata, evaluation; see README). A bank's noise is its own act: one that skips it exposes
only its own customers. Within the guarantee, leaves can still be wild at small ε (a noisy hessian
sum near 0): ``min_child_weight`` (public, the consortium's) refuses splits whose noised hessian is small.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DOUBLE = 2  # federated DataType enum (fedfraud.secagg.federated_wire)
FLOATS = {0, 1, 2}


class HistogramPrivacyRefused(ValueError):
    """A collective the noise cannot account for; the message starts with the rule's name."""


@dataclass(frozen=True)
class HistogramNoise:
    """The public part of a private histogram task: the sidecar's scales and limits (job file)."""

    noise_multiplier: float
    gradient_clip: float  # C
    hessian_clip: float  # B
    features: int
    total_bins: int  # XGBoost's cut count over all features: a node's histogram has 2 x this many values
    trees: int
    max_depth: int

    @property
    def root_scale(self) -> float:
        return self.noise_multiplier * math.hypot(self.gradient_clip, self.hessian_clip)

    @property
    def level_scale(self) -> float:
        return self.root_scale * math.sqrt(self.features)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SumNoiser:
    """The sidecar's step before masking: noise on each gradient SUM, refusing any it cannot account for."""

    def __init__(self, noise: HistogramNoise, seed: int):
        if noise.total_bins < 2:
            raise HistogramPrivacyRefused("privacy_unknown_sum: fewer than 2 bins: histograms look like root sums")
        self.noise, self.seed = noise, int(seed)
        self.roots = self.levels = 0

    @classmethod
    def from_job(cls, public: dict, seed_hex: str | None) -> "SumNoiser":
        if not seed_hex:
            raise HistogramPrivacyRefused("privacy_no_seed: the job asks for noise but no secret seed was piped in")
        return cls(HistogramNoise(**public), int(seed_hex, 16))

    def __call__(self, values: np.ndarray, data_type: int, label: int) -> np.ndarray:
        if data_type not in FLOATS:
            return values  # integer sums: the matrix shape (row count), outside the guarantee
        n, per_node = values.size, 2 * self.noise.total_bins
        if data_type == DOUBLE and n == 2:
            self.roots += 1
            scale, over = self.noise.root_scale, self.roots > self.noise.trees
        elif data_type == DOUBLE and n and n % per_node == 0:
            self.levels += 1
            scale, over = self.noise.level_scale, self.levels > self.noise.trees * self.noise.max_depth
        else:
            raise HistogramPrivacyRefused(f"privacy_unknown_sum: a {n}-value float SUM (type {data_type}) is "
                                          f"neither root sums nor node histograms of {per_node} values")
        if over:
            raise HistogramPrivacyRefused(f"privacy_unaccounted_release: more than the {self.noise.trees} trees x "
                                          f"(1 + {self.noise.max_depth} levels) charged")
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(int(label),)))
        return values.astype(np.float64) + rng.normal(0.0, scale, n)


@dataclass(frozen=True)
class PrivateHistogram:
    """A charged private histogram task: what its worker and sidecar need, and the ε spent with it."""

    noise: HistogramNoise
    seed: int  # secret: reaches the sidecar through its stdin pipe only
    epsilon: float

    def worker_job(self) -> dict[str, Any]:
        return {"gradient_clip": self.noise.gradient_clip, "epsilon": self.epsilon,
                "total_bins": self.noise.total_bins}

    def secrets(self) -> dict[str, str]:
        return {"noise_seed": format(self.seed, "x")}


def histogram_bins(matrix) -> int:
    """A node histogram's bins in XGBoost for ``matrix``'s cuts (Python's cut list adds each feature's minimum)."""
    indptr = matrix.get_quantile_cut()[0]
    return int(indptr[-1]) - (len(indptr) - 1)


def total_bins(bins) -> int:
    """The histogram's bins for the shared bins (the worker's matrix takes its cuts from the same reference)."""
    import xgboost as xgb

    return histogram_bins(xgb.QuantileDMatrix(bins.reference_matrix(), missing=np.nan, max_bin=bins.max_bin, nthread=1))


def charge_histogram(node, task, task_bytes: bytes, session, session_bytes: bytes) -> PrivateHistogram:
    """Refuse what the accounting does not cover, charge the task's releases to the bank's ledger (refused
    over budget by name), and return the noise its sidecar adds."""
    from bank_node.policy import TaskRefused
    from bank_node.privacy import noise_seed, task_key
    from fedfraud.binning import GlobalBins

    policy, params = node.privacy, task.params
    depth, parallel = int(params.get("max_depth", 6)), int(params.get("num_parallel_tree", 1))
    if params.get("grow_policy", "depthwise") != "depthwise" or depth < 1 or parallel != 1:
        raise TaskRefused("privacy_unsupported", "private histogram rounds need grow_policy depthwise, "
                          f"1 <= max_depth (got {depth}) and one tree per iteration")
    if not session.secagg:
        raise TaskRefused("privacy_needs_secagg", "the noise is added by the masking sidecar; this session has none")
    bins = GlobalBins.from_dict(session.bins)
    _, _, hessian_clip, _ = policy.leaf_terms(params)
    noise = HistogramNoise(policy.noise_multiplier, policy.gradient_clip, hessian_clip, bins.num_feature,
                           total_bins(bins), task.num_trees, depth)
    data = node.data
    key = hashlib.sha256((task_key(task_bytes, data.X_train, data.y_train) + ":histogram:"
                          + hashlib.sha256(session_bytes).hexdigest()).encode()).hexdigest()
    ledger = node.privacy_ledger
    epsilon = ledger.charge(key, task.round_id, task.num_trees, policy.noise_multiplier, releases_per_tree=depth + 1)
    return PrivateHistogram(noise, noise_seed(ledger.noise_key(), key), epsilon)


def private_objective(privacy: dict[str, Any], params: dict[str, Any]):
    """The worker's custom objective: the clipped, weighted logistic gradient and hessian per row."""
    from bank_node.privacy import PrivacyPolicy, clipped_gradients

    policy = PrivacyPolicy(True, gradient_clip=float(privacy["gradient_clip"]))

    def objective(margin: np.ndarray, dtrain) -> tuple[np.ndarray, np.ndarray]:
        return clipped_gradients(margin, dtrain.get_label(), policy, params)

    return objective


def worker_privacy(privacy: dict[str, Any] | None, reference, params: dict[str, Any]):
    """The worker's (objective, ε to report): (None, None) without privacy. The matrix's bins must be the
    ones the sidecar's noise was set up for."""
    if not privacy:
        return None, None
    found = histogram_bins(reference)
    if found != int(privacy["total_bins"]):
        raise HistogramPrivacyRefused(f"privacy_layout: {found} bins here, the sidecar expects {privacy['total_bins']}")
    return private_objective(privacy, dict(params)), float(privacy["epsilon"])
