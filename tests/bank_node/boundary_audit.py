"""Test helpers for the boundary audit: record what a bank sends, test masked bytes for randomness, and search
the aggregator's files and logs for a bank's plaintext vectors.

``RecordingNode`` wraps a ``BankNode``: whatever its calls return is what leaves the bank in embedded mode.
``randomness_problem`` is a chi-square test on byte values plus a bit-balance test, thresholds fixed at a
false-alarm rate of about 1e-9 for uniform bytes; a plain count histogram fails it by orders of magnitude.
``leaks`` looks for a vector as JSON (compact or spaced) and as raw little-endian int64 / uint64 bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bank_node.model_cache import model_cache
from bank_node.variant_scoring import variant_scores
from fedfraud import model_json, model_refs
from fedfraud.boundary import answer_kind
from fedfraud.scores import score_histograms
from fedfraud.crosscheck import ScoreQuestion
from fedfraud.protocol import TaskKind
from fedfraud.wire import EvaluationReport, MaskedEvaluationTask

# node method -> the outgoing kind its result is (``fedfraud.boundary.OUTGOING``); ``evaluate`` is none:
# a plain evaluation report must never leave on its own in a federation
METHODS = {"summary": "summary", "train": "update", "train_histogram": "update", "local_model": "update",
           "offer": "key offer", "masked_counts": "masked counts",
           "evaluate_masked": "masked evaluation", "score": "evaluation reports",
           "bin_counts": "masked grid counts", "evaluate": "plain evaluation report"}
CHI2_LIMIT = 420.0  # 255 degrees of freedom: P(chi2 > 420) ~ 1e-9 for uniform bytes
BIT_SIGMAS = 6.0
MIN_RANDOM_BYTES = 4096


class RecordingNode:
    """A bank's node whose every answer is kept as (bank, kind, bytes) in ``sent``; the inputs of its masked
    evaluations are kept too, so the test can recompute, on the bank's side, the plaintext that was masked."""

    def __init__(self, node, sent: list[tuple[str, str, bytes]]):
        self.node, self.bank, self.sent = node, node.bank, sent
        self.masked_tasks: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.node, name)
        if name not in METHODS:
            return attribute

        def recorded(*args):
            result = attribute(*args)
            body = json.dumps(result).encode() if isinstance(result, dict) else bytes(result)
            kind = answer_kind(TaskKind.ACCEPT, body) if name == "score" else METHODS[name]  # masked or clear
            if kind in ("masked evaluation", "masked score answer"):  # a model sent by reference: the whole question
                held = model_cache(self.node).get
                self.masked_tasks.append(model_refs.expand(args[0], held, ScoreQuestion.MAX_BYTES))
            self.sent.append((self.bank, kind, body))
            return result
        return recorded

    def plaintext_histograms(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        return masked_plaintext(self.node, self.masked_tasks)


def masked_plaintext(node, masked_tasks: list[bytes]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(model id, positives', negatives' score histogram) of every model in ``masked_tasks`` (the masked
    evaluation tasks and masked acceptance questions the bank received), scored again by ``node`` on its
    holdout: the plaintext it masked."""
    found = {}
    for task_bytes in masked_tasks:
        if b'"masking"' in task_bytes:  # a masked acceptance or cross-evaluation question: every variant, as the
            question = ScoreQuestion.from_bytes(task_bytes)  # bank scores them (its own model's too: never sent)
            for label, (_, scores) in variant_scores(node, question).items():
                found[model_json.model_id(question.variant(label))] = score_histograms(scores, node.data.y_holdout)
            continue
        model = MaskedEvaluationTask.from_bytes(task_bytes).model
        report = EvaluationReport.from_bytes(node.evaluate(json.dumps(model).encode()))
        found[report.model_id] = (np.asarray(report.hist_pos), np.asarray(report.hist_neg))
    return [(model_id, pos, neg) for model_id, (pos, neg) in sorted(found.items())]


def randomness_problem(data: bytes, what: str) -> str | None:
    """Why ``data`` does not look like uniformly random bytes (None: it does)."""
    if len(data) < MIN_RANDOM_BYTES:
        return f"{what}: {len(data)} bytes are too few to judge (need {MIN_RANDOM_BYTES})"
    values = np.frombuffer(data, dtype=np.uint8)
    expected = len(values) / 256
    chi2 = float(((np.bincount(values, minlength=256) - expected) ** 2 / expected).sum())
    if chi2 > CHI2_LIMIT:
        return f"{what}: byte values are not uniform (chi-square {chi2:.0f} > {CHI2_LIMIT:.0f}, 255 dof)"
    ones = float(np.unpackbits(values).mean())
    sigma = 0.5 / math.sqrt(8 * len(values))
    if abs(ones - 0.5) > BIT_SIGMAS * sigma:
        return f"{what}: bits are unbalanced ({ones:.4f} ones, > {BIT_SIGMAS:.0f} sigma from 0.5)"
    return None


def encodings(vector: np.ndarray) -> list[bytes]:
    """How a vector of counts could sit in a file: JSON lists and raw little-endian words."""
    values = np.asarray(vector).astype(np.int64)
    as_list = values.tolist()
    return [json.dumps(as_list, separators=(",", ":")).encode(), json.dumps(as_list).encode(),
            values.astype("<i8").tobytes(), values.astype("<u8").tobytes()]


def distinctive(vector: np.ndarray) -> bool:
    """Enough non-zero counts that finding the whole vector by chance is out of the question."""
    return int(np.count_nonzero(vector)) >= 3


def leaks(vector: np.ndarray, blobs: dict[str, bytes]) -> list[str]:
    """Names of the blobs holding ``vector`` in any of its encodings."""
    forms = encodings(vector)
    return [name for name, blob in blobs.items() if any(form in blob for form in forms)]


def documented_in_clear(name: str) -> bool:
    """Files of the aggregator that may hold what README lists as leaving in the clear when a consortium chooses
    it: acceptance answers with ``acceptance_masked: false`` (the workspace's ``acceptance/stage-N/answers``, the
    service's ``exchange`` copies of ``accept`` uploads). Cross-evaluation's answers are masked: none is here."""
    return ("/acceptance/" in name and "/answers/" in name) or "/exchange/accept-" in name


def files_of(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root``, by relative path (the aggregator's workspace, databases, artifacts)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def report_histograms(answer: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
    """The clear histograms in a score answer (acceptance or cross-evaluation in the clear, a consortium's choice)."""
    reports = json.loads(answer)["reports"].values()
    return [(np.asarray(r["hist_pos"]), np.asarray(r["hist_neg"])) for r in reports]
