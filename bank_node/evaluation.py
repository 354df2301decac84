"""Local evaluation: a model's quality on the bank's own holdout, shared as metrics and histograms."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from fedfraud.scores import score_histograms
from fedfraud.wire import EvaluationReport

DEFAULT_ALERT_BUDGET = 0.005  # share of transactions the fraud team can review


def holdout_metrics(
    scores: np.ndarray, labels: np.ndarray, alert_budget: float = DEFAULT_ALERT_BUDGET
) -> dict[str, float]:
    """AUPRC, ROC-AUC, recall at 1% false-positive rate, precision in the top ``alert_budget``."""
    labels = np.asarray(labels).astype(int)
    if labels.min(initial=0) == labels.max(initial=0):
        return {
            "auprc": float("nan"),
            "roc_auc": float("nan"),
            "recall_at_1pct_fpr": float("nan"),
            "precision_at_budget": float("nan"),
        }
    fpr, tpr, _ = roc_curve(labels, scores)
    alerts = max(1, math.ceil(alert_budget * len(scores)))
    top = np.argsort(-scores, kind="stable")[:alerts]
    return {
        "auprc": float(average_precision_score(labels, scores)),
        "roc_auc": float(roc_auc_score(labels, scores)),
        "recall_at_1pct_fpr": float(tpr[fpr <= 0.01].max(initial=0.0)),
        "precision_at_budget": float(labels[top].mean()),
    }


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics that are defined (a one-class holdout has no AUPRC): the wire refuses NaN."""
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def evaluation_report(
    bank: str, model_id: str, scores: np.ndarray, labels: np.ndarray, alert_budget: float = DEFAULT_ALERT_BUDGET
) -> EvaluationReport:
    pos, neg = score_histograms(scores, labels)
    return EvaluationReport(
        bank=bank,
        model_id=model_id,
        positives=int(np.sum(labels)),
        negatives=int(len(labels) - np.sum(labels)),
        metrics=holdout_metrics(scores, labels, alert_budget),
        hist_pos=pos.tolist(),
        hist_neg=neg.tolist(),
    )
