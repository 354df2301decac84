"""Cross-evaluation and acceptance messages: variants, answers that must agree, histogram metrics."""

from __future__ import annotations

import numpy as np
import pytest
import xgboost as xgb

from fedfraud import crosscheck, model_json
from fedfraud.crosscheck import ScoreAnswer, ScoreQuestion
from fedfraud.scores import BINS, score_histograms
from fedfraud.wire import EvaluationReport, WireFormatError


@pytest.fixture(scope="module")
def doc():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 4)).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.normal(size=300) > 0.5).astype(int)
    booster = xgb.train({"max_depth": 3, "objective": "binary:logistic"}, xgb.DMatrix(X, y), num_boost_round=6)
    return model_json.to_doc(booster), X


def test_a_variant_without_trees_predicts_as_the_model_built_without_them(doc):
    full, X = doc
    question = ScoreQuestion(1, "accept", {"without": {"model": "m", "drop": [3, 4, 5]}}, {"m": full})
    fewer = model_json.to_booster(question.variant("without"))
    expected = model_json.to_booster(full)[:3].predict(xgb.DMatrix(X))
    assert fewer.num_boosted_rounds() == 3
    np.testing.assert_allclose(fewer.predict(xgb.DMatrix(X)), expected, rtol=1e-6)


def test_a_variant_naming_no_model_or_bad_indices_is_refused(doc):
    full, _ = doc
    with pytest.raises(WireFormatError):
        ScoreQuestion(1, "accept", {"v": {"model": "other"}}, {"m": full}).variant("v")
    with pytest.raises(WireFormatError):
        ScoreQuestion(1, "accept", {"v": {"model": "m", "drop": ["0"]}}, {"m": full}).variant("v")


def report(bank, scores, labels):
    pos, neg = score_histograms(scores, labels)
    return EvaluationReport(bank, "id", int(labels.sum()), int(len(labels) - labels.sum()), {},
                            pos.tolist(), neg.tolist())


def test_answers_must_be_well_formed_and_on_one_holdout():
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.1).astype(int)
    good = report("a", rng.random(200), labels).__dict__
    assert set(ScoreAnswer("a", 1, "accept", {"x": good, "y": good}).parsed(["x", "y"])) == {"x", "y"}
    other = report("a", rng.random(150), labels[:150]).__dict__
    bad = [({"x": good}, ["x", "y"]), ({"x": good, "y": other}, ["x", "y"]),
           ({"x": {**good, "hist_pos": [-1] + good["hist_pos"][1:]}}, ["x"]),
           ({"x": {**good, "positives": good["positives"] + 1}}, ["x"]), ({"x": {**good, "bank": "b"}}, ["x"])]
    for reports, labels_asked in bad:
        with pytest.raises(WireFormatError):
            ScoreAnswer("a", 1, "accept", reports).parsed(labels_asked)


def test_histogram_roc_auc_and_no_skill():
    labels = np.array([0] * 90 + [1] * 10)
    perfect, inverted = report("a", labels * 0.9 + 0.05, labels), report("a", (1 - labels) * 0.9 + 0.05, labels)
    assert crosscheck.roc_auc(perfect.hist_pos, perfect.hist_neg) == 1.0
    assert crosscheck.roc_auc(inverted.hist_pos, inverted.hist_neg) == 0.0
    flat = report("a", np.full(100, 0.5), labels)
    assert crosscheck.roc_auc(flat.hist_pos, flat.hist_neg) == 0.5
    assert crosscheck.prevalence([perfect, inverted]) == 0.1 and crosscheck.auprc([perfect]) == 1.0
    assert len(perfect.hist_pos) == BINS
