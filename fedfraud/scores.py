"""Score histograms: how banks share model quality without sharing a single score.

A bank bins its holdout scores (probabilities in [0, 1]) into ``BINS`` equal bins, separately
for positives and negatives. Summed over banks, the histograms give consortium-wide
precision/recall curves; metrics from them are exact up to ties within a bin.
"""

from __future__ import annotations

import numpy as np

BINS = 1000


def score_histograms(scores: np.ndarray, labels: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """Counts of positive and negative scores per bin (bin i covers [i/bins, (i+1)/bins))."""
    index = np.clip((np.asarray(scores, dtype=np.float64) * bins).astype(np.int64), 0, bins - 1)
    labels = np.asarray(labels).astype(bool)
    pos = np.bincount(index[labels], minlength=bins)
    neg = np.bincount(index[~labels], minlength=bins)
    return pos.astype(np.int64), neg.astype(np.int64)


def pr_curve(pos_hist: np.ndarray, neg_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) at every bin threshold, from the highest threshold down."""
    tp = np.cumsum(np.asarray(pos_hist, dtype=np.float64)[::-1])
    fp = np.cumsum(np.asarray(neg_hist, dtype=np.float64)[::-1])
    total_pos = tp[-1] if len(tp) else 0.0
    flagged = tp + fp
    precision = np.divide(tp, flagged, out=np.ones_like(tp), where=flagged > 0)
    recall = tp / total_pos if total_pos > 0 else np.zeros_like(tp)
    return precision, recall


def average_precision(pos_hist: np.ndarray, neg_hist: np.ndarray) -> float:
    """AUPRC as step-wise average precision over bin thresholds (sklearn's definition)."""
    precision, recall = pr_curve(pos_hist, neg_hist)
    previous = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - previous) * precision))


def recall_at_fpr(pos_hist: np.ndarray, neg_hist: np.ndarray, max_fpr: float = 0.01) -> float:
    """Highest recall at a bin threshold whose false-positive rate is at most ``max_fpr``."""
    tp = np.cumsum(np.asarray(pos_hist, dtype=np.float64)[::-1])
    fp = np.cumsum(np.asarray(neg_hist, dtype=np.float64)[::-1])
    if tp[-1] == 0 or fp[-1] == 0:
        return 0.0
    ok = fp / fp[-1] <= max_fpr
    return float((tp[ok] / tp[-1]).max()) if ok.any() else 0.0
