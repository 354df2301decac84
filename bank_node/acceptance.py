"""A bank scores models it is sent on its own holdout: cross-evaluation and acceptance.

``score_question`` answers a ``fedfraud.crosscheck.ScoreQuestion``: every model goes through the
bank's ordinary entry check once, every variant (a model minus some trees) is scored from it
(``bank_node.variant_scoring``), and only each variant's report (metrics and score histograms)
leaves. ``local_model`` is the bank's model from its own rows for cross-evaluation; its trees *do*
leave the bank (they are scored at the others), so a bank may refuse it (``share_local_model: false``
in its agent config).

A question with ``masking`` (acceptance and cross-evaluation, the defaults) is answered masked: the bank
verifies the relayed key offers of the session's banks (at least three), derives the pairwise keys and
sends each variant's histograms as masked words at its own slot (the variant's place in the sorted labels),
never metrics. Cross-evaluation: one answer per session, a different question under the same session is
refused (``mask_reuse``). Acceptance: one key session per round, one answer per label of it (its turn,
question and attempt; ``bank_node.acceptance_keys``), another question or bank list under a label refused
(``mask_reuse``). A masked cross-evaluation question (``_crossval_variants``) names each variant by the
session bank whose local model it is: the bank sends **zeros** in its own model's slot (so each model is
pooled at the other banks only) after checking that the model named for it is the one it sent, and refuses
any other shape: the aggregator cannot ask one model twice under different banks' names and difference the
sums.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from bank_node import acceptance_keys
from bank_node.evaluation import evaluation_report, finite, score_histograms
from bank_node.masked_evaluation import earlier_answer, session_masker
from bank_node.variant_scoring import variant_scores
from fedfraud import model_json
from fedfraud.crosscheck import MAX_VARIANTS, MaskedScoreAnswer, ScoreAnswer, ScoreQuestion
from fedfraud.model_guard import parse_received_model
from fedfraud.scores import BINS
from fedfraud.secagg.keys import KeyAgreementRefused
from fedfraud.secagg.masking import encode_counts, words_to_text
from fedfraud.wire import ModelUpdate, TrainTask, WireFormatError

if TYPE_CHECKING:
    from bank_node.node import BankNode


CROSSVAL_SLOTS = 1 << 32  # cross-evaluation's mask labels start here: never an evaluation's or acceptance's
SENT_LOCAL_MODEL = "crossval/local_models.json"  # under the bank's work folder: the trees it sent, by digest
KEPT_LOCAL_MODELS = 16  # another of its own local models under its name is still its own: no differencing


class LocalModelRefused(RuntimeError):
    """The bank does not share its local model (its policy): cross-evaluation goes on without it."""


def score_question(node: "BankNode", question_bytes: bytes) -> bytes:
    question = ScoreQuestion.from_bytes(question_bytes)
    if not isinstance(question.variants, dict) or not isinstance(question.models, dict):
        raise WireFormatError("a score question holds models and variants as objects")
    if len(question.variants) > MAX_VARIANTS:
        raise WireFormatError(f"{len(question.variants)} variants exceed the limit of {MAX_VARIANTS}")
    if question.masking is not None:
        return _score_masked(node, question)
    reports = {}
    labels = node.data.y_holdout
    for label, (doc, scores) in variant_scores(node, question).items():
        model_id = model_json.model_id(doc if doc is not None else question.variant(label))
        report = evaluation_report(node.bank, model_id, scores, labels, node.alert_budget)
        reports[label] = asdict(dataclasses.replace(report, metrics=finite(report.metrics)))
    return ScoreAnswer(node.bank, question.round_id, question.purpose, reports).to_bytes()


def _score_masked(node: "BankNode", question: ScoreQuestion) -> bytes:
    """Every variant's histograms as masked words, under the question's session (keys offered in ``keys``)."""
    masking = question.masking
    if question.purpose not in ("accept", "crossval") or not isinstance(masking, dict):
        raise KeyAgreementRefused("masking_malformed", "only acceptance and cross-evaluation questions are masked, "
                                                       "with an object")
    if question.purpose == "accept":
        return _score_labelled(node, question)
    if "label" in masking:
        raise KeyAgreementRefused("masking_malformed", "a masked cross-evaluation has a session of its own, no label")
    session, masker = session_masker(node, masking.get("session"), masking.get("banks"), masking.get("offers"))
    digest, purpose, labels = question.digest(), question.purpose, sorted(question.variants)
    first_slot, scored = 0, question
    if purpose == "crossval":
        first_slot, scored = CROSSVAL_SLOTS, _crossval_variants(node, question, session, masking["banks"])
    if (earlier := earlier_answer(node, session, purpose, digest)) is not None:
        return earlier  # the same answer again is harmless
    histograms = {label: np.concatenate(score_histograms(scores, node.data.y_holdout)).astype(np.int64)
                  for label, (_, scores) in variant_scores(node, scored).items()}
    words = {}
    for slot, label in enumerate(labels, start=first_slot):  # its own model's slot (cross-evaluation): zeros
        counts = histograms.get(label, np.zeros(2 * BINS, dtype=np.int64))
        words[label] = words_to_text(masker.mask(encode_counts(counts), slot))
    body = MaskedScoreAnswer(node.bank, question.round_id, purpose, session, digest, words).to_bytes()
    node.secagg_store.keep(session, purpose, digest, body)
    return body


def _score_labelled(node: "BankNode", question: ScoreQuestion) -> bytes:
    """An acceptance question under the round's key session: masked at its label (``acceptance_keys``)."""
    session, label, banks, masker = acceptance_keys.label_masker(node, question)
    digest = question.digest()
    if (earlier := acceptance_keys.earlier_label_answer(node, session, label, digest, banks)) is not None:
        return earlier  # the same answer again is harmless
    scored, words = variant_scores(node, question), {}
    for slot, variant in enumerate(sorted(question.variants)):  # its place in the sorted variants
        counts = np.concatenate(score_histograms(scored[variant][1], node.data.y_holdout)).astype(np.int64)
        words[variant] = words_to_text(masker.mask(encode_counts(counts), slot))
    body = MaskedScoreAnswer(node.bank, question.round_id, "accept", session, digest, words, label).to_bytes()
    acceptance_keys.keep_label_answer(node, session, label, digest, banks, body)
    return body


def _crossval_variants(node: "BankNode", question: ScoreQuestion, session: str, banks: list[str]) -> ScoreQuestion:
    """The question without this bank's own model, once the question has the only shape a masked cross-evaluation
    may have: round 0, a session of the cross-evaluation, each variant one session bank's whole local model and
    named by it, and the model under this bank's name the one it sent (``crossval_not_my_model``)."""
    if question.round_id != 0 or "/crossval/" not in session:
        raise KeyAgreementRefused("crossval_malformed", "a masked cross-evaluation is round 0, in a crossval session")
    for label in question.variants:
        model, drop = question.variant_spec(label)
        if label not in banks or model != label or drop:
            raise KeyAgreementRefused("crossval_malformed", f"variant {str(label)[:40]!r}: each variant must be a "
                                                            "session bank's whole local model, named by that bank")
    if node.bank in question.variants:
        sent = node.work_dir / SENT_LOCAL_MODEL
        mine = json.loads(sent.read_text())["trees"] if sent.exists() else []
        if trees_digest(node, question.models[node.bank]) not in mine:
            raise KeyAgreementRefused("crossval_not_my_model", f"the model named {node.bank} is not the local "
                                                               f"model {node.bank} sent")
    others = {label: spec for label, spec in question.variants.items() if label != node.bank}
    return ScoreQuestion(0, "crossval", others, {label: question.models[label] for label in others})


def trees_digest(node: "BankNode", model: object) -> str:
    """The digest of a model's trees as this bank's entry check rebuilds them (ids aside)."""
    doc = parse_received_model(model_json.to_bytes(model), node.policy.received_limits(), node.data.feature_names)
    digests = [hashlib.sha256(model_json.to_bytes({**tree, "id": 0})).hexdigest() for tree in model_json.trees(doc)]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def local_model(node: "BankNode", task_bytes: bytes) -> bytes:
    """Trees from this bank's rows alone, for the others to score (round 0, no base model)."""
    if not node.share_local_model:
        raise LocalModelRefused(f"{node.bank} does not share its local model for cross-evaluation")
    task = TrainTask.from_bytes(task_bytes)
    if task.round_id != 0 or task.base_model is not None:
        raise WireFormatError("a local-model task is round 0 and has no base model")
    body = node.train(task_bytes)
    sent = node.work_dir / SENT_LOCAL_MODEL  # what a masked question may name as this bank's own model: the last
    earlier = json.loads(sent.read_text())["trees"] if sent.exists() else []  # few it sent (federations overlap)
    digest = trees_digest(node, ModelUpdate.from_bytes(body, max_bytes=len(body)).model)
    sent.parent.mkdir(parents=True, exist_ok=True)
    sent.write_text(json.dumps({"trees": [*[d for d in earlier if d != digest], digest][-KEPT_LOCAL_MODELS:]}))
    return body
