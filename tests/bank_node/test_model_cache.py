"""A bank's model cache and models by reference, on real nodes with toy data: a model sent by reference is the full
model (same hash, same predictions, the same answers), a bank without the base says so by name, and a reference whose
rebuilt model is hostile is refused by the bank's ordinary checks, by name, and never kept."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import xgboost as xgb
from conftest import TOY_FEATURES, with_toy_data

from bank_node.model_cache import ModelCache, model_cache
from bank_node.node import BankNode
from bank_node.policy import TaskRefused
from fedfraud import model_json, model_refs
from fedfraud.crosscheck import ScoreQuestion
from fedfraud.model_guard import ModelLimits, ModelRefused, consortium_header, parse_received_model, rebuild_model
from fedfraud.model_refs import ModelReferenceRefused, canonical, content_hash
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import ModelUpdate, TrainTask

PARAMS = {**consortium_params(FederationSettings(max_depth=3), 50, 500), "seed": 1}
HEADER = consortium_header(TOY_FEATURES, PARAMS)
LIMITS = ModelLimits.accepted()


def node_for(tmp_path, toy_banks, name="alpha") -> BankNode:
    return with_toy_data(BankNode(name, tmp_path / name, tmp_path / "banks" / name, config=None), *toy_banks[name])


def train_task(base, trees=3, bank="alpha") -> TrainTask:
    return TrainTask(bank=bank, round_id=1, base_model_id=model_json.model_id(base), contract_hash="h",
                     num_trees=trees, params=PARAMS, base_model=base)


@pytest.fixture(scope="module")
def models(toy_banks, tmp_path_factory):
    """A base of 4 trees and the model grown from it by 3 more, as the aggregator holds them (rebuilt)."""
    node = node_for(tmp_path_factory.mktemp("grow"), toy_banks, "beta")
    first = ModelUpdate.from_bytes(node.train(train_task(None, 4, "beta").to_bytes())).model
    base = rebuild_model(first, LIMITS, HEADER)
    more = ModelUpdate.from_bytes(node.train(train_task(base, 3, "beta").to_bytes())).model
    return base, rebuild_model(model_json.append_trees(base, more), LIMITS, HEADER)


def question(doc) -> bytes:
    return ScoreQuestion(1, "accept", {"with_all": {"model": "candidate", "drop": []},
                                       "without": {"model": "candidate", "drop": [4, 5, 6]}},
                         {"candidate": doc}).to_bytes()


def by_reference(message: bytes, base, full, **change) -> bytes:
    """``message`` with its model (``full``) sent as a reference to ``base`` plus the new trees."""
    parsed = json.loads(message)
    [(holder, key)] = model_refs.model_slots(parsed)
    ref = model_refs.reference(full, len(model_json.trees(base)), content_hash(model_json.to_bytes(base)))
    holder[key] = {**ref, **change}
    return canonical({"by_reference": 1, "message": parsed})


def test_a_model_by_reference_is_the_full_model(tmp_path, toy_banks, models):
    base, full = models
    node, fresh = node_for(tmp_path, toy_banks), node_for(tmp_path / "fresh", toy_banks)
    node.score(question(base))  # the bank validated the base: kept
    assert content_hash(model_json.to_bytes(base)) in model_cache(node)
    sent = by_reference(question(full), base, full)
    assert len(sent) < len(question(full)) / 2
    assert node.score(sent) == fresh.score(question(full))  # the same reports as the full question's
    full_sha = content_hash(model_json.to_bytes(full))
    rebuilt = model_cache(node).get(full_sha)  # kept once validated: the rebuilt model, by its hash
    assert rebuilt == model_json.to_bytes(full)
    X = xgb.DMatrix(toy_banks["alpha"][0], feature_names=TOY_FEATURES)
    predict = lambda raw: model_json.to_booster(parse_received_model(raw, LIMITS, TOY_FEATURES)).predict(X)  # noqa: E731
    np.testing.assert_array_equal(predict(rebuilt), predict(model_json.to_bytes(full)))
    # a training task by reference: the same update as from the full task (the base validated and kept first)
    task = train_task(full).to_bytes()
    assert node.train(by_reference(task, full, full)) == fresh.train(task)


def test_a_bank_without_the_base_refuses_by_name_and_logs_it(tmp_path, toy_banks, models, caplog):
    base, full = models
    node = node_for(tmp_path, toy_banks)
    with caplog.at_level(logging.WARNING, logger="fedfraud.bank"), pytest.raises(ModelReferenceRefused) as refused:
        node.score(by_reference(question(full), base, full))
    assert refused.value.check == "model_base_unknown"
    assert "refused by model_base_unknown" in caplog.text
    with pytest.raises(ModelReferenceRefused, match="^model_base_unknown"):
        node.train(by_reference(train_task(full).to_bytes(), base, full))
    node.score(question(full))  # then the full model, as the aggregator resends it
    assert content_hash(model_json.to_bytes(full)) in model_cache(node)


def test_a_wrong_hash_or_tree_count_is_refused_by_name(tmp_path, toy_banks, models):
    base, full = models
    node = node_for(tmp_path, toy_banks)
    node.score(question(base))
    with pytest.raises(ModelReferenceRefused, match="^model_hash_mismatch"):
        node.score(by_reference(question(full), base, full, model_sha256=content_hash(b"another model")))
    with pytest.raises(ModelReferenceRefused, match="^model_base_trees_mismatch"):
        node.score(by_reference(question(full), base, full, base_trees=5))
    with pytest.raises(ModelReferenceRefused, match="^model_hash_mismatch"):  # a tree left out
        node.train(by_reference(train_task(full).to_bytes(), base, full,
                                append=model_json.trees(full)[4:6]))


def hostile(full, change) -> dict:
    doc = copy.deepcopy(full)
    change(model_json.trees(doc)[-1])
    return doc


def _inf_leaf(tree):
    leaf = tree["left_children"].index(-1)
    tree["split_conditions"][leaf] = 1e39  # finite in float64, inf in float32


def _cycle(tree):
    inner = [n for n, child in enumerate(tree["left_children"]) if child != -1]
    tree["left_children"][inner[-1]] = inner[0]  # a child pointing back up


@pytest.mark.parametrize("change, check", [
    (lambda tree: tree["split_indices"].__setitem__(0, 99), "split_index_out_of_range"),
    (_cycle, "cycle_or_shared_node"),
    (_inf_leaf, "not_finite"),
])
def test_appended_trees_that_break_validation_are_refused_by_the_ordinary_checks(tmp_path, toy_banks, models,
                                                                                 change, check):
    """The hostile aggregator declares the right hash of its hostile model: only the bank's checks stop it."""
    base, full = models
    node = node_for(tmp_path, toy_banks)
    node.score(question(base))
    bad = hostile(full, change)
    with pytest.raises(ModelRefused) as refused:
        node.score(by_reference(question(bad), base, bad))
    assert refused.value.check in (check, "child_out_of_range")
    with pytest.raises(TaskRefused) as refused_task:
        node.train(by_reference(train_task(bad).to_bytes(), base, bad))
    assert str(refused_task.value).startswith("base_model_")
    assert content_hash(model_json.to_bytes(bad)) not in model_cache(node)  # never kept


def test_the_cache_is_bounded_in_entries_and_bytes():
    cache = ModelCache(entries=2, max_bytes=100)
    a, b, c = (cache.keep(bytes([i]) * 30) for i in range(3))
    assert a not in cache and b in cache and c in cache and len(cache) == 2  # least recently used out
    cache.get(b)
    d = cache.keep(b"d" * 60)  # 90 bytes: c (least recently used) goes, b stays
    assert c not in cache and b in cache and d in cache and cache.size() == 90
    big = cache.keep(b"x" * 101)  # over the byte bound: not kept, nothing evicted for it
    assert big not in cache and len(cache) == 2
    cache.keep(b"e" * 50)
    assert cache.size() <= 100
