"""A bank scores models it is sent on its own holdout: cross-evaluation and acceptance.

``score_question`` answers a ``fedfraud.crosscheck.ScoreQuestion``: every model goes through the
bank's ordinary entry check once, every variant (a model minus some trees) is scored from it
(``bank_node.variant_scoring``), and only each variant's report (metrics and score histograms)
leaves. ``local_model`` is the bank's model from its own rows for cross-evaluation; its trees *do*
leave the bank (they are scored at the others), so a bank may refuse it (``share_local_model: false``
in its agent config).

A question with ``masking`` (acceptance, the default) is answered masked: the bank verifies the relayed
key offers of the session's banks (at least three), derives the pairwise keys and sends each variant's
histograms as masked words at its own slot (the variant's place in the sorted labels), never metrics.
One answer per session: a different question under the same session is refused (``mask_reuse``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from bank_node.evaluation import evaluation_report, finite, score_histograms
from bank_node.masked_evaluation import earlier_answer, session_masker
from bank_node.variant_scoring import variant_scores
from fedfraud import model_json
from fedfraud.crosscheck import MAX_VARIANTS, MaskedScoreAnswer, ScoreAnswer, ScoreQuestion
from fedfraud.secagg.keys import KeyAgreementRefused
from fedfraud.secagg.masking import encode_counts, words_to_text
from fedfraud.wire import TrainTask, WireFormatError

if TYPE_CHECKING:
    from bank_node.node import BankNode


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
    if question.purpose != "accept" or not isinstance(masking, dict):
        raise KeyAgreementRefused("masking_malformed", "only an acceptance question is masked, with an object")
    session, masker = session_masker(node, masking.get("session"), masking.get("banks"), masking.get("offers"))
    digest = question.digest()
    if (earlier := earlier_answer(node, session, "accept", digest)) is not None:
        return earlier  # the same answer again is harmless
    words = {}
    for slot, (label, (_, scores)) in enumerate(variant_scores(node, question).items()):  # sorted labels
        counts = np.concatenate(score_histograms(scores, node.data.y_holdout)).astype(np.int64)
        words[label] = words_to_text(masker.mask(encode_counts(counts), slot))
    body = MaskedScoreAnswer(node.bank, question.round_id, "accept", session, digest, words).to_bytes()
    node.secagg_store.keep(session, "accept", digest, body)
    return body


def local_model(node: "BankNode", task_bytes: bytes) -> bytes:
    """Trees from this bank's rows alone, for the others to score (round 0, no base model)."""
    if not node.share_local_model:
        raise LocalModelRefused(f"{node.bank} does not share its local model for cross-evaluation")
    task = TrainTask.from_bytes(task_bytes)
    if task.round_id != 0 or task.base_model is not None:
        raise WireFormatError("a local-model task is round 0 and has no base model")
    return node.train(task_bytes)
