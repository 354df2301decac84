"""Acceptance panels: in a large cyclic round each turn is scored by a seeded panel of other banks (each bank on
exactly k panels a round), small rounds and bagging stages by every bank; then a whole cyclic round in process
with six masked toy banks and panels of three, one of them poisoning its update."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from conftest import four_toy_banks, masked_toy_nodes, toy_cyclic_federation

from aggregator.protocol import acceptance, phases, records
from aggregator.protocol import secure_acceptance as secure
from aggregator.protocol.acceptance_panel import panel
from aggregator.protocol.state import RoundState
from fedfraud import model_json
from fedfraud.settings import FederationSettings
from fedfraud.wire import ModelUpdate

MANY = [f"bank{i:02d}" for i in range(12)]


def test_small_rounds_bagging_stages_and_no_limit_are_scored_by_every_bank():
    assert panel(MANY[:5], ["bank00"], 4, seed=1, round_id=1) == MANY[:5]  # 4 outside the turn: not above 4
    assert panel(MANY, MANY, 3, seed=1, round_id=1) == MANY  # a bagging stage: nobody outside it
    assert panel(MANY, ["bank03"], None, seed=1, round_id=1) == MANY
    assert panel(MANY, ["bank03"], 2, seed=1, round_id=1, at_least=12) == MANY  # the masking quorum decides


def test_each_turn_gets_k_other_banks_and_each_bank_sits_on_exactly_k_panels():
    for k in (1, 3, 7):
        panels = {b: panel(MANY, [b], k, seed=5, round_id=2) for b in MANY}
        for bank, chosen in panels.items():
            assert len(chosen) == k and bank not in chosen and chosen == sorted(set(chosen))
        assert Counter(b for chosen in panels.values() for b in chosen) == {b: k for b in MANY}
    assert panel(MANY, ["bank00"], 2, seed=1, round_id=1, at_least=3) == panel(MANY, ["bank00"], 3, 1, 1)


def test_panels_are_fixed_by_the_seed_and_round_and_change_between_rounds():
    first = [panel(MANY, [b], 3, seed=5, round_id=1) for b in MANY]
    assert first == [panel(list(reversed(MANY)), [b], 3, seed=5, round_id=1) for b in MANY]  # not by order
    assert first != [panel(MANY, [b], 3, seed=5, round_id=2) for b in MANY]
    assert first != [panel(MANY, [b], 3, seed=6, round_id=1) for b in MANY]
    neighbours = [panel(MANY, [b], 3, seed=5, round_id=1) for b in MANY]
    assert neighbours != [sorted(MANY[(i + j) % 12] for j in (1, 2, 3)) for i in range(12)]  # not the turn order


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
    settings = FederationSettings(max_depth=3, trees_per_round=4, acceptance_evaluators=3)
    plan, ws = toy_cyclic_federation(tmp_path, nodes, SIX, settings, rounds=1)
    r = RoundState(ws, plan, 1)
    phases.run_stages(r, nodes)
    assert {b: n.questions for b, n in nodes.items()} == {b: 3 for b in SIX}  # k a round each, not n
    stages = records.read_acceptance(ws, 1)["stages"]
    assert [s["stage"] for s in stages] == r.stages()
    for stage in stages:
        [turn] = stage["stage"]
        expected = panel(SIX, [turn], 3, plan.seed, 1)
        r.stage = stage["stage"]
        assert secure.state(r)["banks"] == expected and stage["masked"] and stage["faults"] == []
        assert stage["banks"][turn]["evaluators"] == expected and turn not in expected
    verdict = ws.read_json(r.path("checks"))
    refused = [x["bank"] for x in verdict["rejections"] if x["check"] == acceptance.REFUSED]
    assert refused == ["gamma"], [s["banks"] for s in stages]
    assert sorted(verdict["participants"]) == [b for b in SIX if b != "gamma"]
