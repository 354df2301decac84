"""A networked bank's agent in the masked evaluation: it signs its key offer with its mTLS certificate,
answers masked words, and sends metrics only when its config says ``share_metrics: true``."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from conftest import TOY_FEATURES, with_toy_data

from bank_node.agent import Agent, AgentConfig
from bank_node.masked_evaluation import SESSION_TTL_S, SecAggCredentials
from bank_node.node import BankNode
from fedfraud import model_json, pki
from fedfraud.config_file import TLSFiles
from fedfraud.model_guard import ModelLimits, consortium_header, rebuild_model
from fedfraud.protocol import TaskKind
from fedfraud.secagg.masking import decode_counts, unmasked_sum, words_from_text
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import (
    EvaluationReport, KeyRequest, MaskedEvaluation, MaskedEvaluationTask, ModelUpdate, SessionOffer, TrainTask,
)

PARAMS = {**consortium_params(FederationSettings(max_depth=3), 50, 500), "seed": 1}
BANKS = ["alpha", "beta", "gamma"]
SESSION = "fed/round-1/evaluate/attempt-1/0123"


@pytest.mark.parametrize("share", [False, True])
def test_the_agent_signs_with_its_tls_certificate_and_shares_metrics_only_if_configured(toy_banks, tmp_path, share):
    certs = tmp_path / "consortium"
    pki.provision("nordic", ["aggregator", *BANKS], certs)
    config = AgentConfig(bank="alpha", aggregator_url="https://127.0.0.1:1", data=tmp_path / "raw",
                         work_dir=tmp_path / "agent", tls=TLSFiles.from_folder(certs / "alpha"), share_metrics=share)
    agent = Agent(config, client=object())
    with_toy_data(agent.node, *toy_banks["alpha"])
    peers = {b: with_toy_data(BankNode(b, tmp_path, tmp_path / b, None, secagg=SecAggCredentials.from_files(
        certs / b / "ca.crt", certs / b / "cert.pem", certs / b / "key.pem")), *toy_banks[b]) for b in BANKS[1:]}
    request = KeyRequest(SESSION, BANKS).to_bytes()
    offers = {"alpha": SessionOffer.from_bytes(agent.compute(TaskKind.KEYS, request))}
    offers.update({b: SessionOffer.from_bytes(n.offer(request)) for b, n in peers.items()})
    assert offers["alpha"].certificate == (certs / "alpha" / "cert.pem").read_text()  # its mTLS certificate
    update = ModelUpdate.from_bytes(peers["beta"].train(TrainTask(
        bank="beta", round_id=1, base_model_id="none", contract_hash="h", num_trees=3, params=PARAMS).to_bytes()))
    doc = rebuild_model(update.model, ModelLimits.for_depth(3), consortium_header(TOY_FEATURES, PARAMS))
    task = MaskedEvaluationTask(SESSION, "candidate", BANKS, {b: vars(o) for b, o in offers.items()}, doc).to_bytes()
    answers = {"alpha": MaskedEvaluation.from_bytes(agent.compute(TaskKind.EVALUATE, task))}
    answers.update({b: MaskedEvaluation.from_bytes(n.evaluate_masked(task)) for b, n in peers.items()})
    assert (answers["alpha"].metrics != {}) == share and answers["beta"].metrics == {}
    total = decode_counts(unmasked_sum([words_from_text(a.words, 2000) for a in answers.values()]))
    clear = [EvaluationReport.from_bytes(n.evaluate(model_json.to_bytes(doc))) for n in [agent.node, *peers.values()]]
    assert np.array_equal(total, np.sum([r.hist_pos + r.hist_neg for r in clear], axis=0))


def test_banks_given_one_work_folder_by_mistake_keep_their_own_keys_and_answers(toy_banks, tmp_path):
    certs, shared = tmp_path / "consortium", tmp_path / "one-folder"
    pki.provision("nordic", ["aggregator", *BANKS], certs)
    nodes = {b: with_toy_data(BankNode(b, tmp_path, shared, None, secagg=SecAggCredentials.from_files(
        certs / b / "ca.crt", certs / b / "cert.pem", certs / b / "key.pem")), *toy_banks[b]) for b in BANKS}
    request = KeyRequest(SESSION, BANKS).to_bytes()
    offers = {b: SessionOffer.from_bytes(n.offer(request)) for b, n in nodes.items()}
    assert len({o.public_key for o in offers.values()}) == len(BANKS)  # one key each, not the first bank's
    update = ModelUpdate.from_bytes(nodes["beta"].train(TrainTask(
        bank="beta", round_id=1, base_model_id="none", contract_hash="h", num_trees=3, params=PARAMS).to_bytes()))
    doc = rebuild_model(update.model, ModelLimits.for_depth(3), consortium_header(TOY_FEATURES, PARAMS))
    task = MaskedEvaluationTask(SESSION, "candidate", BANKS, {b: vars(o) for b, o in offers.items()}, doc).to_bytes()
    answers = {b: MaskedEvaluation.from_bytes(n.evaluate_masked(task)) for b, n in nodes.items()}
    assert {b: a.bank for b, a in answers.items()} == {b: b for b in BANKS}  # never another bank's kept answer
    total = decode_counts(unmasked_sum([words_from_text(a.words, 2000) for a in answers.values()]))
    clear = [EvaluationReport.from_bytes(n.evaluate(model_json.to_bytes(doc))) for n in nodes.values()]
    assert np.array_equal(total, np.sum([r.hist_pos + r.hist_neg for r in clear], axis=0))


def test_a_new_offer_deletes_sessions_unused_for_a_week(tmp_path):
    certs = tmp_path / "consortium"
    pki.provision("nordic", ["aggregator", *BANKS], certs)
    node = BankNode("alpha", tmp_path, tmp_path / "alpha", None, secagg=SecAggCredentials.from_files(
        certs / "alpha" / "ca.crt", certs / "alpha" / "cert.pem", certs / "alpha" / "key.pem"))
    node.offer(KeyRequest(SESSION, BANKS).to_bytes())
    (old,) = [p for p in (tmp_path / "alpha" / "secagg").iterdir()]
    week_ago = time.time() - SESSION_TTL_S - 60
    os.utime(old, (week_ago, week_ago))
    recent = SESSION.replace("attempt-1", "attempt-2")
    node.offer(KeyRequest(recent, BANKS).to_bytes())
    kept = [p.name for p in (tmp_path / "alpha" / "secagg").iterdir()]
    assert old.name not in kept and len(kept) == 1  # the week-old session's private key is gone, the new one kept
    node.offer(KeyRequest(recent, BANKS).to_bytes())  # a session in use is kept (same key if asked again)
    assert [p.name for p in (tmp_path / "alpha" / "secagg").iterdir()] == kept


def test_a_session_serves_one_phase_so_no_two_phases_share_a_keystream(tmp_path):
    """Phases number their mask slots on their own (planning counts and cross-evaluation both start at 2**32):
    a session reused by the aggregator for a second phase is refused before anything is masked."""
    from bank_node.masked_evaluation import earlier_answer
    from fedfraud.secagg.masking import MaskReuse

    node = BankNode("alpha", tmp_path, tmp_path / "alpha", None)
    assert earlier_answer(node, SESSION, "planning-counts", "d1") is None
    node.secagg_store.keep(SESSION, "planning-counts", "d1", b"{}")
    assert earlier_answer(node, SESSION, "planning-counts", "d1") == b"{}"  # the same answer again
    for other in ("crossval", "grid", "accept", "candidate"):
        with pytest.raises(MaskReuse, match="already serves planning-counts"):
            earlier_answer(node, SESSION, other, "d2")
    assert earlier_answer(node, SESSION.replace("attempt-1", "attempt-2"), "candidate", "m") is None
    assert earlier_answer(node, SESSION.replace("attempt-1", "attempt-2"), "champion", "m") is None  # one phase
