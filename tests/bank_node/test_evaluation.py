"""Local evaluation: metrics match their definitions; reports carry histograms, not scores."""

from __future__ import annotations

import numpy as np
import pytest

from bank_node.evaluation import evaluation_report, holdout_metrics


def test_metrics_on_a_known_ranking():
    labels = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0] * 20)
    scores = np.linspace(1.0, 0.0, len(labels))
    m = holdout_metrics(scores, labels, alert_budget=0.01)
    assert m["precision_at_budget"] == 0.5  # top 2 of 200 rows: labels 1, 0
    assert holdout_metrics(scores, labels, alert_budget=0.005)["precision_at_budget"] == 1.0
    assert 0.0 < m["auprc"] < 1.0 and 0.5 < m["roc_auc"] < 1.0
    perfect = holdout_metrics(labels.astype(float), labels)
    assert perfect["auprc"] == pytest.approx(1.0) and perfect["recall_at_1pct_fpr"] == pytest.approx(1.0)


def test_single_class_holdout_gives_nan_not_an_error():
    assert np.isnan(holdout_metrics(np.array([0.1, 0.2]), np.array([0, 0]))["auprc"])


def test_report_has_histograms_and_counts_only():
    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.1).astype(int)
    report = evaluation_report("alpha", "m1", rng.random(300), labels)
    assert sum(report.hist_pos) == labels.sum() and sum(report.hist_neg) == 300 - labels.sum()
    assert len(report.hist_pos) == 1000 and report.positives == labels.sum()
    assert not hasattr(report, "scores")
