"""The acceptance phases in process with real bank nodes on toy data: every bank scores the candidate with
and without each update, the gate records δ per bank, and after a refusal it asks the pair variants its
second pass needs (a re-run of ``accept`` with a second question)."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import TOY_FEATURES, four_toy_banks, toy_counts, with_toy_data

from aggregator.protocol import acceptance, records, training
from aggregator.protocol.errors import PhaseRerun
from aggregator.protocol.plan import Plan
from aggregator.protocol.state import RoundState
from aggregator.protocol.workspace import Workspace
from bank_node.node import BankNode
from fedfraud import model_json
from fedfraud.crosscheck import ScoreQuestion
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import TrainTask

PARAMS = {**consortium_params(FederationSettings(max_depth=3), 50, 500), "seed": 1}
BANKS = ["alpha", "beta", "delta", "gamma"]


@pytest.fixture
def nodes(toy_banks, tmp_path):
    data = four_toy_banks(toy_banks)
    return {bank: with_toy_data(BankNode(bank, tmp_path / bank, tmp_path / "banks" / bank, config=None), *data[bank])
            for bank in BANKS}


def round_state(tmp_path, nodes, settings: FederationSettings) -> RoundState:
    counts = toy_counts(nodes, BANKS)
    plan = Plan(model_name="m", strategy="bagging", rounds=1, seed=1, settings=settings, contract_hash="h",
                feature_names=TOY_FEATURES, banks=BANKS, excluded={}, consortium_params=PARAMS,
                federation_id="fed0", counts=counts)
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
    r = round_state(tmp_path, nodes, FederationSettings(max_depth=3))
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
    r = round_state(tmp_path, nodes, dataclasses.replace(FederationSettings(max_depth=3), acceptance_delta=None))
    acceptance.propose(r)
    question = ScoreQuestion.from_bytes(acceptance.question_path(r).read_bytes())
    assert sorted(question.variants) == sorted([acceptance.WITH_ALL] + [acceptance._without(b) for b in BANKS])
    assert r.ws.read_json(acceptance.judged_path(r))["second_pass"] is False


def test_a_refusal_is_followed_by_a_second_pass_on_the_banks_real_pair_answers(tmp_path, nodes):
    r = round_state(tmp_path, nodes, FederationSettings(max_depth=3, acceptance_delta=0.0))  # any drop refuses
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
