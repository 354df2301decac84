"""Cyclic rounds in process with real bank nodes on toy data, models sent by reference: the same models as with every
model sent in full (the ids recorded before references existed), fewer bytes, and a bank that lost its cache (a
restart) is sent the full model once after its ``model_base_unknown`` refusal."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import four_toy_banks, toy_cyclic_federation, with_toy_data

from aggregator.protocol import model_refs, phases, traffic, training
from aggregator.protocol.plan import Plan
from aggregator.protocol.state import RoundState
from aggregator.protocol.workspace import Workspace
from bank_node.masked_evaluation import SecAggCredentials
from bank_node.node import BankNode
from fedfraud import model_json, pki
from fedfraud.settings import FederationSettings

BANKS = ["alpha", "beta", "delta", "gamma"]
SETTINGS = FederationSettings(max_depth=3, trees_per_round=4)  # masked acceptance, as deployed
# the two rounds' model ids with every model sent in full, recorded at 9c629af (before models by reference)
RECORDED_IDS = ["6ea79232ce6a85d3", "c46cca07dfeff569"]


def make_nodes(tmp_path, toy_banks) -> dict[str, BankNode]:
    """Fresh nodes (empty caches) on the banks' work folders: a restart."""
    certs, data = tmp_path / "consortium", four_toy_banks(toy_banks)
    if not certs.exists():
        pki.provision("nordic", ["aggregator", *BANKS], certs)
    return {b: with_toy_data(BankNode(b, tmp_path / b, tmp_path / "banks" / b, config=None, secagg=SecAggCredentials.
                                      from_files(certs / b / "ca.crt", certs / b / "cert.pem", certs / b / "key.pem")),
                             *data[b]) for b in BANKS}


def federate(tmp_path, toy_banks, restart_before_round_2=False) -> tuple[list[str], list[dict], Workspace, Plan]:
    """Two cyclic rounds' training stages; each round's model id and traffic."""
    nodes = make_nodes(tmp_path, toy_banks)
    plan, ws = toy_cyclic_federation(tmp_path, nodes, BANKS, SETTINGS, rounds=2)
    ids, sent = [], []
    for round_id in (1, 2):
        if round_id == 2 and restart_before_round_2:
            nodes = make_nodes(tmp_path, toy_banks)
        r = RoundState(ws, plan, round_id)
        phases.run_stages(r, nodes)
        r.path("model").write_bytes(r.path("working").read_bytes())  # as the round's candidate becomes the model
        ids.append(model_json.model_id(ws.read_json(r.path("working"))))
        sent.append(traffic.totals(ws.round_dir(round_id)))
    return ids, sent, ws, plan


@pytest.fixture(scope="module")
def in_full(toy_banks, tmp_path_factory):
    model_refs.ENABLED = False
    try:
        return federate(tmp_path_factory.mktemp("full"), toy_banks)
    finally:
        model_refs.ENABLED = True


def test_the_same_models_as_in_full_with_fewer_bytes(tmp_path, toy_banks, in_full):
    ids, received, ws, _ = federate(tmp_path, toy_banks)
    full_ids, full_received, _, _ = in_full
    assert ids == full_ids == RECORDED_IDS
    for round_id in (1, 2):
        for bank in BANKS:
            assert received[round_id - 1][bank]["sent"] == pytest.approx(full_received[round_id - 1][bank]["sent"],
                                                                          abs=64)  # the answers: masked, as before
            assert received[round_id - 1][bank]["received"] < full_received[round_id - 1][bank]["received"]
    # round 2 starts from round 1's model, which every bank holds: its tasks and questions carry new trees only
    assert sum(row["received"] for row in received[1].values()) < sum(
        row["received"] for row in full_received[1].values()) / 3
    latest = model_refs.held(ws, "alpha")[-1]  # the last model alpha acknowledged: the round's model
    assert latest[0][:16] == model_json.model_id(ws.read_json(ws.path(2, "working")))


def test_a_bank_that_lost_its_cache_gets_the_full_model_once(tmp_path, toy_banks, in_full, caplog):
    with caplog.at_level(logging.WARNING, logger="fedfraud"):
        ids, received, ws, _ = federate(tmp_path, toy_banks, restart_before_round_2=True)
    assert ids == in_full[0] == RECORDED_IDS
    fallbacks = [m for m in caplog.messages if "does not hold the base" in m]
    assert len(fallbacks) == len(BANKS)  # each bank's first message of round 2, once
    assert all("model_base_unknown" in m for m in fallbacks)
    assert sum("refused by model_base_unknown" in m for m in caplog.messages) == len(BANKS)  # the banks' own log
    first = sorted(BANKS)[1]  # round 2's first turn (the order rotates by one a round)
    counted = ws.read_json(ws.round_dir(2) / traffic.FOLDER / f"updates__{first}.json")
    assert counted["received"] > len(ws.path(2, "tasks", first).read_bytes())  # the envelope, then the full task


def test_each_turn_rebuilds_only_its_own_trees_and_a_working_model_written_elsewhere_whole(tmp_path, toy_banks,
                                                                                          monkeypatch):
    """``aggregate`` keeps the working model's trees it rebuilt and wrote itself at the last stage (its record
    names the file's sha256) and rebuilds the stage's trees only: the same models (the recorded ids), each a
    fixed point of ``rebuild_model``; a working model anything else wrote is rebuilt whole."""
    kept = []
    real = training.rebuild_model

    def spy(doc, limits, header, rebuilt_trees=0):
        kept.append(rebuilt_trees)
        return real(doc, limits, header, rebuilt_trees)
    monkeypatch.setattr(training, "rebuild_model", spy)
    ids, _, ws, plan = federate(tmp_path, toy_banks)
    assert ids == RECORDED_IDS
    assert kept == [0, 4, 8, 12] + [0, 20, 24, 28]  # a round's first stage starts from the global model
    r = RoundState(ws, plan, 2)
    working = ws.read_json(r.path("working"))
    assert model_json.to_bytes(real(working, plan.model_limits, plan.header)) == model_json.to_bytes(working)
    base = ws.working_model(2)
    grown = model_json.append_trees(base, working)
    assert training._rebuilt_here(r, base, grown) == 32
    assert training._rebuilt_here(r, base, model_json.append_trees(json.loads(model_json.to_bytes(base)))) == 0
    r.path("working").write_bytes(model_json.to_bytes(working) + b" ")  # as a compaction or a refit writes it
    assert training._rebuilt_here(r, ws.working_model(2), grown) == 0
