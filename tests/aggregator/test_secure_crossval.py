"""Masked cross-evaluation, in process with real bank nodes and a real consortium PKI: each local model's pooled
histograms at the other banks equal the sum of the clear reports, a bank's upload looks random, fewer than three
banks are refused, a bank missing re-runs the pass under fresh keys (or fails by name), a label-swapped bank is
excluded, and a bank refuses a question that would let the aggregator difference its sums."""

from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np
import pytest
from conftest import TOY_FEATURES, four_toy_banks, with_toy_data

from aggregator.drivers.embedded import embedded_credentials
from aggregator.protocol import crossval, phases, secure_planning
from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.workspace import Workspace
from bank_node.node import BankNode
from fedfraud.crosscheck import MaskedScoreAnswer, ScoreAnswer, ScoreQuestion
from fedfraud.secagg.keys import KeyAgreementRefused
from fedfraud.secagg.masking import TooFewParties
from fedfraud.settings import FederationSettings

BANKS = ["alpha", "beta", "delta", "gamma"]
REPORT = {"training_allowed": True, "decline_reasons": [], "event_time_min": "2026-01-01T00:00:00",
          "event_time_max": "2026-03-01T00:00:00"}
OPEN = {"crossval_max_trees": 4, "max_depth": 3, "crossval_min_lift": 0.0, "crossval_max_contradiction_auc": 0.0}


class Flaky:
    """A node that cannot answer its first ``fails`` masked cross-evaluation questions."""

    def __init__(self, node: BankNode, fails: int = 1):
        self.node, self.bank, self.fails = node, node.bank, fails

    def __getattr__(self, name):
        return getattr(self.node, name)

    def score(self, question: bytes) -> bytes:
        if b'"masking"' in question and self.fails > 0:
            self.fails -= 1
            raise ConnectionError(f"{self.bank} is down")
        return self.node.score(question)


class ClearAnswerer:
    """A node that answers a masked cross-evaluation question with clear reports (forged or not)."""

    def __init__(self, node: BankNode):
        self.node, self.bank = node, node.bank

    def __getattr__(self, name):
        return getattr(self.node, name)

    def score(self, question: bytes) -> bytes:
        plain = ScoreQuestion.from_bytes(question)
        return self.node.score(ScoreQuestion(0, "crossval", plain.variants, plain.models).to_bytes())


class OwnSlotLiar:
    """A node that puts its holdout's histograms of its own model in its own slot (instead of zeros)."""

    def __init__(self, node: BankNode):
        self.node, self.bank = node, node.bank

    def __getattr__(self, name):
        return getattr(self.node, name)

    def score(self, question: bytes) -> bytes:
        from bank_node import acceptance

        original = acceptance._crossval_variants
        acceptance._crossval_variants = lambda node, q, session, banks: q
        try:
            return self.node.score(question)
        finally:
            acceptance._crossval_variants = original


@pytest.fixture(scope="module")
def data(toy_banks):
    return four_toy_banks(toy_banks)


@pytest.fixture(scope="module")
def shared_signal():
    """Four toy banks whose fraud follows the same features (toy_banks' do not: each has its own)."""
    rng = np.random.default_rng(7)
    banks = {}
    for bank in BANKS:
        X = rng.normal(size=(600, 6)).astype(np.float32)
        y = (rng.random(600) < 1 / (1 + np.exp(-(2.0 * X[:, 0] + 1.5 * X[:, 1] - 2.5)))).astype(np.int32)
        banks[bank] = (X, y)
    return banks


def make_nodes(root, data, banks=BANKS, swapped=()) -> dict[str, BankNode]:
    credentials = embedded_credentials(root / "pki", list(banks))
    nodes = {}
    for bank in banks:
        work = root / "banks" / bank
        (work / "validation").mkdir(parents=True, exist_ok=True)
        (work / "validation" / "report.json").write_text(json.dumps(REPORT))
        nodes[bank] = with_toy_data(BankNode(bank, work, work, config=None, secagg=credentials[bank]), *data[bank])
        if bank in swapped:  # every label inverted, training rows and holdout (an honest summary of swapped data)
            honest = nodes[bank].data
            nodes[bank].__dict__["data"] = dataclasses.replace(honest, y_train=1 - honest.y_train,
                                                               y_holdout=1 - honest.y_holdout)
    return nodes


def cross_evaluate(root, nodes, **settings):
    ws = Workspace(root / "aggregator", "m")
    for node in nodes.values():
        phases.summarize(ws, node.summary())
    plan = phases.plan_federation(ws, "m", "bagging", 1, 3, FederationSettings(**{**OPEN, **settings}),
                                  {"hash": "h", "names": TOY_FEATURES}, sorted(nodes))
    plan = secure_planning.run(ws, plan, nodes)  # round 0 opens with the masked planning counts
    return ws, plan, crossval.run(ws, plan, nodes)


def record(ws) -> dict:
    return json.loads((ws.root / "crossval" / "crossval.json").read_text())


def pools(ws, name="pass-1") -> dict:
    return json.loads((ws.root / "crossval" / "secagg" / name / "pools.json").read_text())


def test_each_models_pool_is_the_sum_of_the_other_banks_clear_reports(tmp_path, data):
    nodes = make_nodes(tmp_path, data)
    ws, _, plan = cross_evaluate(tmp_path / "masked", nodes)
    clear_ws, _, _ = cross_evaluate(tmp_path / "clear", nodes, crossval_masked=False)
    masked, question = pools(ws), ScoreQuestion.from_bytes((ws.root / "crossval" / "question.json").read_bytes())
    assert masked["banks"] == BANKS and masked["faults"] == [] and sorted(masked["reports"]) == BANKS
    answers = {b: ScoreAnswer.from_bytes((clear_ws.root / "crossval" / "answers" / f"{b}.json").read_bytes())
               for b in BANKS}
    for model in BANKS:
        assert question.models[model] == ScoreQuestion.from_bytes(
            (clear_ws.root / "crossval" / "question.json").read_bytes()).models[model]  # the same local models
        others = [answers[b].reports[model] for b in BANKS if b != model]
        assert masked["reports"][model]["hist_pos"] == np.sum([r["hist_pos"] for r in others], axis=0).tolist()
        assert masked["reports"][model]["hist_neg"] == np.sum([r["hist_neg"] for r in others], axis=0).tolist()
        own = answers[model].reports[model]
        assert masked["reports"][model]["hist_neg"] != (np.asarray(own["hist_neg"]) + np.sum(
            [r["hist_neg"] for r in others], axis=0)).tolist()  # its own holdout is not in its pool
    kept = record(ws)
    assert kept["excluded"] == {} and kept["figures"]["masked"] is True
    assert kept["best_local"]["bank"] in BANKS and plan.banks == BANKS
    # nothing of one bank in the clear in the aggregator's crossval folder
    blobs = b"".join(p.read_bytes() for p in (ws.root / "crossval").rglob("*") if p.is_file())
    for b in BANKS:
        for model in BANKS:
            if b != model:
                report = answers[b].reports[model]
                assert json.dumps(report["hist_neg"], separators=(",", ":")).encode() not in blobs
                assert json.dumps(report["hist_neg"]).encode() not in blobs


def test_a_banks_masked_answer_is_random_words_even_its_zero_slot(tmp_path, data):
    nodes = make_nodes(tmp_path, data)
    ws, _, _ = cross_evaluate(tmp_path, nodes)
    answer = MaskedScoreAnswer.from_bytes(
        (ws.root / "crossval" / "secagg" / "pass-1" / "attempt-1" / "answers" / "alpha.json").read_bytes())
    assert answer.purpose == "crossval" and sorted(answer.words) == BANKS
    raw = b"".join(base64.b64decode(answer.words[m]) for m in BANKS)
    values = np.frombuffer(raw, dtype=np.uint8)
    expected = len(values) / 256
    chi2 = float(((np.bincount(values, minlength=256) - expected) ** 2 / expected).sum())
    assert chi2 < 420, chi2  # 255 dof: ~1e-9 false alarm for uniform bytes; a count histogram is in the 10^5s
    own = np.frombuffer(base64.b64decode(answer.words["alpha"]), dtype="<u8")
    assert np.count_nonzero(own) > 0.99 * own.size  # its zeros are masked too


def test_fewer_than_three_banks_are_refused(tmp_path, data):
    nodes = make_nodes(tmp_path, data, banks=["alpha", "beta"])
    with pytest.raises(RoundFailed, match="too_few_parties"):
        cross_evaluate(tmp_path, nodes)


def test_a_bank_missing_reruns_the_pass_with_the_others_under_fresh_keys(tmp_path, data):
    nodes = {**make_nodes(tmp_path, data)}
    nodes["delta"] = Flaky(nodes["delta"], fails=1)
    ws, _, plan = cross_evaluate(tmp_path, nodes)
    kept = pools(ws)
    assert kept["banks"] == ["alpha", "beta", "gamma"]
    assert [f["bank"] for f in kept["faults"]] == ["delta"]
    assert kept["faults"][0]["check"] == "masked_crossval_answer_missing"
    root = ws.root / "crossval" / "secagg" / "pass-1"
    sessions = [json.loads((root / f"attempt-{k}" / "session.json").read_text())["session"] for k in (1, 2)]
    assert sessions[0] != sessions[1] and all("/crossval/pass-1/" in s for s in sessions)
    assert sorted(kept["reports"]) == ["alpha", "beta", "gamma"]  # a model is asked only with its bank
    assert kept["reports"]["alpha"]["positives"] == sum(int(nodes[b].data.y_holdout.sum()) for b in ("beta", "gamma"))
    assert plan.banks == BANKS  # a bank that left the session joins unjudged, like one that shares no model


def test_a_bank_that_left_the_session_is_excluded_when_a_model_is_required(tmp_path, data):
    nodes = {**make_nodes(tmp_path, data)}
    nodes["delta"] = Flaky(nodes["delta"], fails=1)
    ws, _, plan = cross_evaluate(tmp_path, nodes, crossval_require_model=True)
    assert plan.banks == ["alpha", "beta", "gamma"]
    assert record(ws)["excluded"]["delta"].startswith("crossval_no_model: its model was not judged")


def test_a_bank_that_answers_in_the_clear_is_excluded_and_the_others_pooled_without_it(tmp_path, data):
    nodes = {**make_nodes(tmp_path, data)}
    nodes["beta"] = ClearAnswerer(nodes["beta"])
    ws, _, plan = cross_evaluate(tmp_path, nodes)
    assert record(ws)["excluded"]["beta"].startswith("crossval_answer_invalid") and "beta" not in plan.banks
    assert pools(ws)["banks"] == ["alpha", "delta", "gamma"]


def test_a_bank_missing_below_three_fails_by_name(tmp_path, data):
    nodes = make_nodes(tmp_path, data, banks=["alpha", "beta", "gamma"])
    nodes["gamma"] = Flaky(nodes["gamma"], fails=1)
    with pytest.raises(RoundFailed, match="too_few_parties"):
        cross_evaluate(tmp_path, nodes)


def test_a_bank_missing_at_every_attempt_fails_by_name(tmp_path, data):
    nodes = make_nodes(tmp_path, data, banks=BANKS)
    nodes["delta"] = Flaky(nodes["delta"], fails=1)
    nodes["gamma"] = Flaky(nodes["gamma"], fails=1)  # after delta, gamma: two banks left, below three
    with pytest.raises(RoundFailed, match="too_few_parties|masked_crossval_incomplete"):
        cross_evaluate(tmp_path, nodes)


def test_a_bank_that_fills_its_own_slot_fails_the_sum_by_name(tmp_path, data):
    nodes = make_nodes(tmp_path, data)
    nodes["beta"] = OwnSlotLiar(nodes["beta"])
    with pytest.raises(RoundFailed, match="masked_sum_invalid"):
        cross_evaluate(tmp_path, nodes)


def test_the_label_swapped_bank_is_excluded_and_the_others_rejudged_without_its_holdout(tmp_path, shared_signal):
    nodes = make_nodes(tmp_path, shared_signal, swapped=("alpha",))
    defended = {"crossval_max_contradiction_auc": 0.5, "crossval_min_lift": 2.0}
    ws, _, plan = cross_evaluate(tmp_path / "masked", nodes, **defended)
    kept = record(ws)
    assert set(kept["excluded"]) == {"alpha"} and kept["excluded"]["alpha"].startswith("crossval_contradicts")
    assert plan.banks == ["beta", "delta", "gamma"] and "alpha" in plan.excluded
    first, second = pools(ws, "pass-1"), pools(ws, "pass-2")
    assert first["banks"] == BANKS and second["banks"] == ["beta", "delta", "gamma"]
    assert sorted(second["reports"]) == ["beta", "delta", "gamma"]
    assert kept["figures"]["models"]["beta"]["pooled_at"] == ["delta", "gamma"]
    assert [p["name"] for p in kept["figures"]["passes"]] == ["pass-1", "pass-2"]
    swapped_holdout = int(nodes["alpha"].data.y_holdout.sum())  # its labels swapped: mostly "fraud"
    assert first["reports"]["beta"]["positives"] - second["reports"]["beta"]["positives"] == swapped_holdout
    # in the clear, the same bank is excluded by the same rule, judged at its holdout instead of its model
    clear_ws, _, clear_plan = cross_evaluate(tmp_path / "clear", nodes, crossval_masked=False, **defended)
    assert set(record(clear_ws)["excluded"]) == {"alpha"} and clear_plan.banks == plan.banks
    assert record(clear_ws)["excluded"]["alpha"].startswith("crossval_contradicts")


def masked_question(tmp_path, data, edit) -> tuple[dict[str, BankNode], bytes]:
    """A real masked question of a cross-evaluation, edited by ``edit`` before it reaches the banks."""
    nodes = make_nodes(tmp_path, data)
    ws, _, _ = cross_evaluate(tmp_path, nodes)
    path = ws.root / "crossval" / "secagg" / "pass-1" / "attempt-1" / "question.json"
    question = ScoreQuestion.from_bytes(path.read_bytes())
    masking = {**question.masking, "session": question.masking["session"]}
    return nodes, ScoreQuestion(0, "crossval", *edit(dict(question.variants), dict(question.models)),
                                masking).to_bytes()


@pytest.mark.parametrize("edit, check", [
    (lambda v, m: ({**v, "alpha": {"model": "beta", "drop": []}}, m), "crossval_malformed"),  # beta's model twice
    (lambda v, m: ({**v, "extra": {"model": "alpha", "drop": []}}, m), "crossval_malformed"),  # a non-bank label
    (lambda v, m: ({**v, "beta": {"model": "beta", "drop": [0]}}, m), "crossval_malformed"),  # a variant
    (lambda v, m: (v, {**m, "gamma": m["beta"]}), "crossval_not_my_model"),  # beta's model under gamma's name
])
def test_a_bank_refuses_a_question_whose_sums_could_be_differenced(tmp_path, data, edit, check):
    nodes, question = masked_question(tmp_path, data, edit)
    with pytest.raises(KeyAgreementRefused) as refused:
        nodes["gamma"].score(question)
    assert refused.value.check == check


def test_a_rerun_keeps_its_sessions_and_gets_the_same_answers(tmp_path, data):
    """The service runs a cross-evaluation again after a restart, its answered tasks kept: an attempt's session is
    used again for the same question and banks, so the answers already kept still add up."""
    nodes = make_nodes(tmp_path, data)
    ws, plan, _ = cross_evaluate(tmp_path, nodes)
    attempt = ws.root / "crossval" / "secagg" / "pass-1" / "attempt-1"
    before = [(attempt / name).read_bytes() for name in ("session.json", "answers/beta.json")]
    again = crossval.run(ws, plan, nodes)
    assert [(attempt / name).read_bytes() for name in ("session.json", "answers/beta.json")] == before
    assert again.banks == BANKS and record(ws)["excluded"] == {}


def test_a_bank_refuses_to_mask_among_fewer_than_three(tmp_path, data):
    nodes = make_nodes(tmp_path, data)
    ws, _, _ = cross_evaluate(tmp_path, nodes)
    question = ScoreQuestion.from_bytes(
        (ws.root / "crossval" / "secagg" / "pass-1" / "attempt-1" / "question.json").read_bytes())
    two = ["alpha", "beta"]
    masking = {**question.masking, "banks": two, "offers": {b: question.masking["offers"][b] for b in two}}
    smaller = ScoreQuestion(0, "crossval", {b: question.variants[b] for b in two},
                            {b: question.models[b] for b in two}, masking)
    with pytest.raises(TooFewParties):
        nodes["alpha"].score(smaller.to_bytes())
