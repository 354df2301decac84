"""Histogram metrics agree with scikit-learn's on exact scores when bins separate the scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from fedfraud.scores import average_precision, recall_at_fpr, score_histograms


@pytest.fixture()
def scored():
    rng = np.random.default_rng(5)
    labels = (rng.random(5000) < 0.05).astype(int)
    # Scores on the bin grid: histograms lose nothing, so the metrics must match exactly.
    scores = (np.clip(rng.normal(0.3 + 0.3 * labels, 0.15), 0, 0.999) * 1000).astype(int) / 1000 + 0.0005
    return scores, labels


def test_average_precision_matches_sklearn(scored):
    scores, labels = scored
    pos, neg = score_histograms(scores, labels)
    assert pos.sum() == labels.sum() and neg.sum() == (1 - labels).sum()
    assert average_precision(pos, neg) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_summed_histograms_pool_banks(scored):
    scores, labels = scored
    a = score_histograms(scores[:2000], labels[:2000])
    b = score_histograms(scores[2000:], labels[2000:])
    pooled = average_precision(a[0] + b[0], a[1] + b[1])
    assert pooled == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_recall_at_fpr(scored):
    scores, labels = scored
    pos, neg = score_histograms(scores, labels)
    threshold_recall = recall_at_fpr(pos, neg, 0.01)
    cut = np.sort(scores[labels == 0])[::-1][int(0.01 * (labels == 0).sum())]
    assert threshold_recall == pytest.approx((scores[labels == 1] > cut).mean(), abs=0.02)
    assert 0.0 < threshold_recall < 1.0
