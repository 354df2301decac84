"""Model JSON helpers: slicing, scrubbing, scaling and appending keep predictions exact."""

from __future__ import annotations

import numpy as np
import xgboost as xgb
from conftest import TOY_FEATURES

from fedfraud import model_json

PARAMS = {"objective": "binary:logistic", "max_depth": 3, "base_score": 0.2, "tree_method": "hist", "seed": 3}


def margin(booster, X):
    return booster.predict(xgb.DMatrix(X, feature_names=TOY_FEATURES), output_margin=True)


def fit(X, y, rounds, base=None, **extra):
    return xgb.train({**PARAMS, **extra}, xgb.DMatrix(X, label=y, feature_names=TOY_FEATURES), rounds, xgb_model=base)


def test_new_trees_only_and_scrub_keep_predictions(toy_banks):
    X, y = toy_banks["alpha"]
    base = fit(X, y, 3)
    grown = fit(X, y, 4, base=base)
    new = model_json.new_trees_only(grown, 3)
    scrubbed = model_json.scrub_training_stats(model_json.new_trees_only(grown, 3))
    assert len(model_json.trees(new)) == 4
    for tree in model_json.trees(scrubbed):
        assert set(tree["sum_hessian"]) == {0.0} and set(tree["loss_changes"]) == {0.0}
    base_margin = np.log(0.2 / 0.8)
    expected = margin(grown, X) - margin(base, X)
    np.testing.assert_allclose(margin(model_json.to_booster(scrubbed), X) - base_margin, expected, atol=1e-5)
    np.testing.assert_array_equal(margin(model_json.to_booster(scrubbed), X), margin(model_json.to_booster(new), X))


def test_scale_and_append_equal_the_weighted_sum(toy_banks):
    X, y = toy_banks["beta"]
    base = fit(X, y, 2)
    a, b = fit(X, y, 3, base=base, seed=5, subsample=0.7), fit(X, y, 3, base=base, seed=9, subsample=0.7)
    merged = model_json.append_trees(
        model_json.to_doc(base),
        model_json.scale_leaves(model_json.new_trees_only(a, 2), 0.25),
        model_json.scale_leaves(model_json.new_trees_only(b, 2), 0.75),
    )
    booster = model_json.to_booster(merged)
    assert booster.num_boosted_rounds() == 8
    expected = margin(base, X) + 0.25 * (margin(a, X) - margin(base, X)) + 0.75 * (margin(b, X) - margin(base, X))
    np.testing.assert_allclose(margin(booster, X), expected, atol=1e-5)


def test_empty_like_keeps_base_score_only(toy_banks):
    X, y = toy_banks["alpha"]
    empty = model_json.to_booster(model_json.empty_like(model_json.to_doc(fit(X, y, 2))))
    assert empty.num_boosted_rounds() == 0
    np.testing.assert_allclose(margin(empty, X), np.log(0.2 / 0.8), rtol=1e-6)


def test_model_id_is_a_content_hash(toy_banks):
    X, y = toy_banks["alpha"]
    doc = model_json.to_doc(fit(X, y, 2))
    assert model_json.model_id(doc) == model_json.model_id(model_json.to_doc(model_json.to_booster(doc)))
    assert model_json.model_id(doc) != model_json.model_id(model_json.scale_leaves(doc, 0.5))
    assert model_json.model_id(None) == "none"


def test_append_and_empty_leave_their_inputs_as_they_were(toy_banks):
    """append_trees shares tree bodies instead of copying the forest (a cyclic turn must not cost O(model)),
    so it must never write into its inputs; empty_like's result is a copy of everything it keeps."""
    X, y = toy_banks["alpha"]
    base, more = model_json.to_doc(fit(X, y, 2)), model_json.to_doc(fit(X, y, 3, seed=4))
    before = model_json.to_bytes(base), model_json.to_bytes(more)
    merged = model_json.append_trees(base, more, more)
    assert (model_json.to_bytes(base), model_json.to_bytes(more)) == before
    assert [t["id"] for t in model_json.trees(merged)] == list(range(8))
    assert [t["id"] for t in model_json.trees(more)] == [0, 1, 2]
    empty = model_json.empty_like(merged)
    empty["learner"]["learner_model_param"]["base_score"] = "0.9"
    assert model_json.to_bytes(base) == before[0] and len(model_json.trees(merged)) == 8
