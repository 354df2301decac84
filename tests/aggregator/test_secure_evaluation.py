"""The round's masked evaluation, in process with real bank nodes and a real consortium PKI: the
aggregator gets exactly the pooled histograms, never one bank's; a missing bank re-runs the phase with
the others under fresh keys; a lying bank or too few banks fail by name, never a wrong sum."""

from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np
import pytest
from conftest import assert_masked, TOY_FEATURES, four_toy_banks, masked_toy_nodes, toy_counts, toy_label_sums

from aggregator.protocol import secure_evaluation as secure
from aggregator.protocol.errors import PhaseRerun, RoundFailed
from aggregator.protocol.plan import Plan
from aggregator.protocol.state import RoundState
from aggregator.protocol.workspace import Workspace
from bank_node.masked_evaluation import SecAggUnavailable
from bank_node.node import BankNode
from fedfraud import model_json
from fedfraud.model_guard import ModelLimits, consortium_header, rebuild_model
from fedfraud.secagg.keys import KeyAgreementRefused
from fedfraud.secagg.masking import MaskReuse, TooFewParties, encode_counts, words_from_text, words_to_text
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import EvaluationReport, KeyRequest, MaskedEvaluation, MaskedEvaluationTask, ModelUpdate, TrainTask

PARAMS = {**consortium_params(FederationSettings(max_depth=3), 50, 500), "seed": 1}
BANKS = ["alpha", "beta", "delta", "gamma"]


@pytest.fixture(scope="module")
def data(toy_banks):
    return four_toy_banks(toy_banks)


@pytest.fixture
def nodes(data, tmp_path):
    return masked_toy_nodes(data, tmp_path, BANKS, share_metrics=lambda bank: bank == "alpha")


def model(node: BankNode) -> dict:
    task = TrainTask(bank=node.bank, round_id=1, base_model_id="none", contract_hash="h", num_trees=4, params=PARAMS)
    update = ModelUpdate.from_bytes(node.train(task.to_bytes()))
    return rebuild_model(update.model, ModelLimits.for_depth(3), consortium_header(TOY_FEATURES, PARAMS))


def round_state(tmp_path, nodes, banks=BANKS, min_banks=1) -> RoundState:
    counts = toy_counts(nodes, banks)
    plan = Plan(model_name="m", strategy="bagging", rounds=1, seed=1, settings=FederationSettings(min_banks=min_banks),
                contract_hash="h", feature_names=TOY_FEATURES, banks=list(banks), excluded={},
                consortium_params=PARAMS, federation_id="fed0", counts=counts,
                label_sums=toy_label_sums(nodes, banks))
    r = RoundState(Workspace(tmp_path / "aggregator", "m"), plan, 1)
    r.ws.write_json(model(nodes["alpha"]), r.path("model"))
    return r


def clear(nodes, bank, doc) -> np.ndarray:
    report = EvaluationReport.from_bytes(nodes[bank].evaluate(model_json.to_bytes(doc)))
    return np.concatenate([report.hist_pos, report.hist_neg]).astype(np.int64)


def run_attempt(r, nodes):
    secure.keys(r, nodes)
    secure.relay(r)
    secure.evaluate(r, nodes)
    return secure.tally(r)


def test_the_aggregator_gets_the_pooled_histograms_and_nothing_of_one_bank(tmp_path, nodes):
    r = round_state(tmp_path, nodes)
    secure.open_session(r)
    result = run_attempt(r, nodes)
    doc = r.ws.read_json(r.path("model"))
    expected = sum(clear(nodes, b, doc) for b in BANKS)
    pos, neg = result.histograms["candidate"]
    assert np.array_equal(np.concatenate([pos, neg]), expected) and result.banks == BANKS
    assert list(result.metrics["candidate"]) == ["alpha"]  # only the bank that shares its metrics
    assert 0 < result.metrics["candidate"]["alpha"]["auprc"] <= 1 and result.rejections == []
    files = [p for p in (tmp_path / "aggregator").rglob("*") if p.is_file()]
    stored = b"".join(p.read_bytes() for p in files)
    for bank in BANKS:
        plain = clear(nodes, bank, doc)
        answer = MaskedEvaluation.from_bytes(r.ws.round_dir(1).joinpath(
            "secagg", "attempt-1", "evaluations", f"{bank}.json").read_bytes())
        upload = words_from_text(answer.words, len(plain))
        assert_masked(upload, encode_counts(plain))  # plaintext counts would be mostly 0 bits
        assert words_to_text(encode_counts(plain)).encode() not in stored  # no bank's vector in any file
        assert json.dumps(plain.tolist()).replace(" ", "").encode() not in stored.replace(b" ", b"")
        assert (answer.metrics != {}) == (bank == "alpha")
    assert not any("x25519" in p.name for p in files)  # private keys stay at the banks


def test_a_bank_missing_reruns_with_the_others_under_fresh_keys(tmp_path, nodes):
    r = round_state(tmp_path, nodes)
    secure.open_session(r)
    dropping = dict(nodes)
    dropping["gamma"] = type("Dies", (), {"bank": "gamma", "offer": nodes["gamma"].offer,
                                          "evaluate_masked": lambda self, b: 1 / 0})()
    with pytest.raises(PhaseRerun) as rerun:
        run_attempt(r, dropping)
    assert rerun.value.phase == "keys" and "gamma" in rerun.value.reason
    first = secure.record(r)["history"][0]["session"]
    assert secure.record(r)["banks"] == ["alpha", "beta", "delta"] and secure.record(r)["session"] != first
    assert secure.keys_exchanges(r, "alpha")[0].part == "attempt-2"
    result = run_attempt(r, dropping)
    doc = r.ws.read_json(r.path("model"))
    pos, neg = result.histograms["candidate"]
    assert np.array_equal(np.concatenate([pos, neg]), sum(clear(nodes, b, doc) for b in ["alpha", "beta", "delta"]))
    assert [x["bank"] for x in result.rejections] == ["gamma"]
    assert result.rejections[0]["check"] == "masked_evaluation_missing"


def test_a_rerun_below_three_banks_fails_by_name(tmp_path, nodes):
    r = round_state(tmp_path, nodes, banks=BANKS[:3])
    secure.open_session(r)
    secure.keys(r, nodes)
    secure.relay(r)
    secure.evaluate(r, {b: nodes[b] for b in BANKS[:2]})
    with pytest.raises(RoundFailed, match="masked_evaluation_incomplete"):
        secure.tally(r)


def test_a_lying_bank_fails_the_round_never_a_wrong_sum(tmp_path, nodes):
    r = round_state(tmp_path, nodes, banks=BANKS[:3])
    secure.open_session(r)
    secure.keys(r, nodes)
    secure.relay(r)
    secure.evaluate(r, nodes)
    path = r.ws.round_dir(1) / "secagg" / "attempt-1" / "evaluations" / "beta.json"
    answer = MaskedEvaluation.from_bytes(path.read_bytes())
    words = words_from_text(answer.words, 2000)
    words[990] += np.uint64(25)  # 25 extra positives claimed at the top scores
    path.write_bytes(dataclasses.replace(answer, words=words_to_text(words)).to_bytes())
    with pytest.raises(RoundFailed, match="masked_sum_invalid.*rows"):
        secure.tally(r)


def test_a_bank_relabelling_its_holdout_fails_against_the_masked_planning_sums(tmp_path, nodes):
    """Rows unchanged, 5 negatives claimed as positives: only the planned banks' masked positives can tell."""
    r = round_state(tmp_path, nodes, banks=BANKS[:3])
    secure.open_session(r)
    secure.keys(r, nodes)
    secure.relay(r)
    secure.evaluate(r, nodes)
    path = r.ws.round_dir(1) / "secagg" / "attempt-1" / "evaluations" / "beta.json"
    answer = MaskedEvaluation.from_bytes(path.read_bytes())
    words = words_from_text(answer.words, 2000)
    reports = [EvaluationReport.from_bytes(nodes[b].evaluate(json.dumps(r.ws.read_json(r.path("model"))).encode()))
               for b in BANKS[:3]]
    fullest = int(np.argmax(np.sum([report.hist_neg for report in reports], axis=0)))
    words[990] += np.uint64(5)
    words[1000 + fullest] -= np.uint64(5)  # the negatives' fullest bin: the sum stays counts
    path.write_bytes(dataclasses.replace(answer, words=words_to_text(words)).to_bytes())
    with pytest.raises(RoundFailed, match="masked_sum_invalid.*masked planning counts"):
        secure.tally(r)


def test_too_few_banks_are_refused_on_both_sides(tmp_path, nodes):
    with pytest.raises(RoundFailed, match="too_few_parties"):
        secure.open_session(round_state(tmp_path, nodes, banks=BANKS[:2]))
    with pytest.raises(TooFewParties, match="too_few_parties"):
        nodes["alpha"].offer(KeyRequest("fed/round-1/evaluate/attempt-1/x", ["alpha", "beta"]).to_bytes())
    r = round_state(tmp_path, nodes, banks=BANKS[:3])
    secure.open_session(r)
    secure.keys(r, nodes)
    secure.relay(r)
    task = MaskedEvaluationTask.from_bytes((r.ws.round_dir(1) / "secagg" / "attempt-1" / "candidate.json").read_bytes())
    two = dataclasses.replace(task, banks=["alpha", "beta"], offers={b: task.offers[b] for b in ["alpha", "beta"]})
    with pytest.raises(TooFewParties):
        nodes["alpha"].evaluate_masked(two.to_bytes())


def test_the_bank_refuses_unknown_sessions_mask_reuse_and_a_missing_identity(tmp_path, nodes):
    r = round_state(tmp_path, nodes, banks=BANKS[:3])
    secure.open_session(r)
    secure.keys(r, nodes)
    secure.relay(r)
    task = MaskedEvaluationTask.from_bytes((r.ws.round_dir(1) / "secagg" / "attempt-1" / "candidate.json").read_bytes())
    first = nodes["alpha"].evaluate_masked(task.to_bytes())
    assert nodes["alpha"].evaluate_masked(task.to_bytes()) == first  # the same answer again, not a new mask
    other = model(nodes["beta"])
    with pytest.raises(MaskReuse, match="mask_reuse"):
        nodes["alpha"].evaluate_masked(dataclasses.replace(task, model=other).to_bytes())
    with pytest.raises(KeyAgreementRefused) as refused:
        nodes["alpha"].evaluate_masked(dataclasses.replace(task, session=task.session + "-x").to_bytes())
    assert refused.value.check in ("session_unknown", "offer_wrong_session")
    forged = {**task.offers, "beta": {**task.offers["beta"], "public_key": task.offers["delta"]["public_key"]}}
    with pytest.raises(KeyAgreementRefused, match="offer_bad_signature"):
        nodes["delta"].evaluate_masked(dataclasses.replace(task, offers=forged).to_bytes())
    bare = BankNode("alpha", tmp_path, tmp_path / "bare", config=None)
    with pytest.raises(SecAggUnavailable, match="secagg_no_identity"):
        bare.offer(KeyRequest("s", BANKS[:3]).to_bytes())
    key_files = list((tmp_path / "banks" / "alpha" / "secagg").rglob("x25519.key"))
    assert key_files and all(p.stat().st_mode & 0o077 == 0 for p in key_files)
    assert base64.b64decode(json.loads(first)["words"])  # words travel as base64 of uint64


def test_an_answer_for_another_model_or_session_is_named_and_left_out(tmp_path, nodes):
    r = round_state(tmp_path, nodes)
    secure.open_session(r)
    secure.keys(r, nodes)
    secure.relay(r)
    secure.evaluate(r, nodes)
    answers = r.ws.round_dir(1) / "secagg" / "attempt-1" / "evaluations"
    for bank, change in (("beta", {"model_id": "f" * 16}), ("gamma", {"session": "fed0/replayed"})):
        answer = MaskedEvaluation.from_bytes((answers / f"{bank}.json").read_bytes())
        (answers / f"{bank}.json").write_bytes(dataclasses.replace(answer, **change).to_bytes())
    with pytest.raises(RoundFailed, match="masked_evaluation_incomplete"):  # two left: below three
        secure.tally(r)
    assert secure.record(r)["attempt"] == 1  # a failed round opens no new attempt
    r2 = round_state(tmp_path / "again", nodes)
    secure.open_session(r2)
    secure.keys(r2, nodes)
    secure.relay(r2)
    secure.evaluate(r2, nodes)
    path = r2.ws.round_dir(1) / "secagg" / "attempt-1" / "evaluations" / "beta.json"
    path.write_bytes(dataclasses.replace(MaskedEvaluation.from_bytes(path.read_bytes()), model_id="f" * 16).to_bytes())
    with pytest.raises(PhaseRerun):
        secure.tally(r2)
    [attempt] = secure.record(r2)["history"]
    assert [(f["bank"], f["check"]) for f in attempt["faults"]] == [("beta", "masked_evaluation_wrong_model")]
