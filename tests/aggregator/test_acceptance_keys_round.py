"""Cyclic rounds' masked acceptance in process, with real bank nodes on toy data: one key agreement per round (each
bank offers one key and receives every bank's offer once per round, not once per turn), a label per turn, and a
bank that drops at a later turn re-run under a new label with the others, who hold the offers already."""

from __future__ import annotations

from conftest import four_toy_banks, masked_toy_nodes, toy_cyclic_federation

from aggregator.protocol import phases, records
from aggregator.protocol import secure_acceptance as secure
from aggregator.protocol.state import RoundState
from fedfraud import model_json
from fedfraud.settings import FederationSettings

BANKS = ["alpha", "beta", "delta", "gamma"]
SETTINGS = FederationSettings(max_depth=3, trees_per_round=4)  # masked acceptance, as deployed
RECORDED_IDS = ["6ea79232ce6a85d3", "c46cca07dfeff569"]  # tests/aggregator/test_model_refs_round.py's, from 9c629af
CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


class Counting:
    """A bank node that counts its key offers and the offers it receives; ``silent_at``: the acceptance
    questions (1-based, in order) it never answers."""

    def __init__(self, node, silent_at=()):
        self.node, self.bank, self.silent_at = node, node.bank, set(silent_at)
        self.offers_made, self.offers_received, self.questions = 0, 0, 0

    def __getattr__(self, name):
        return getattr(self.node, name)

    def offer(self, request: bytes) -> bytes:
        self.offers_made += 1
        return self.node.offer(request)

    def score(self, question: bytes) -> bytes:
        self.questions += 1
        self.offers_received += question.count(CERTIFICATE)
        if self.questions in self.silent_at:
            raise ConnectionError(f"{self.bank} went away")
        return self.node.score(question)


def federate(tmp_path, toy_banks, rounds=(1, 2), silent=None):
    nodes = {b: Counting(n, (silent or {}).get(b, ())) for b, n in
             masked_toy_nodes(four_toy_banks(toy_banks), tmp_path, BANKS).items()}
    plan, ws = toy_cyclic_federation(tmp_path, nodes, BANKS, SETTINGS, rounds=len(rounds))
    per_round, ids = [], []
    for round_id in rounds:
        before = {b: (n.offers_made, n.offers_received, n.questions) for b, n in nodes.items()}
        r = RoundState(ws, plan, round_id)
        phases.run_stages(r, nodes)
        r.path("model").write_bytes(r.path("working").read_bytes())  # as the round's candidate becomes the model
        ids.append(model_json.model_id(ws.read_json(r.path("working"))))
        per_round.append({b: tuple(x - y for x, y in zip((n.offers_made, n.offers_received, n.questions), before[b]))
                          for b, n in nodes.items()})
    return ws, plan, ids, per_round


def stage_states(ws, plan, round_id) -> list[dict]:
    r = RoundState(ws, plan, round_id)
    out = []
    for stage in r.stages():
        r.stage = stage
        out.append(ws.read_json(secure.stage_folder(r) / "secagg" / "session.json"))
    return out


def test_one_key_offer_per_bank_and_round_each_relayed_once_and_the_same_models(tmp_path, toy_banks):
    ws, plan, ids, per_round = federate(tmp_path, toy_banks)
    assert ids == RECORDED_IDS  # the same models as with a key session per turn (and every model in full)
    for round_id, counted in zip((1, 2), per_round):
        for bank, (made, received, questions) in counted.items():
            assert questions == len(BANKS)  # one acceptance question per turn, n turns
            assert made == 1 and received == len(BANKS), (round_id, bank, counted)  # n offers a round, not n x n
        states = stage_states(ws, plan, round_id)
        assert len({s["session"] for s in states}) == 1 and len({s["label"] for s in states}) == len(BANKS)
        assert [s["label"].split("/")[0] for s in states] == [f"stage-{i}" for i in range(len(BANKS))]
        assert secure.round_keys(RoundState(ws, plan, round_id))["holding"] == BANKS
    assert stage_states(ws, plan, 1)[0]["session"] != stage_states(ws, plan, 2)[0]["session"]  # a round, a session


def test_a_bank_dropping_at_a_later_turn_reruns_under_a_new_label_by_reference(tmp_path, toy_banks):
    ws, plan, ids, [counted] = federate(tmp_path, toy_banks, rounds=(1,), silent={"gamma": [3]})
    third = stage_states(ws, plan, 1)[2]  # gamma drops from the third turn's acceptance, then answers again
    assert third["attempt"] == 2 and third["banks"] == ["alpha", "beta", "delta"]
    assert third["history"][0]["answered"] == third["banks"] and third["history"][0]["session"] == third["session"]
    assert third["history"][0]["label"] != third["label"] and "/attempt-2/" in third["label"]
    assert third["sent_offers"] == []  # the three hold the round's offers: the re-run is asked by reference
    stage = records.read_acceptance(ws, 1)["stages"][2]
    assert {f["bank"] for f in stage["faults"]} == {"gamma"}
    assert all(row["evaluators"] == third["banks"] for row in stage["banks"].values())
    fourth = stage_states(ws, plan, 1)[3]
    assert fourth["attempt"] == 1 and fourth["masking"] == BANKS  # the next turn asks gamma again
    assert {b: c[:2] for b, c in counted.items()} == {b: (1, len(BANKS)) for b in BANKS}
