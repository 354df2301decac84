"""A bank's side of masked acceptance under one key agreement per round: it verifies the round's offers once and
keeps them, masks each question under its label, and refuses by name another question or bank list under a label
it answered, offers that change within the round, and questions that are not its round's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import four_toy_banks, masked_toy_nodes

from bank_node.evaluation import score_histograms
from bank_node.variant_scoring import variant_scores
from fedfraud.crosscheck import MaskedScoreAnswer, ScoreQuestion
from fedfraud.secagg.masking import SecureAggregationError, decode_counts, unmasked_sum, words_from_text
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import KeyRequest, ModelUpdate, SessionOffer, TrainTask

BANKS = ["alpha", "beta", "delta", "gamma"]
PARAMS = {**consortium_params(FederationSettings(max_depth=3), 50, 500), "seed": 1}
SESSION = "fed0/round-1/accept/0123456789abcdef"
LABEL = "stage-0/first/attempt-1/00112233aabbccdd"


@pytest.fixture(scope="module")
def round_keys(toy_banks, tmp_path_factory):
    """Four banks that offered a key for round 1's acceptance session, their offers, and a model to judge."""
    nodes = masked_toy_nodes(four_toy_banks(toy_banks), tmp_path_factory.mktemp("keys"), BANKS)
    request = KeyRequest(SESSION, BANKS).to_bytes()
    offers = {b: vars(SessionOffer.from_bytes(n.offer(request))) for b, n in nodes.items()}
    task = TrainTask(bank="beta", round_id=1, base_model_id="none", contract_hash="h", num_trees=6, params=PARAMS)
    model = ModelUpdate.from_bytes(nodes["beta"].train(task.to_bytes())).model
    return nodes, offers, model


def question(model, label=LABEL, banks=BANKS, offers=None, drop=(0,), round_id=1, session=SESSION):
    masking = {"session": session, "label": label, "banks": banks, **({"offers": offers} if offers else {})}
    variants = {"with_all": {"model": "candidate", "drop": []}, "without": {"model": "candidate", "drop": list(drop)}}
    return ScoreQuestion(round_id, "accept", variants, {"candidate": model}, masking)


def answers(nodes, q: ScoreQuestion, banks) -> dict[str, MaskedScoreAnswer]:
    return {b: MaskedScoreAnswer.from_bytes(nodes[b].score(q.to_bytes())) for b in banks}


def clear_sum(nodes, q: ScoreQuestion, banks, variant: str) -> np.ndarray:
    plain = dataclasses.replace(q, masking=None)
    return sum(np.concatenate(score_histograms(variant_scores(nodes[b], plain)[variant][1],
                                               nodes[b].data.y_holdout)) for b in banks)


def summed(answered: dict[str, MaskedScoreAnswer], variant: str) -> np.ndarray:
    return decode_counts(unmasked_sum([words_from_text(a.words[variant], 2000) for a in answered.values()]))


def refused(node, q: ScoreQuestion, check: str):
    with pytest.raises(SecureAggregationError) as caught:
        node.score(q.to_bytes())
    assert str(caught.value).startswith(check), caught.value


def test_offers_once_per_round_then_labels_masks_cancel_and_differ(round_keys):
    nodes, offers, model = round_keys
    first = question(model, offers=offers)
    answered = answers(nodes, first, BANKS)
    for variant in ("with_all", "without"):
        assert np.array_equal(summed(answered, variant), clear_sum(nodes, first, BANKS, variant))
    assert all(a.label == LABEL and a.session == SESSION for a in answered.values())
    turn = question(model, label=LABEL.replace("stage-0", "stage-1"))  # the next turn: by reference, no offers
    assert "offers" not in turn.masking and b"certificate" not in turn.to_bytes()
    again = answers(nodes, turn, BANKS)
    assert np.array_equal(summed(again, "with_all"), clear_sum(nodes, turn, BANKS, "with_all"))
    for b in BANKS:  # the same vector under the next turn's label: other words
        assert again[b].words["with_all"] != answered[b].words["with_all"]
    assert answers(nodes, first, BANKS) == answered  # the same question again: the same answer


def test_a_rerun_without_a_bank_under_a_new_label_cancels(round_keys):
    nodes, _, model = round_keys
    label = LABEL.replace("stage-0", "stage-2")
    q1 = question(model, label=label)
    aborted = answers(nodes, q1, BANKS[:3])  # gamma never answers attempt 1
    rerun = question(model, label=label.replace("attempt-1", "attempt-2"), banks=BANKS[:3])
    answered = answers(nodes, rerun, BANKS[:3])
    assert np.array_equal(summed(answered, "with_all"), clear_sum(nodes, rerun, BANKS[:3], "with_all"))
    left = unmasked_sum([words_from_text(a.words["with_all"], 2000) for a in aborted.values()])
    assert len(set(left.tolist())) > 1900  # attempt 1 without gamma: its masks stay, no counts
    for b in BANKS[:3]:  # one bank's two uploads differ by noise, not by a vector of counts
        one, two = (words_from_text(a[b].words["with_all"], 2000) for a in (aborted, answered))
        assert len(set((one - two).tolist())) > 1900


def test_another_question_or_bank_list_under_an_answered_label_is_refused_by_name(round_keys):
    nodes, _, model = round_keys
    label = LABEL.replace("stage-0", "stage-3")
    nodes["alpha"].score(question(model, label=label).to_bytes())
    refused(nodes["alpha"], question(model, label=label, drop=[1]), "mask_reuse")  # another vector, same label
    refused(nodes["alpha"], question(model, label=label, banks=BANKS[:3]), "mask_reuse")  # another bank list


def test_questions_not_of_the_bank_s_round_keys_are_refused_by_name(round_keys, toy_banks, tmp_path):
    nodes, offers, model = round_keys
    label = LABEL.replace("stage-0", "stage-4")
    changed = {**offers, "beta": {**offers["beta"], "public_key": offers["delta"]["public_key"]}}
    refused(nodes["alpha"], question(model, label=label, offers=changed), "offer_changed")
    refused(nodes["alpha"], question(model, label="stage-4/first/attempt-1"), "label_malformed")  # no nonce
    refused(nodes["alpha"], question(model, label=label, round_id=2), "session_not_this_round")
    refused(nodes["alpha"], question(model, label=label, banks=["alpha", "beta"]), "too_few_parties")
    no_label = dataclasses.replace(question(model), masking={"session": SESSION, "banks": BANKS, "offers": offers})
    refused(nodes["alpha"], no_label, "masking_malformed")
    other = masked_toy_nodes(four_toy_banks(toy_banks), tmp_path, BANKS)  # fresh banks: no offer, no offers held
    refused(other["alpha"], question(model, label=label), "session_unknown")
    other["alpha"].offer(KeyRequest(SESSION, BANKS).to_bytes())
    refused(other["alpha"], question(model, label=label), "session_offers_unknown")
    outsider = "fed0/round-1/accept/ffffffffffffffff"  # gamma's offer not relayed: a label naming it is refused
    three = {b: vars(SessionOffer.from_bytes(other[b].offer(KeyRequest(outsider, BANKS).to_bytes())))
             for b in BANKS[:3]}
    refused(other["beta"], question(model, label=label, offers=three, session=outsider), "session_bank_unknown")
