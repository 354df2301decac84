"""A bank scores models it is sent on its own holdout: cross-evaluation and acceptance.

``score_question`` answers a ``fedfraud.crosscheck.ScoreQuestion``: every variant (a model minus
some trees) goes through the node's ordinary ``evaluate`` — the same checks as any received
model — and only its report (metrics and score histograms) leaves. ``local_model`` is the
bank's model from its own rows for cross-evaluation; its trees *do* leave the bank (they are
scored at the others), so a bank may refuse it (``share_local_model: false`` in its agent config).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from fedfraud.crosscheck import MAX_VARIANTS, ScoreAnswer, ScoreQuestion
from fedfraud.model_json import to_bytes
from fedfraud.wire import EvaluationReport, TrainTask, WireFormatError

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
    reports = {}
    for label in sorted(question.variants):
        report = EvaluationReport.from_bytes(node.evaluate(to_bytes(question.variant(label))))
        reports[label] = asdict(report)
    return ScoreAnswer(node.bank, question.round_id, question.purpose, reports).to_bytes()


def local_model(node: "BankNode", task_bytes: bytes) -> bytes:
    """Trees from this bank's rows alone, for the others to score (round 0, no base model)."""
    if not node.share_local_model:
        raise LocalModelRefused(f"{node.bank} does not share its local model for cross-evaluation")
    task = TrainTask.from_bytes(task_bytes)
    if task.round_id != 0 or task.base_model is not None:
        raise WireFormatError("a local-model task is round 0 and has no base model")
    return node.train(task_bytes)
