"""The acceptance phases in process with real bank nodes on toy data: every bank scores the candidate with
and without each update, the gate records δ per bank, and after a refusal it asks the pair variants its
second pass needs (a re-run of ``accept`` with a second question). Clear per-bank reports first
(``acceptance_masked: false``), then the default: the same questions under secure aggregation."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import TOY_FEATURES, four_toy_banks, toy_counts, toy_label_sums, with_toy_data

from aggregator.protocol import acceptance, phases, records, training
from aggregator.protocol import secure_acceptance as secure
from aggregator.protocol.errors import PhaseRerun
from aggregator.protocol.plan import Plan
from aggregator.protocol.state import RoundState
from aggregator.protocol.workspace import Workspace
from bank_node.masked_evaluation import SecAggCredentials
from bank_node.node import BankNode
from fedfraud import crosscheck, model_json, pki
from fedfraud.crosscheck import MaskedScoreAnswer, ScoreAnswer, ScoreQuestion
from fedfraud.secagg.masking import words_from_text
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import TrainTask

PARAMS = {**consortium_params(FederationSettings(max_depth=3), 50, 500), "seed": 1}
BANKS = ["alpha", "beta", "delta", "gamma"]


CLEAR = FederationSettings(max_depth=3, acceptance_masked=False)


@pytest.fixture
def nodes(toy_banks, tmp_path):
    data = four_toy_banks(toy_banks)
    return {bank: with_toy_data(BankNode(bank, tmp_path / bank, tmp_path / "banks" / bank, config=None), *data[bank])
            for bank in BANKS}


@pytest.fixture
def masking_nodes(toy_banks, tmp_path):
    """The same banks, each with its consortium certificate (to sign its key offers)."""
    certs, data = tmp_path / "consortium", four_toy_banks(toy_banks)
    pki.provision("nordic", ["aggregator", *BANKS], certs)
    return {b: with_toy_data(BankNode(b, tmp_path / b, tmp_path / "banks" / b, config=None, secagg=SecAggCredentials.
                                      from_files(certs / b / "ca.crt", certs / b / "cert.pem", certs / b / "key.pem")),
                             *data[b]) for b in BANKS}


def round_state(tmp_path, nodes, settings: FederationSettings) -> RoundState:
    counts = toy_counts(nodes, BANKS)
    plan = Plan(model_name="m", strategy="bagging", rounds=1, seed=1, settings=settings, contract_hash="h",
                feature_names=TOY_FEATURES, banks=BANKS, excluded={}, consortium_params=PARAMS,
                federation_id="fed0", counts=counts, label_sums=toy_label_sums(nodes, BANKS))
    r = RoundState(Workspace(tmp_path / "aggregator", "m"), plan, 1)
    for bank, node in nodes.items():
        task = TrainTask(bank=bank, round_id=1, base_model_id="none", contract_hash="h",
                         num_trees=4 + BANKS.index(bank), params=PARAMS)  # a different tree count per bank
        r.path("updates", bank).parent.mkdir(parents=True, exist_ok=True)
        r.path("updates", bank).write_bytes(node.train(task.to_bytes()))
        r.ws.write_json({"counts": counts[bank]}, r.ws.summary_path(bank))
    training.check(r)
    return r


def test_the_banks_score_every_single_variant_and_the_gate_records_delta(tmp_path, nodes):
    r = round_state(tmp_path, nodes, CLEAR)
    assert r.ws.read_json(r.path("checks"))["stage_accepted"] == BANKS
    acceptance.propose(r)
    question = ScoreQuestion.from_bytes(acceptance.question_path(r).read_bytes())
    trees = {b: 4 + BANKS.index(b) for b in BANKS}
    total = sum(trees.values())
    assert sorted(question.variants) == sorted([acceptance.WITH_ALL] + [acceptance._without(b) for b in BANKS])
    for b in BANKS:
        assert len(model_json.trees(question.variant(acceptance._without(b)))) == total - trees[b]
    acceptance.accept(r, nodes)
    acceptance.gate(r)
    stage = records.read_acceptance(r.ws, 1)["stages"][0]
    assert stage["faults"] == [] and set(stage["banks"]) == set(BANKS)
    holdout = {b: int(nodes[b].data.y_holdout.sum()) for b in BANKS}
    for bank, row in stage["banks"].items():
        assert row["evaluators"] == [b for b in BANKS if b != bank]
        assert row["others_positives"] == sum(holdout.values()) - holdout[bank]
        assert row["allowed_drop"] == pytest.approx(acceptance.allowed_drop(
            r.plan.settings, row["others_with"], row["others_without"], row["others_positives"]))


def test_with_the_gate_off_no_pair_is_asked(tmp_path, nodes):
    r = round_state(tmp_path, nodes, dataclasses.replace(CLEAR, acceptance_delta=None))
    acceptance.propose(r)
    question = ScoreQuestion.from_bytes(acceptance.question_path(r).read_bytes())
    assert sorted(question.variants) == sorted([acceptance.WITH_ALL] + [acceptance._without(b) for b in BANKS])
    assert r.ws.read_json(acceptance.judged_path(r))["second_pass"] is False


def test_a_refusal_is_followed_by_a_second_pass_on_the_banks_real_pair_answers(tmp_path, nodes):
    r = round_state(tmp_path, nodes, dataclasses.replace(CLEAR, acceptance_delta=0.0))  # any drop refuses
    acceptance.propose(r)
    acceptance.accept(r, nodes)
    with pytest.raises(PhaseRerun, match="second pass"):
        acceptance.gate(r)
    assert acceptance.accept_banks(r) == BANKS
    [ask] = acceptance.accept_exchanges(r, "alpha")
    assert ask.question == acceptance.pairs_question_path(r) and ask.part == acceptance.PAIRS
    pairs = ScoreQuestion.from_bytes(ask.question.read_bytes())
    worst = r.ws.read_json(acceptance.judged_path(r))["pairs"]["without"]
    for bank in (b for b in BANKS if b != worst):
        drop = pairs.variants[acceptance._without(bank, worst)]["drop"]
        assert len(drop) == 4 + BANKS.index(bank) + 4 + BANKS.index(worst)
    acceptance.accept(r, nodes)  # the driver asks again: the second question only
    acceptance.gate(r)
    stage = records.read_acceptance(r.ws, 1)["stages"][0]
    drops = {b: row["others_without"] - row["others_with"] for b, row in stage["banks"].items()}
    worst = max(drops, key=drops.get)
    assert drops[worst] > 0 and stage["refused"][0] == worst  # the first pass refuses the worst only
    for bank in (b for b in BANKS if b != worst):
        second = stage["banks"][bank]["second_pass"]
        assert second["without"] == worst and second["evaluators"] == [b for b in BANKS if b not in (bank, worst)]
        assert (bank in stage["refused"]) == (second["others_without"] - second["others_with"] > 0)
    checks = r.ws.read_json(r.path("checks"))
    assert sorted(checks["stage_accepted"]) == sorted(set(BANKS) - set(stage["refused"]))


# ---- masked (the default) ----------------------------------------------------------------------


def clear_pooled(r: RoundState, nodes, question_path, labels, banks) -> dict[str, float]:
    """What the clear reports of ``banks`` would pool to, per variant (the test may see every bank)."""
    answers = {b: ScoreAnswer.from_bytes(nodes[b].score(question_path.read_bytes())).parsed(labels) for b in banks}
    return {label: crosscheck.auprc([answers[b][label] for b in banks]) for label in labels}


def test_masked_acceptance_judges_on_sums_over_every_bank_and_sends_no_histogram_in_the_clear(tmp_path, masking_nodes):
    nodes = masking_nodes
    r = round_state(tmp_path, nodes, FederationSettings(max_depth=3))
    acceptance.propose(r)
    assert secure.keys_banks(r) == BANKS and acceptance.accept_banks(r) == []  # keys first
    phases.run_stage_span(r, nodes, "accept_keys", "accept")
    [ask] = acceptance.accept_exchanges(r, "alpha")
    question = ScoreQuestion.from_bytes(ask.question.read_bytes())
    assert question.masking["banks"] == BANKS and set(question.masking["offers"]) == set(BANKS)
    acceptance.accept(r, nodes)
    for bank in BANKS:  # each answer holds masked words only, bound to the question
        answer = MaskedScoreAnswer.from_bytes(secure.question_exchange(r, bank).answer.read_bytes())
        assert answer.question == question.digest() and sorted(answer.words) == sorted(question.variants)
        assert "hist_pos" not in secure.question_exchange(r, bank).answer.read_text()
    acceptance.gate(r)
    stage = records.read_acceptance(r.ws, 1)["stages"][0]
    assert stage["masked"] and stage["faults"] == []
    labels = sorted(question.variants)
    clear = clear_pooled(r, nodes, acceptance.question_path(r), labels, BANKS)
    for bank, row in stage["banks"].items():  # pooled at every bank, the judged one included
        assert row["evaluators"] == BANKS
        assert row["others_with"] == pytest.approx(clear[acceptance.WITH_ALL])
        assert row["others_without"] == pytest.approx(clear[acceptance._without(bank)])
        assert row["contribution"] == pytest.approx(row["others_with"] - row["others_without"])
    words = words_from_text(MaskedScoreAnswer.from_bytes(secure.question_exchange(r, "beta").answer.read_bytes())
                            .words[acceptance.WITH_ALL], 2000)
    assert len(set(words.tolist())) > 1900  # uniformly random words, not counts


class Silent:
    """A bank that offers a key, then never answers its masked question."""

    def __init__(self, node):
        self.node, self.bank = node, node.bank

    def offer(self, request: bytes) -> bytes:
        return self.node.offer(request)

    def score(self, question: bytes) -> bytes:
        raise ConnectionError(f"{self.bank} went away")


def test_a_bank_that_drops_after_offering_reruns_the_masked_question_with_the_others(tmp_path, masking_nodes):
    nodes = {**masking_nodes, "gamma": Silent(masking_nodes["gamma"])}
    r = round_state(tmp_path, masking_nodes, FederationSettings(max_depth=3, acceptance_delta=None))
    acceptance.propose(r)
    phases.finish_stage(r, nodes, "accept_keys")  # keys, relay, accept, gate: a re-run from keys, then aggregate
    s = secure.state(r)
    assert s["attempt"] == 2 and s["banks"] == ["alpha", "beta", "delta"]
    assert s["history"][0]["answered"] == ["alpha", "beta", "delta"] and s["session"] == s["history"][0]["session"]
    assert s["label"] != s["history"][0]["label"] and s["sent_offers"] == []  # a new label, the keys already held
    assert len(list((r.ws.round_dir(1) / "acceptance" / "keys" / "offers").glob("*.json"))) == len(BANKS)  # once
    stage = records.read_acceptance(r.ws, 1)["stages"][0]
    assert all(row["evaluators"] == ["alpha", "beta", "delta"] for row in stage["banks"].values())
    assert {f["bank"] for f in stage["faults"]} == {"gamma"}
    assert r.path("working").exists()


def flipped_training_labels(node):
    """The bank trains on inverted labels (a poisoner); its holdout keeps the true ones."""
    from bank_node.dataset import BankDataset

    d = node.data
    node.__dict__["data"] = BankDataset(d.feature_names, d.X_train, 1 - d.y_train, d.X_holdout, d.y_holdout, None)
    return node


def test_masked_second_question_after_a_refusal(tmp_path, masking_nodes):
    nodes = {**masking_nodes, "beta": flipped_training_labels(masking_nodes["beta"])}
    r = round_state(tmp_path, nodes, FederationSettings(max_depth=3, acceptance_delta=0.0))  # any drop refuses
    acceptance.propose(r)
    phases.finish_stage(r, nodes, "accept_keys")
    stage = records.read_acceptance(r.ws, 1)["stages"][0]
    worst = stage["second_question"]["without"]
    assert worst == "beta" and stage["refused"][0] == worst and secure.state(r)["question"] == acceptance.PAIRS
    pair_labels = sorted(ScoreQuestion.from_bytes(acceptance.pairs_question_path(r).read_bytes()).variants)
    clear = clear_pooled(r, nodes, acceptance.pairs_question_path(r), pair_labels, BANKS)
    for bank in (b for b in BANKS if b != worst):
        second = stage["banks"][bank]["second_pass"]
        assert second["evaluators"] == BANKS
        assert second["others_with"] == pytest.approx(clear[acceptance._without(worst)])
        assert (bank in stage["refused"]) == (second["others_without"] - second["others_with"] > 0)
