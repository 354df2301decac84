"""Federated evaluation: combine banks' metrics and score histograms into consortium figures.

The aggregator never sees a score: pooled AUPRC and recall come from summed histograms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfraud.scores import average_precision, pr_curve, recall_at_fpr
from fedfraud.wire import EvaluationReport


@dataclass(frozen=True)
class FederatedEvaluation:
    per_bank: dict[str, dict[str, float]]
    pooled: dict[str, float]
    histograms: dict[str, tuple[np.ndarray, np.ndarray]]  # per bank and "pooled"


def precision_at_budget(pos_hist: np.ndarray, neg_hist: np.ndarray, budget: float) -> float:
    """Precision of the highest-scoring bins that hold at least ``budget`` of all rows."""
    precision, _ = pr_curve(pos_hist, neg_hist)
    flagged = np.cumsum((np.asarray(pos_hist) + np.asarray(neg_hist))[::-1])
    reached = np.nonzero(flagged >= budget * flagged[-1])[0]
    return float(precision[reached[0]]) if len(reached) else 0.0


def combine(reports: list[EvaluationReport], alert_budget: float) -> FederatedEvaluation:
    """Per-bank metrics as reported, plus pooled metrics from the summed histograms."""
    histograms = {r.bank: (np.asarray(r.hist_pos), np.asarray(r.hist_neg)) for r in reports}
    pos = np.sum([h[0] for h in histograms.values()], axis=0)
    neg = np.sum([h[1] for h in histograms.values()], axis=0)
    pooled = {
        "auprc": average_precision(pos, neg),
        "recall_at_1pct_fpr": recall_at_fpr(pos, neg, 0.01),
        "precision_at_budget": precision_at_budget(pos, neg, alert_budget),
        "positives": float(pos.sum()),
        "negatives": float(neg.sum()),
    }
    return FederatedEvaluation(
        per_bank={r.bank: dict(r.metrics) for r in reports},
        pooled=pooled,
        histograms={**histograms, "pooled": (pos, neg)},
    )
