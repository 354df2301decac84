"""The bank's side of model_guard: a task outside the bank's policy or with a broken base model is
refused before XGBoost sees it; a model to evaluate is validated first; honest ones still work."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
from conftest import TOY_FEATURES

from bank_node.dataset import BankDataset
from bank_node.node import BankNode
from bank_node.policy import TaskRefused, TrainingPolicy
from fedfraud import model_json
from fedfraud.model_guard import ModelRefused, consortium_header, rebuild_model, ModelLimits
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import EvaluationReport, ModelUpdate, TrainTask

PARAMS = {**consortium_params(FederationSettings(max_depth=3), 50, 500), "seed": 1}


@pytest.fixture
def node(toy_banks, tmp_path):
    X, y = toy_banks["alpha"]
    bank = BankNode("alpha", tmp_path / "raw", tmp_path / "work", config=None)
    bank.__dict__["data"] = BankDataset(TOY_FEATURES, X[:300], y[:300], X[300:], y[300:], None)
    bank.__dict__["contract"] = {"hash": "h", "names": TOY_FEATURES}
    bank._require_training_allowed = lambda: None  # no gate report in this unit test
    return bank


def task(base=None, **params):
    return TrainTask(bank="alpha", round_id=1, base_model_id=model_json.model_id(base), contract_hash="h",
                     num_trees=3, params={**PARAMS, **params}, base_model=base)


def global_model(node):
    update = ModelUpdate.from_bytes(node.train(task().to_bytes()))
    return rebuild_model(update.model, ModelLimits.for_depth(3), consortium_header(TOY_FEATURES, PARAMS))


def test_an_honest_round_trip(node):
    base = global_model(node)
    update = ModelUpdate.from_bytes(node.train(task(base).to_bytes()))
    assert len(model_json.trees(update.model)) == 3 and update.base_model_id == model_json.model_id(base)
    report = EvaluationReport.from_bytes(node.evaluate(model_json.to_bytes(base)))
    assert report.model_id == model_json.model_id(base)  # the bank's rebuild is the aggregator's document


def test_a_task_outside_the_policy_is_refused(node):
    with pytest.raises(TaskRefused, match="policy_max_depth"):
        node.train(task(max_depth=30).to_bytes())
    with pytest.raises(TaskRefused, match="wrong_bank"):
        node.train(dataclasses.replace(task(), bank="beta").to_bytes())
    strict = BankNode("alpha", node.raw_path, node.work_dir, None, policy=TrainingPolicy(max_eta=0.05))
    with pytest.raises(TaskRefused, match="policy_eta"):
        strict.accepted_task(task().to_bytes())


def broken(doc, edit):
    doc = copy.deepcopy(doc)
    tree = model_json.trees(doc)[0]
    edit(doc, tree, [n for n, c in enumerate(tree["left_children"]) if c != -1])
    return doc


ATTACKS = {
    "split_index_out_of_range": lambda d, t, inner: t["split_indices"].__setitem__(inner[0], 10 ** 6),
    "cycle_or_shared_node": lambda d, t, inner: t["left_children"].__setitem__(inner[1], inner[1]),
    "not_finite": lambda d, t, inner: t["split_conditions"].__setitem__(t["left_children"].index(-1), 1e39),
    "header_mismatch": lambda d, t, inner: d["learner"]["objective"].__setitem__("name", "binary:logitraw"),
}


@pytest.mark.parametrize("check", sorted(ATTACKS))
def test_a_broken_model_is_refused_before_xgboost_sees_it(node, check):
    bad = broken(global_model(node), ATTACKS[check])
    with pytest.raises(TaskRefused) as refused:
        node.train(task(bad).to_bytes())
    assert refused.value.check == f"base_model_{check}"
    with pytest.raises(ModelRefused) as refused:
        node.evaluate(json.dumps(bad).encode())
    assert refused.value.check == check


def test_undefined_metrics_leave_as_absent_not_nan(node):
    node.__dict__["data"] = dataclasses.replace(node.data, y_holdout=np.zeros_like(node.data.y_holdout))
    report = EvaluationReport.from_bytes(node.evaluate(model_json.to_bytes(global_model(node))))
    assert "auprc" not in report.metrics and report.positives == 0


def test_a_declining_banks_summary_and_failure_name_the_rule_never_its_figures(toy_banks, tmp_path):
    from bank_node.node import BankDeclined
    from pipelines.build import VALIDATION_DIR
    from pipelines.validation import REPORT_FILE

    X, y = toy_banks["alpha"]
    bank = BankNode("alpha", tmp_path / "raw", tmp_path / "work", config=None)
    bank.__dict__["data"] = BankDataset(TOY_FEATURES, X[:300], y[:300], X[300:], y[300:], None)
    bank.__dict__["contract"] = {"hash": "h", "names": TOY_FEATURES}
    (tmp_path / "work" / VALIDATION_DIR).mkdir(parents=True)
    (tmp_path / "work" / VALIDATION_DIR / REPORT_FILE).write_text(json.dumps({
        "training_allowed": False, "event_time_min": "a", "event_time_max": "b",
        "decline_reasons": ["too few labelled rows: 537 < 1000",
                            "labelled fraud rate 0.11359 outside [0.0002, 0.05]"]}))
    summary = bank.summary()
    assert summary["decline_reasons"] == ["too few labelled rows (fewer than 1000)",
                                          "labelled fraud rate outside [0.0002, 0.05]"]
    with pytest.raises(BankDeclined) as declined:
        bank.train(task().to_bytes())
    assert "fewer than 1000" in str(declined.value)
    assert not any(figure in json.dumps(summary) + str(declined.value) for figure in ("537", "0.113"))
