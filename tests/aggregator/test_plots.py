"""Round charts: each writes a valid PNG."""

from __future__ import annotations

import numpy as np
import pytest
import xgboost

from aggregator import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, returned) -> None:
    assert returned == path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 2000  # an actual chart, not an empty image


@pytest.fixture(scope="module")
def booster() -> xgboost.Booster:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 1] - x[:, 3] + rng.normal(scale=0.5, size=200) > 0).astype(int)
    return xgboost.train({"objective": "binary:logistic", "max_depth": 2}, xgboost.DMatrix(x, label=y), 3)


def test_pr_curves_png(tmp_path):
    rng = np.random.default_rng(1)
    histograms = {bank: (rng.integers(0, 5, 1000), rng.integers(0, 40, 1000)) for bank in ("bank_a", "bank_b")}
    histograms["pooled"] = (histograms["bank_a"][0] + histograms["bank_b"][0],
                            histograms["bank_a"][1] + histograms["bank_b"][1])
    path = tmp_path / "nested" / "pr.png"
    assert_png(path, plots.pr_curves_png(histograms, path))


def test_metrics_by_round_png(tmp_path):
    history = [{"round": r, "pooled.auprc": 0.3 + 0.1 * r, "bank_a.auprc": 0.2 + 0.1 * r, "pooled.recall": 0.5}
               for r in (1, 2, 3)]
    path = tmp_path / "metrics.png"
    assert_png(path, plots.metrics_by_round_png(history, path))
    empty = tmp_path / "empty.png"
    assert_png(empty, plots.metrics_by_round_png([], empty))


def test_feature_importance_png(tmp_path, booster):
    path = tmp_path / "importance.png"
    assert_png(path, plots.feature_importance_png(booster, ["a", "b", "c", "d", "e"], path, top=3))


def test_default_feature_names_map_to_real_names():
    names = ["amount", "hour", "velocity"]
    assert plots._display_name("f2", names) == "velocity"
    assert plots._display_name("f7", names) == "f7"  # out of range: kept
    assert plots._display_name("hour", names) == "hour"
