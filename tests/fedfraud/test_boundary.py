"""The declaration of what may leave a bank: each kind's checker names the first field not allowed, and README's
list names every declared kind (the prose and the declaration cannot drift apart)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from fedfraud import model_json
from fedfraud.boundary import (ANSWERS, OUTGOING, README_NAMES, answer_kind, answer_kinds, federated_problem,
                               http_problem,
                               outgoing_problem)
from fedfraud.protocol import TaskKind
from fedfraud.secagg import federated_wire as fw
from fedfraud.wire import EvaluationReport, MaskedCounts, MaskedEvaluation, ModelUpdate, SessionOffer

README = Path(__file__).resolve().parents[2] / "README.md"
COUNTS = {"train_rows": 10, "holdout_rows": 4}  # label counts leave only masked ("masked counts")


def boundary_section() -> str:
    text = README.read_text()
    start = text.index("## What crosses a bank's boundary")
    return " ".join(text[start:text.index("\n## ", start + 1)].split())  # line breaks as spaces


# how README's list names each field of the summary
SUMMARY_README_NAMES = {"counts": "counts", "contract_hash": "feature-contract hash", "data_window": "data window",
                        "training_allowed": "training_allowed", "decline_reasons": "decline_reasons",
                        "holdout_start": "holdout_start"}


def update() -> ModelUpdate:
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 3)), rng.integers(0, 2, 200)
    booster = xgb.train({"max_depth": 2, "objective": "binary:logistic"},
                        xgb.DMatrix(X, y, feature_names=["a", "b", "c"]), 2)
    doc = model_json.scrub_training_stats(model_json.new_trees_only(booster, 0))
    return ModelUpdate("alpha", 1, "none", "h", 0, COUNTS, {"auprc": 0.5}, doc)


def test_every_task_kind_has_a_declared_answer():
    assert set(ANSWERS) == set(TaskKind.ALL)
    assert {k for kind in TaskKind.ALL for k in answer_kinds(kind)} | {"failure"} == set(OUTGOING)
    assert answer_kind(TaskKind.ACCEPT) == "masked score answer"  # the default
    assert answer_kind(TaskKind.CROSSVAL) == "masked score answer"  # the default since issue 12


def test_a_masked_cross_evaluation_answer_fits_and_a_clear_histogram_in_it_is_named():
    answer = {"bank": "alpha", "round_id": 0, "purpose": "crossval", "session": "f/crossval/pass-1/attempt-1/ab",
              "question": "0" * 64, "words": {"alpha": "AAAA", "beta": "AAAA"}}
    assert answer_kind(TaskKind.CROSSVAL, json.dumps(answer).encode()) == "masked score answer"
    assert outgoing_problem("masked score answer", answer) is None
    leaky = {**answer, "words": {**answer["words"], "beta": [0] * 999 + [3]}}
    assert "masked score answer.words.beta: expected text matching" in outgoing_problem("masked score answer", leaky)
    assert "field not allowed" in outgoing_problem("masked score answer", {**answer, "reports": {}})


def test_the_wire_messages_a_bank_sends_fit_their_declaration():
    report = EvaluationReport("alpha", "m", 1, 2, {"auprc": 0.5}, [0] * 999 + [1], [2] + [0] * 999)
    offer = SessionOffer("alpha", "s", "AAAA", "-----BEGIN CERTIFICATE-----", "AAAA")
    assert outgoing_problem("update", update().to_bytes()) is None
    assert outgoing_problem("key offer", offer.to_bytes()) is None
    masked = MaskedEvaluation("alpha", "m", "s", "candidate", "AAAA")
    assert outgoing_problem("masked evaluation", masked.to_bytes()) is None
    answer = {"bank": "alpha", "round_id": 0, "purpose": "crossval",
              "reports": {"alpha": json.loads(report.to_bytes())}}
    assert outgoing_problem("evaluation reports", json.dumps(answer).encode()) is None


@pytest.mark.parametrize("kind, mutate, named", [
    ("update", lambda d: d.update(rows=[1.5, 2.0]), "update.rows: field not allowed"),
    ("update", lambda d: d["metrics"].update(holdout_scores=0.3), "update.metrics.holdout_scores: field not allowed"),
    ("update", lambda d: d["model"]["learner"]["attributes"].update(note="x"), "update.model.learner.attributes.note"),
    ("update", lambda d: d["model"]["learner"]["gradient_booster"]["model"]["trees"][0].update(
        sum_hessian=[3.0] * 7), "trees[0].sum_hessian: expected zeros"),
    ("update", lambda d: d["model"]["learner"]["gradient_booster"]["model"]["trees"][0]["base_weights"].__setitem__(
        0, 0.7), "base_weights[0]: an inner node's weight must be zeroed"),
    ("update", lambda d: d["counts"].update(train_rows="10"), "update.counts.train_rows: expected an integer"),
    ("update", lambda d: d["counts"].update(positives=1), "update.counts.positives: field not allowed"),
])
def test_a_field_not_allowed_is_named(kind, mutate, named):
    body = json.loads(update().to_bytes())
    mutate(body)
    assert named in (outgoing_problem(kind, json.dumps(body).encode()) or "")


def test_masked_evaluations_and_summaries_refuse_clear_histograms_and_extra_facts():
    masked = json.loads(MaskedEvaluation("alpha", "m", "s", "candidate", "AAAA").to_bytes())
    assert outgoing_problem("masked evaluation", {**masked, "hist_pos": [1, 2]}) == (
        "masked evaluation.hist_pos: field not allowed to leave the bank")
    assert "expected text matching" in outgoing_problem("masked evaluation", {**masked, "words": "[1, 2, 3]"})
    assert "metrics.scores" in outgoing_problem("masked evaluation", {**masked, "metrics": {"scores": 0.1}})
    summary = {"bank": "alpha", "contract_hash": "h", "counts": COUNTS, "training_allowed": True,
               "decline_reasons": [], "data_window": ["a", "b"], "holdout_start": None}
    assert outgoing_problem("summary", summary) is None
    assert outgoing_problem("summary", {**summary, "amount_mean": 12.5}) == (
        "summary.amount_mean: field not allowed to leave the bank")
    for label_count in ("positives", "negatives", "holdout_positives"):  # only masked ("masked counts")
        clear = {**summary, "counts": {**COUNTS, label_count: 1}}
        assert outgoing_problem("summary", clear) == (
            f"summary.counts.{label_count}: field not allowed to leave the bank")
    masked_counts = json.loads(MaskedCounts("alpha", "s", "AAAAAAAAAAAAAAAAAAAAAA==").to_bytes())
    assert outgoing_problem("masked counts", masked_counts) is None
    assert outgoing_problem("masked counts", {**masked_counts, "positives": 3}) == (
        "masked counts.positives: field not allowed to leave the bank")
    assert "expected text matching" in outgoing_problem("masked counts", {**masked_counts, "words": "[3, 1]"})
    assert outgoing_problem("plain evaluation report", {}) == (
        "plain evaluation report: not a kind of message a bank sends")
    assert outgoing_problem("summary", b"\xff").startswith("summary: not JSON")


def test_http_requests_are_checked_by_route_header_and_body():
    assert http_problem("GET", "/v1/tasks/next", {"wait": "20"}, ["host", "user-agent"], b"", None) is None
    assert http_problem("POST", "/v1/heartbeat", {}, ["host"], b"", None) is None
    assert "carries 2 bytes" in http_problem("POST", "/v1/heartbeat", {}, [], b"{}", None)
    assert "header x-debug" in http_problem("GET", "/v1/tasks/next", {}, ["Host", "X-Debug"], b"", None)
    assert "query parameter rows" in http_problem("GET", "/v1/tasks/next", {"rows": "1"}, [], b"", None)
    assert "not a request a bank makes" in http_problem("POST", "/v1/upload", {}, [], b"", None)
    assert "never given" in http_problem("PUT", "/v1/tasks/t1/result", {}, [], b"{}", None)
    assert http_problem("PUT", "/v1/tasks/t1/failure", {}, [], b'{"reason": "no"}', None) is None
    assert http_problem("PUT", "/v1/tasks/t1/result", {}, [], update().to_bytes(), TaskKind.TRAIN) is None
    assert "summary.bank: expected str" in http_problem("PUT", "/v1/tasks/t1/result", {}, [], b'{"bank": 1}',
                                                        TaskKind.SUMMARY)


def test_federated_calls_other_than_the_declared_ones_are_named():
    offer = json.dumps(json.loads(SessionOffer("alpha", "s", "AAAA", "cert", "AAAA").to_bytes())).encode()
    slot = len(offer).to_bytes(4, "big") + offer + b"\0" * 32
    assert federated_problem(fw.Request("Allgather", 0, 0, slot)) is None
    assert "zero padding" in federated_problem(fw.Request("Allgather", 0, 0, slot[:-1] + b"x"))
    assert federated_problem(fw.Request("Allreduce", 3, 0, b"\1" * 16, fw.UINT64, fw.SUM)) is None
    plain = fw.Request("Allreduce", 3, 0, np.ones(4, "<f8").tobytes(), 2, fw.SUM)  # a DOUBLE sum: plaintext
    assert "not a call a bank's sidecar may send" in federated_problem(plain)
    assert "not a call" in federated_problem(fw.Request("AllgatherV", 4, 0, b"sketch"))
    assert federated_problem(fw.Request("Broadcast", 2, 0, b"\1" * 4)) is None


@pytest.mark.parametrize("kind", [k for k in OUTGOING if k != "failure"])
def test_the_readme_lists_every_declared_kind(kind):
    assert README_NAMES[kind] in boundary_section(), f"README's boundary section does not list {kind!r}"


@pytest.mark.parametrize("field", [
    "counts", "contract_hash", "data_window", "training_allowed", "decline_reasons", "holdout_start",
])
def test_the_readme_names_every_field_of_the_summary(field):
    assert field in OUTGOING["summary"].fields
    assert SUMMARY_README_NAMES[field] in boundary_section(), f"README does not name the summary's {field}"


def test_the_readme_lists_a_failed_tasks_reason():
    assert re.search(README_NAMES["failure"], boundary_section())
