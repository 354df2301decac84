"""Update checks: every rejection is named; good updates pass, rebuilt inside the consortium header."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import TOY_FEATURES

from aggregator.checks import RoundContext, screen
from fedfraud.model_guard import ModelLimits, consortium_header
from fedfraud.settings import FederationSettings, consortium_params
from aggregator.strategies import Bagging
from bank_node.training import build_update, train_trees
from fedfraud import model_json

SETTINGS = FederationSettings(trees_per_round=2, max_depth=2)
PARAMS = consortium_params(SETTINGS, 50, 500)
HEADER = consortium_header(TOY_FEATURES, PARAMS)


@pytest.fixture(scope="module")
def good(toy_banks):
    strategy = Bagging(SETTINGS, seed=0, consortium_params=PARAMS)
    task = strategy.configure(1, "alpha", 0, None, "contract-1")
    X, y = toy_banks["alpha"]
    return build_update(task, train_trees(task, X, y, TOY_FEATURES), {"train_rows": len(y)}, {})


CTX = RoundContext(round_id=1, contract_hash="contract-1", base_model_id="none",
                   expected_banks=frozenset({"alpha", "beta"}), limits=ModelLimits.for_depth(2, max_trees=10),
                   header=HEADER)


def rejected(received, ctx=CTX):
    accepted, rejections = screen(received, ctx)
    return [r.check for r in rejections], accepted


def test_good_update_passes_rebuilt(good):
    checks, accepted = rejected({"alpha": good.to_bytes()})
    assert checks == [] and [u.bank for u in accepted] == ["alpha"]
    assert accepted[0].model["learner"]["learner_model_param"] == HEADER.document([])["learner"]["learner_model_param"]


def with_leaf(update, value):
    model = json.loads(json.dumps(update.model))
    tree = model_json.trees(model)[0]
    leaf = tree["left_children"].index(-1)
    tree["split_conditions"][leaf] = value
    return dataclasses.replace(update, model=model)


def with_param(update, key, value):
    model = json.loads(json.dumps(update.model))
    model["learner"]["learner_model_param"][key] = value
    return dataclasses.replace(update, model=model)


@pytest.mark.parametrize(
    "change, check",
    [
        (lambda u: dataclasses.replace(u, round_id=2), "wrong_round"),
        (lambda u: dataclasses.replace(u, contract_hash="other"), "feature_contract"),
        (lambda u: dataclasses.replace(u, base_model_id="0123abcd"), "stale_update"),
        (lambda u: with_leaf(u, 1e39), "not_finite"),  # finite in float64, inf in float32
        (lambda u: with_leaf(u, 1e3), "leaf_out_of_range"),
        (lambda u: with_param(u, "base_score", "[9.99E-1]"), "header_mismatch"),  # a bank's own header
        (lambda u: with_param(u, "num_feature", "7"), "header_mismatch"),
    ],
)
def test_each_bad_update_is_rejected_by_name(good, change, check):
    assert rejected({"alpha": change(good).to_bytes()})[0] == [check]


def test_non_finite_leaves_never_parse(good):
    for value in ("NaN", "Infinity"):
        data = with_leaf(good, 0.123456789).to_bytes().replace(b"0.123456789", value.encode())
        assert rejected({"alpha": data})[0] == ["not_finite"]


def test_round_limits(good):
    assert rejected({"alpha": good.to_bytes()}, dataclasses.replace(
        CTX, limits=ModelLimits.for_depth(2, max_trees=1)))[0] == ["too_many_trees"]
    assert rejected({"alpha": good.to_bytes()}, dataclasses.replace(
        CTX, limits=dataclasses.replace(CTX.limits, max_depth=1)))[0] == ["too_deep"]
    assert rejected({"alpha": good.to_bytes()}, dataclasses.replace(
        CTX, limits=ModelLimits.for_depth(2, max_trees=10, max_bytes=100)))[0] == ["too_large"]


def test_wire_problems_are_rejected(good):
    data = good.to_bytes()
    assert rejected({"alpha": data[: len(data) // 2]})[0] == ["malformed"]
    assert rejected({"alpha": b"[" * 20_000})[0] == ["malformed"]  # nested too deeply


def test_identity_duplicate_and_unexpected(good):
    assert rejected({"beta": good.to_bytes()})[0] == ["wrong_sender"]  # claims alpha, sent by beta
    assert rejected({"alpha": good.to_bytes()}, dataclasses.replace(CTX, accepted_before=frozenset({"alpha"})))[0] == [
        "duplicate_update"]
    assert rejected({"alpha": good.to_bytes()}, dataclasses.replace(CTX, expected_banks=frozenset({"beta"})))[0] == [
        "unexpected_bank"]


def test_counts_must_be_the_planned_ones(good):
    ctx = dataclasses.replace(CTX, counts={"alpha": {"train_rows": good.counts["train_rows"]}})
    assert rejected({"alpha": good.to_bytes()}, ctx)[0] == []
    claimed = dataclasses.replace(good, counts={"train_rows": good.counts["train_rows"] * 10 ** 6})
    assert rejected({"alpha": claimed.to_bytes()}, ctx)[0] == ["counts_mismatch"]


def test_malformed_model_document_is_rejected(good):
    broken = dataclasses.replace(good, model={"learner": {}})
    checks, accepted = rejected({"alpha": broken.to_bytes()})
    assert checks == ["malformed"] and not accepted
