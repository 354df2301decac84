"""Strategies: bagging and cyclic aggregation are exact; seeds vary by round and bank."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import xgboost as xgb
from conftest import TOY_FEATURES

from fedfraud.settings import FederationSettings, consortium_params, derive_seed
from aggregator.strategies import Bagging, Cyclic
from aggregator.strategies.bagging import capped_shares
from bank_node.training import build_update, train_trees
from fedfraud import model_json
from fedfraud.wire import ModelUpdate

SETTINGS = FederationSettings(trees_per_round=3, max_depth=3, colsample_bytree=0.5)
PARAMS = consortium_params(SETTINGS, positives=100, negatives=1000)


def run_stage(strategy, round_id, global_doc, toy_banks, banks):
    updates = []
    for bank in banks:
        task = strategy.configure(round_id, bank, sorted(toy_banks).index(bank), global_doc, "h")
        X, y = toy_banks[bank]
        booster = train_trees(task, X, y, TOY_FEATURES)
        counts = {"train_rows": len(y)}
        updates.append(ModelUpdate.from_bytes(build_update(task, booster, counts, {}).to_bytes()))
    return updates


def margin(doc, X):
    return model_json.to_booster(doc).predict(xgb.DMatrix(X, feature_names=TOY_FEATURES), output_margin=True)


def test_bagging_margin_is_the_weighted_sum_of_its_parts(toy_banks):
    rows = {bank: len(y) for bank, (_, y) in toy_banks.items()}  # as recorded at planning
    strategy = Bagging(SETTINGS, seed=1, consortium_params=PARAMS, train_rows=rows)
    X = np.concatenate([x for x, _ in toy_banks.values()])
    first = strategy.aggregate(None, run_stage(strategy, 1, None, toy_banks, sorted(toy_banks)))
    updates = run_stage(strategy, 2, first, toy_banks, sorted(toy_banks))
    merged = strategy.aggregate(first, list(reversed(updates)))  # arrival order must not matter
    base = margin(model_json.empty_like(first), X)
    expected = margin(first, X) + sum(rows[u.bank] / sum(rows.values()) * (margin(u.model, X) - base) for u in updates)
    np.testing.assert_allclose(margin(merged, X), expected, atol=1e-5)
    assert len(model_json.trees(merged)) == 2 * 3 * len(toy_banks)
    assert merged == strategy.aggregate(first, updates)


def test_bagging_weights_come_from_the_plan_capped_never_from_an_update(toy_banks):
    strategy = Bagging(SETTINGS, seed=1, consortium_params=PARAMS, train_rows={"alpha": 100, "beta": 100, "gamma": 100})
    updates = run_stage(strategy, 1, None, toy_banks, sorted(toy_banks))
    claimed = [dataclasses.replace(u, counts={"train_rows": 10 ** 12}) if u.bank == "alpha" else u for u in updates]
    assert strategy.weights(claimed) == pytest.approx([1 / 3] * 3)  # the self-report is ignored
    big = Bagging(SETTINGS, seed=1, consortium_params=PARAMS, train_rows={"alpha": 10 ** 6, "beta": 100, "gamma": 300})
    assert big.weights(updates) == pytest.approx([0.5, 0.125, 0.375])  # capped at max_bank_share, rest in proportion


def test_capped_shares():
    assert capped_shares([6, 3, 1], 0.5) == pytest.approx([0.5, 0.375, 0.125])
    assert capped_shares([1, 0], 0.3) == pytest.approx([0.5, 0.5])  # a cap below 1/n acts as 1/n
    assert capped_shares([0, 0], 0.5) == pytest.approx([0.5, 0.5])
    assert capped_shares([98, 1, 1], 0.4) == pytest.approx([0.4, 0.3, 0.3])


def test_uniform_weighting(toy_banks):
    strategy = Bagging(FederationSettings(trees_per_round=2, weighting="uniform"), seed=1, consortium_params=PARAMS)
    updates = run_stage(strategy, 1, None, toy_banks, sorted(toy_banks))
    assert strategy.weights(updates) == pytest.approx([1 / 3] * 3)


def test_cyclic_banks_take_turns_and_margin_adds_up(toy_banks):
    strategy = Cyclic(SETTINGS, seed=1, consortium_params=PARAMS)
    assert strategy.stages(1, ["b", "a", "c"]) == [["a"], ["b"], ["c"]]
    assert strategy.stages(2, ["b", "a", "c"]) == [["b"], ["c"], ["a"]]
    X = np.concatenate([x for x, _ in toy_banks.values()])
    doc, parts = None, []
    for stage in strategy.stages(1, sorted(toy_banks)):
        [update] = run_stage(strategy, 1, doc, toy_banks, stage)
        parts.append(update.model)
        doc = strategy.aggregate(doc, [update], sorted(toy_banks))
    base = margin(model_json.empty_like(doc), X)
    turn = 1 / len(toy_banks)  # each turn's trees are scaled so a round is one step, not B
    np.testing.assert_allclose(margin(doc, X), base + sum(turn * (margin(p, X) - base) for p in parts), atol=1e-5)


def test_seeds_vary_by_round_and_bank():
    seeds = {derive_seed(7, r, b) for r in range(1, 6) for b in range(5)}
    assert len(seeds) == 25
    strategy = Bagging(SETTINGS, seed=7, consortium_params=PARAMS)
    tasks = [strategy.configure(r, "a", 0, None, "h").params["seed"] for r in (1, 2)]
    assert tasks[0] != tasks[1]


def test_same_inputs_give_the_same_model(toy_banks):
    docs = []
    for _ in range(2):
        strategy = Bagging(SETTINGS, seed=3, consortium_params=PARAMS)
        docs.append(strategy.aggregate(None, run_stage(strategy, 1, None, toy_banks, sorted(toy_banks))))
    assert model_json.model_id(docs[0]) == model_json.model_id(docs[1])


def test_consortium_params_share_base_score_and_weight():
    params = consortium_params(FederationSettings(imbalance="ratio"), positives=10, negatives=990)
    assert params["scale_pos_weight"] == pytest.approx(99.0)
    assert params["base_score"] == pytest.approx(0.5)
    sqrt = consortium_params(FederationSettings(), positives=10, negatives=990)
    assert sqrt["scale_pos_weight"] == pytest.approx(99.0 ** 0.5)
