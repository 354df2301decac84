"""Federation settings: tree hyper-parameters and the consortium-wide choices every bank shares."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class FederationSettings:
    trees_per_round: int = 20
    max_depth: int = 6
    learning_rate: float = 0.1
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 1.0
    max_bin: int = 256
    imbalance: str = "sqrt"  # scale_pos_weight from consortium counts: "ratio", "sqrt" or "none"
    weighting: str = "data_share"  # bagging: scale each bank's trees by its data share, or "uniform"
    max_bank_share: float = 0.5  # bagging: no bank's weight above this share (rows as recorded at planning)
    holdout_fraction: float = 0.2
    alert_budget: float = 0.005
    min_banks: int = 1
    max_trees_per_update: int = 500
    max_update_bytes: int = 32 * 1024 * 1024
    # Poisoning defence (aggregator/protocol/acceptance.py, crossval.py; README "Poisoning defence").
    acceptance: bool = True  # bagging/cyclic: others score a stage's update before it joins
    # Acceptance scores only as masked sums over every bank (aggregator/protocol/secure_acceptance.py): the
    # judged bank's holdout counts too. Off: clear per-bank reports, judged at the other banks only.
    acceptance_masked: bool = True
    # Refuse an update that lowers the others' pooled AUPRC by more than the allowed drop: "auto" scales it to
    # the evaluators' pooled frauds (acceptance_z standard errors, at least acceptance_delta_floor); a number
    # is a fixed drop; None measures contributions only. A fixed 0.05 refused honest banks on ~90 holdout
    # frauds, where honest updates moved it by 0.045-0.18 (README "Poisoning").
    acceptance_delta: float | str | None = "auto"
    acceptance_z: float = 2.0
    acceptance_delta_floor: float = 0.01
    # k: a federation of at least 2k banks scores each cyclic turn by a panel of k to 2k - 1 other banks, fixed and
    # disjoint (aggregator/protocol/acceptance_panel.py): each bank scores ~k turns a round, not n, with a wider δ.
    # None: every bank scores every turn.
    acceptance_evaluators: int | None = None
    crossval: bool = True  # before round 1: every bank's local model scored at every other bank
    crossval_max_trees: int = 100  # local models: rounds x trees_per_round trees, at most this (bank policies)
    crossval_min_lift: float = 2.0  # a local model must reach this multiple of no-skill AUPRC elsewhere
    # masked: a model whose ROC-AUC at the others' pooled holdouts is below this is refused (the lowest first);
    # in the clear: a holdout where every other model is below this
    crossval_max_contradiction_auc: float = 0.5
    crossval_require_model: bool = False  # a bank that refuses to share its local model is excluded
    # Cross-evaluation's histograms only as masked sums (aggregator/protocol/secure_crossval.py): each model pooled
    # at every other bank. Off: clear per-bank reports (and the per-holdout contradiction rule).
    crossval_masked: bool = True
    champion_gate: bool = True  # a first champion must beat the best single-bank local model (pooled)
    # Compaction (aggregator/compaction.py; bagging): each round the banks score the model without its
    # weakest earlier trees; the round keeps the largest drop whose pooled AUPRC loss, in every pool that
    # leaves one bank out, is within the tolerance (README "Compaction").
    compaction: bool = False
    compaction_tolerance: float = 0.002
    compaction_steps: int = 8  # drop sizes scored per round (a geometric ladder)
    compaction_max_fraction: float = 0.9  # at most this share of the earlier rounds' trees dropped per round
    compaction_new_trees: bool = False  # the round's own trees may be dropped too (only earlier rounds' when off)
    # compaction_tolerance is a budget for the whole federation: a round may lose what earlier rounds left
    # of it (their positive losses add up), so losses cannot accumulate beyond it; off: per round (they can)
    compaction_budget: bool = True
    # Leaf refit (aggregator/protocol/refit.py; bagging): in every round that is a multiple of
    # compaction_refit_every, each bank's block of trees keeps its first compaction_refit_keep share and every
    # kept leaf is refitted by compaction_refit_steps damped Newton steps (-eta/trees * G / (H + lambda)) on the
    # banks' per-leaf loss sums, masked (README "Compaction"). Off unless chosen; independent of ``compaction``.
    compaction_refit: bool = False
    compaction_refit_every: int = 10
    compaction_refit_keep: float = 0.5
    compaction_refit_steps: int = 16
    compaction_refit_eta: float = 1.0
    compaction_refit_lambda: float = 1.0

    def __post_init__(self) -> None:
        for name in SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, not {getattr(self, name)!r}")
        delta = self.acceptance_delta
        if not (delta is None or delta == "auto" or _number_in(delta, 0, 1)):
            raise ValueError(f"acceptance_delta must be \"auto\", null or a number in [0, 1), not {delta!r}")
        if not (_number_in(self.acceptance_z, 0, 10) and self.acceptance_z > 0):
            raise ValueError(f"acceptance_z must be a number in (0, 10), not {self.acceptance_z!r}")
        if not _number_in(self.acceptance_delta_floor, 0, 1):
            raise ValueError(f"acceptance_delta_floor must be in [0, 1), not {self.acceptance_delta_floor!r}")
        panel = self.acceptance_evaluators
        if not (panel is None or (isinstance(panel, int) and _number_in(panel, 1, 10_001))):
            raise ValueError(f"acceptance_evaluators must be null or an integer in 1..10000, not {panel!r}")
        if not _number_in(self.compaction_tolerance, 0, 1):
            raise ValueError(f"compaction_tolerance must be in [0, 1), not {self.compaction_tolerance!r}")
        if not (_number_in(self.compaction_steps, 1, 33) and isinstance(self.compaction_steps, int)):
            raise ValueError(f"compaction_steps must be an integer in 1..32, not {self.compaction_steps!r}")
        if not (_number_in(self.compaction_max_fraction, 0, 2) and 0 < self.compaction_max_fraction <= 1):
            raise ValueError(f"compaction_max_fraction must be in (0, 1], not {self.compaction_max_fraction!r}")
        for name, low, high in (("compaction_refit_every", 1, 10_001), ("compaction_refit_steps", 1, 257)):
            value = getattr(self, name)
            if not (isinstance(value, int) and _number_in(value, low, high)):
                raise ValueError(f"{name} must be an integer in {low}..{high - 1}, not {value!r}")
        if not (_number_in(self.compaction_refit_keep, 0, 2) and 0 < self.compaction_refit_keep <= 1):
            raise ValueError(f"compaction_refit_keep must be in (0, 1], not {self.compaction_refit_keep!r}")
        if not (_number_in(self.compaction_refit_eta, 0, 11) and self.compaction_refit_eta > 0):
            raise ValueError(f"compaction_refit_eta must be in (0, 10], not {self.compaction_refit_eta!r}")
        if not (_number_in(self.compaction_refit_lambda, 0, 1e6) and self.compaction_refit_lambda > 0):
            raise ValueError(f"compaction_refit_lambda must be in (0, 1e6), not {self.compaction_refit_lambda!r}")

    def as_params(self) -> dict[str, Any]:
        return asdict(self)


SWITCHES = ("acceptance", "acceptance_masked", "crossval", "crossval_masked", "crossval_require_model",
            "champion_gate", "compaction", "compaction_new_trees", "compaction_budget", "compaction_refit")
# What one federation may choose (a service request, a DAG run); every other setting is the consortium's default.
REQUEST_OPTIONS = ("crossval", "crossval_masked", "champion_gate", "acceptance", "acceptance_masked",
                   "acceptance_delta", "acceptance_z", "acceptance_delta_floor", "acceptance_evaluators",
                   "compaction", "compaction_tolerance", "compaction_steps", "compaction_max_fraction",
                   "compaction_new_trees",
                   "compaction_budget", "compaction_refit", "compaction_refit_every", "compaction_refit_keep",
                   "compaction_refit_steps", "compaction_refit_eta", "compaction_refit_lambda")


def requested_settings(trees_per_round: int, min_banks: int, options: dict[str, Any]) -> FederationSettings:
    """The settings of one federation from its request's options; an unknown option or a value out of
    its range is refused by name (``ValueError``), never ignored."""
    unknown = sorted(set(options) - set(REQUEST_OPTIONS))
    if unknown:
        raise ValueError(f"unknown federation option(s) {unknown}; a request may set {list(REQUEST_OPTIONS)}")
    return FederationSettings(trees_per_round=trees_per_round, min_banks=min_banks, **options)


def requested_options(settings: FederationSettings) -> dict[str, Any]:
    """The request options of ``settings``, every one spelled out (a stored request compares equal)."""
    return {name: getattr(settings, name) for name in REQUEST_OPTIONS}


def _number_in(value: Any, low: float, high: float) -> bool:
    """A real number (not a bool) in [low, high)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value < high)


def scale_pos_weight(positives: int, negatives: int, imbalance: str) -> float:
    """Weight of a fraud row, from the consortium's summed counts (never one bank's alone)."""
    if imbalance == "none" or positives == 0:
        return 1.0
    ratio = negatives / positives
    return {"ratio": ratio, "sqrt": math.sqrt(ratio)}[imbalance]


def consortium_params(settings: FederationSettings, positives: int, negatives: int) -> dict[str, Any]:
    """XGBoost parameters every bank trains with in a federation (the seed is added per task).

    ``base_score`` is set deliberately from the consortium's weighted fraud rate and is the
    same at every bank: XGBoost's automatic estimate differs per bank and, at ~0.2% positives,
    makes early trees overshoot.
    """
    weight = scale_pos_weight(positives, negatives, settings.imbalance)
    weighted_positives = positives * weight
    base_score = weighted_positives / (weighted_positives + negatives) if positives + negatives else 0.5
    return {
        "max_depth": settings.max_depth,
        "eta": settings.learning_rate,
        "subsample": settings.subsample,
        "colsample_bytree": settings.colsample_bytree,
        "min_child_weight": settings.min_child_weight,
        "max_bin": settings.max_bin,
        "scale_pos_weight": weight,
        "base_score": min(max(base_score, 1e-6), 1 - 1e-6),
    }


def derive_seed(seed: int, round_id: int, bank_index: int) -> int:
    """A different seed per round and bank: with column subsampling a fixed seed would pick the
    same feature subsets every round (measured: bagging AUPRC 0.48 fixed vs 0.75 varied)."""
    return (seed * 1_000_003 + round_id * 10_007 + bank_index * 101) % (2**31 - 1)
