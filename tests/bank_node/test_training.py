"""Local training and the outgoing update: warm start, new trees only, no pickle, determinism."""

from __future__ import annotations

import json

import numpy as np
import xgboost as xgb
from conftest import TOY_FEATURES

from fedfraud.settings import FederationSettings, consortium_params
from bank_node.training import build_update, dmatrix, train_trees
from fedfraud import model_json
from fedfraud.wire import ModelUpdate, TrainTask

PARAMS = {**consortium_params(FederationSettings(max_depth=3), 50, 500), "seed": 1}


def task(base=None, trees=4, round_id=1):
    return TrainTask(bank="alpha", round_id=round_id, base_model_id=model_json.model_id(base), contract_hash="h",
                     num_trees=trees, params=PARAMS, base_model=base)


def test_warm_start_continues_the_global_model(toy_banks):
    X, y = toy_banks["alpha"]
    first = train_trees(task(trees=3), X, y, TOY_FEATURES)
    global_doc = model_json.to_doc(first)
    grown = train_trees(task(base=global_doc, trees=4, round_id=2), X, y, TOY_FEATURES)
    assert grown.num_boosted_rounds() == 7
    d = xgb.DMatrix(X, feature_names=TOY_FEATURES)
    # The first three trees are the global model's, untouched.
    np.testing.assert_array_equal(grown.predict(d, iteration_range=(0, 3), output_margin=True),
                                  first.predict(d, output_margin=True))
    # Warm starting improves the training fit over the global model alone.
    loss = lambda b: -np.mean(y * np.log(b.predict(d)) + (1 - y) * np.log(1 - b.predict(d)))  # noqa: E731
    assert loss(grown) < loss(first)


def test_update_carries_new_trees_only_as_json(toy_banks):
    X, y = toy_banks["alpha"]
    global_doc = model_json.to_doc(train_trees(task(trees=3), X, y, TOY_FEATURES))
    t = task(base=global_doc, trees=4, round_id=2)
    update = build_update(t, train_trees(t, X, y, TOY_FEATURES), {"train_rows": len(y)}, {"auprc": 0.3})
    data = update.to_bytes()
    parsed = json.loads(data)  # plain JSON, nothing to unpickle
    assert parsed["bank"] == "alpha" and parsed["round_id"] == 2 and parsed["base_model_id"] == t.base_model_id
    assert len(model_json.trees(parsed["model"])) == 4
    assert all(set(tr["sum_hessian"]) == {0.0} for tr in model_json.trees(parsed["model"]))
    assert ModelUpdate.from_bytes(data) == update


def test_same_task_gives_the_same_trees(toy_banks):
    X, y = toy_banks["beta"]
    a = model_json.to_doc(train_trees(task(), X, y, TOY_FEATURES))
    b = model_json.to_doc(train_trees(task(), X, y, TOY_FEATURES))
    assert model_json.model_id(a) == model_json.model_id(b)


def test_base_score_comes_from_the_task(toy_banks):
    X, y = toy_banks["alpha"]
    booster = train_trees(task(trees=1), X, y, TOY_FEATURES)
    doc = model_json.to_doc(booster)
    assert float(doc["learner"]["learner_model_param"]["base_score"].strip("[]")) == np.float32(PARAMS["base_score"])
    assert booster.predict(dmatrix(X, None, TOY_FEATURES)).shape == (len(X),)
