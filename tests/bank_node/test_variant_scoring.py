"""A question's variants scored from one pass per model agree with scoring each reduced model on its own."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOY_FEATURES, with_toy_data

from bank_node.node import BankNode
from bank_node.training import dmatrix
from bank_node.variant_scoring import variant_scores
from fedfraud import model_json
from fedfraud.crosscheck import ScoreQuestion
from fedfraud.model_guard import ModelRefused
from fedfraud.scores import score_histograms
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import EvaluationReport

PARAMS = {**consortium_params(FederationSettings(max_depth=3), 50, 500), "seed": 1}


@pytest.fixture
def node(toy_banks, tmp_path):
    return with_toy_data(BankNode("alpha", tmp_path / "raw", tmp_path / "bank", config=None), *toy_banks["alpha"])


def _model(node, trees: int, seed: int = 1) -> dict:
    return model_json.to_doc(node.fit_local({**PARAMS, "seed": seed}, trees))


def test_every_variant_scores_as_its_reduced_model(node):
    full, other = _model(node, 9), _model(node, 4, seed=2)
    variants = {"all": {"model": "m"}, "no_block_0": {"model": "m", "drop": [0, 1, 2]},
                "no_block_1": {"model": "m", "drop": [3, 4, 5]}, "pair": {"model": "m", "drop": [0, 1, 2, 6, 7, 8]},
                "absent_index": {"model": "m", "drop": [8, 40, -1]}, "other": {"model": "o"}}
    question = ScoreQuestion(1, "accept", variants, {"m": full, "o": other})

    scored = variant_scores(node, question)

    assert list(scored) == sorted(variants)
    labels = node.data.y_holdout
    for label, (_, scores) in scored.items():
        reduced = question.variant(label)
        expected = EvaluationReport.from_bytes(node.evaluate(model_json.to_bytes(reduced)))
        direct = model_json.to_booster(reduced).predict(dmatrix(node.data.X_holdout, None, TOY_FEATURES))
        np.testing.assert_allclose(scores, direct, atol=1e-6)
        pos, neg = score_histograms(scores, labels)
        assert pos.tolist() == expected.hist_pos and neg.tolist() == expected.hist_neg, label
    assert scored["all"][0] is not None and scored["pair"][0] is None  # the whole model's document is kept


def test_scores_do_not_depend_on_what_the_bank_scored_before(node, toy_banks, tmp_path):
    grown = _model(node, 12)
    prefix = model_json.to_doc(model_json.to_booster(grown)[:7])  # the first 7 trees: a stage earlier
    asked = ScoreQuestion(2, "accept", {"all": {"model": "m"}, "without": {"model": "m", "drop": [2, 8, 9]}},
                          {"m": grown})
    variant_scores(node, ScoreQuestion(1, "accept", {"all": {"model": "m"}}, {"m": prefix}))
    after_prefix = variant_scores(node, asked)  # 7 trees from the cache, 5 scored now
    fresh = with_toy_data(BankNode("alpha", tmp_path / "raw2", tmp_path / "bank2", config=None), *toy_banks["alpha"])
    for label, (_, scores) in variant_scores(fresh, asked).items():
        np.testing.assert_array_equal(after_prefix[label][1], scores)  # bit for bit: the same sums in the same order
    assert len(node.__dict__["_margin_cache"][1]._kept) == 2


def test_a_refused_model_refuses_the_question(node):
    doc = _model(node, 3)
    model_json.trees(doc)[0]["split_indices"][0] = 99  # a split on a feature the contract does not have
    with pytest.raises(ModelRefused):
        variant_scores(node, ScoreQuestion(1, "accept", {"v": {"model": "m", "drop": [0]}}, {"m": doc}))
