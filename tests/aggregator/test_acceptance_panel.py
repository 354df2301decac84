"""Acceptance panels: in a large cyclic federation each turn is scored by one of the federation's fixed, disjoint,
seeded panels of other banks; small federations and bagging stages by every bank. Then a whole cyclic round in
process with six masked toy banks in two panels of three, one of them poisoning its update."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from conftest import four_toy_banks, masked_toy_nodes, toy_cyclic_federation

from aggregator.protocol import acceptance, phases, records
from aggregator.protocol import secure_acceptance as secure
from aggregator.protocol.acceptance_panel import panel, panels
from aggregator.protocol.state import RoundState
from fedfraud import model_json
from fedfraud.settings import FederationSettings
from fedfraud.wire import ModelUpdate

MANY = [f"bank{i:02d}" for i in range(12)]


def test_small_federations_bagging_stages_and_no_limit_are_scored_by_every_bank():
    assert panel(MANY[:5], MANY[:5], ["bank00"], 3, seed=1) == MANY[:5]  # fewer than 2k banks
    assert panel(MANY, MANY, MANY, 3, seed=1) == MANY  # a bagging stage: every bank in it
    assert panel(MANY, MANY, ["bank03"], None, seed=1) == MANY
    assert panel(MANY, MANY, ["bank03"], 2, seed=1, at_least=7) == MANY  # the masking quorum sets the size


@pytest.mark.parametrize("k", [1, 3, 4, 5, 6])
def test_turns_are_judged_by_disjoint_fixed_panels_of_other_banks_each_bank_answering_at_most_2k_minus_1(k):
    dealt = panels(MANY, k, seed=5)
    assert sorted(b for group in dealt for b in group) == MANY and len(dealt) == 12 // k
    assert all(k <= len(group) < 2 * k for group in dealt)
    judged_by = {b: panel(MANY, MANY, [b], k, seed=5) for b in MANY}
    for bank, chosen in judged_by.items():
        assert chosen in dealt and bank not in chosen
    for one in judged_by.values():  # any two panels: the same banks or none in common
        assert all(one == other or not set(one) & set(other) for other in judged_by.values())
    asked = Counter(b for chosen in judged_by.values() for b in chosen)
    assert set(asked) == set(MANY) and all(k <= n < 2 * k for n in asked.values())


def test_panels_are_fixed_by_the_seed_for_the_federation_and_leave_out_banks_not_in_the_round():
    assert panels(MANY, 3, seed=5) == panels(list(reversed(MANY)), 3, seed=5)  # not by order
    assert panels(MANY, 3, seed=5) != panels(MANY, 3, seed=6)
    assert panels(MANY, 3, seed=5) != [sorted(MANY[i::4]) for i in range(4)]  # shuffled, not by name
    chosen = panel(MANY, MANY, ["bank00"], 3, seed=5)
    gone = chosen[0]
    assert panel(MANY, [b for b in MANY if b != gone], ["bank00"], 3, seed=5) == chosen[1:]


@pytest.mark.parametrize("value", [0, -1, 10_001, 2.5, True, "3"])
def test_acceptance_evaluators_is_refused_by_name(value):
    with pytest.raises(ValueError, match="acceptance_evaluators"):
        FederationSettings(acceptance_evaluators=value)


SIX = ["alpha", "beta", "delta", "epsilon", "gamma", "zeta"]


def six_toy_banks(toy_banks) -> dict:
    rng = np.random.default_rng(17)
    banks = four_toy_banks(toy_banks)
    for index, bank in ((1, "epsilon"), (4, "zeta")):
        X = rng.normal(size=(450, 6)).astype(np.float32)
        y = (rng.random(450) < 1 / (1 + np.exp(-(2.0 * X[:, index] - 3.0)))).astype(np.int32)
        banks[bank] = (X, y)
    return banks


class Asked:
    """A bank node that records the acceptance questions it is asked."""

    def __init__(self, node):
        self.node, self.bank, self.questions = node, node.bank, 0

    def __getattr__(self, name):
        return getattr(self.node, name)

    def score(self, question: bytes) -> bytes:
        self.questions += 1
        return self.node.score(question)


class Destructive:
    """A bank whose update is its honest trees with every leaf negated and 30 times larger (a model-poisoning bank)."""

    def __init__(self, node):
        self.node, self.bank = node, node.bank

    def __getattr__(self, name):
        return getattr(self.node, name)

    def train(self, task: bytes) -> bytes:
        update = ModelUpdate.from_bytes(self.node.train(task))
        return dataclasses.replace(update, model=model_json.scale_leaves(update.model, -30.0)).to_bytes()


def test_a_cyclic_round_of_six_masked_banks_is_judged_by_panels_of_three_and_still_refuses_a_poisoner(
        tmp_path, toy_banks):
    built = masked_toy_nodes(six_toy_banks(toy_banks), tmp_path, SIX)
    nodes = {b: Asked(Destructive(n) if b == "gamma" else n) for b, n in built.items()}
    # a fixed δ: on 3 toy holdouts (~60-90 frauds) "auto" allows drops of 0.10-0.16 (the panel's price)
    settings = FederationSettings(max_depth=3, trees_per_round=4, acceptance_evaluators=3, acceptance_delta=0.03)
    plan, ws = toy_cyclic_federation(tmp_path, nodes, SIX, settings, rounds=1)
    r = RoundState(ws, plan, 1)
    phases.run_stages(r, nodes)
    assert {b: n.questions for b, n in nodes.items()} == {b: 3 for b in SIX}  # k a round each, not n
    stages = records.read_acceptance(ws, 1)["stages"]
    assert [s["stage"] for s in stages] == r.stages()
    for stage in stages:
        [turn] = stage["stage"]
        expected = panel(SIX, SIX, [turn], 3, plan.seed, plan.masking_quorum)
        assert len(expected) == 3
        r.stage = stage["stage"]
        assert secure.state(r)["banks"] == expected and stage["masked"] and stage["faults"] == []
        assert stage["banks"][turn]["evaluators"] == expected and turn not in expected
    verdict = ws.read_json(r.path("checks"))
    refused = [x["bank"] for x in verdict["rejections"] if x["check"] == acceptance.REFUSED]
    assert refused == ["gamma"], [(s["stage"], s["banks"][s["stage"][0]]) for s in stages]
    assert sorted(verdict["participants"]) == [b for b in SIX if b != "gamma"]
