"""Update checks: every rejection is named; good updates pass."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import TOY_FEATURES

from aggregator.checks import RoundContext, screen
from fedfraud.settings import FederationSettings, consortium_params
from aggregator.strategies import Bagging
from bank_node.training import build_update, train_trees
from fedfraud import model_json


@pytest.fixture(scope="module")
def good(toy_banks):
    settings = FederationSettings(trees_per_round=2, max_depth=2)
    strategy = Bagging(settings, seed=0, consortium_params=consortium_params(settings, 50, 500))
    task = strategy.configure(1, "alpha", 0, None, "contract-1")
    X, y = toy_banks["alpha"]
    return build_update(task, train_trees(task, X, y, TOY_FEATURES), {"train_rows": len(y)}, {})


CTX = RoundContext(round_id=1, contract_hash="contract-1", base_model_id="none", num_feature=6,
                   expected_banks=frozenset({"alpha", "beta"}), max_trees=10, max_bytes=1_000_000)


def rejected(received, ctx=CTX):
    accepted, rejections = screen(received, ctx)
    return [r.check for r in rejections], accepted


def test_good_update_passes(good):
    checks, accepted = rejected({"alpha": good.to_bytes()})
    assert checks == [] and [u.bank for u in accepted] == ["alpha"]


def with_leaf(update, value):
    model = json.loads(json.dumps(update.model))
    tree = model_json.trees(model)[0]
    leaf = tree["left_children"].index(-1)
    tree["split_conditions"][leaf] = value
    return dataclasses.replace(update, model=model)


@pytest.mark.parametrize(
    "change, check",
    [
        (lambda u: dataclasses.replace(u, round_id=2), "wrong_round"),
        (lambda u: dataclasses.replace(u, contract_hash="other"), "feature_contract"),
        (lambda u: dataclasses.replace(u, base_model_id="0123abcd"), "stale_update"),
        (lambda u: with_leaf(u, float("nan")), "non_finite_leaves"),
        (lambda u: with_leaf(u, float("inf")), "non_finite_leaves"),
    ],
)
def test_each_bad_update_is_rejected_by_name(good, change, check):
    assert rejected({"alpha": change(good).to_bytes()})[0] == [check]


def test_tree_count_and_num_feature(good):
    assert rejected({"alpha": good.to_bytes()}, dataclasses.replace(CTX, max_trees=1))[0] == ["tree_count"]
    assert rejected({"alpha": good.to_bytes()}, dataclasses.replace(CTX, num_feature=7))[0] == ["num_feature"]


def test_wire_problems_are_rejected(good):
    data = good.to_bytes()
    assert rejected({"alpha": data[: len(data) // 2]})[0] == ["wire_format"]
    assert rejected({"alpha": data}, dataclasses.replace(CTX, max_bytes=100))[0] == ["wire_format"]


def test_identity_duplicate_and_unexpected(good):
    assert rejected({"beta": good.to_bytes()})[0] == ["wire_format"]  # claims alpha, sent by beta
    assert rejected({"alpha": good.to_bytes()}, dataclasses.replace(CTX, accepted_before=frozenset({"alpha"})))[0] == [
        "duplicate_update"]
    assert rejected({"alpha": good.to_bytes()}, dataclasses.replace(CTX, expected_banks=frozenset({"beta"})))[0] == [
        "unexpected_bank"]


def test_malformed_model_document_is_rejected(good):
    broken = dataclasses.replace(good, model={"learner": {}})
    checks, accepted = rejected({"alpha": broken.to_bytes()})
    assert len(checks) == 1 and not accepted
