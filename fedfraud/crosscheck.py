"""Scoring other banks' models on a bank's holdout: the messages of cross-evaluation and acceptance.

The aggregator sends a ``ScoreQuestion``: a few model documents and the *variants* to score (a
model, minus some of its trees). The bank scores each variant on its own holdout through its
ordinary evaluation path (every received model is checked there) and answers a ``ScoreAnswer``:
one ``EvaluationReport`` (metrics and score histograms) per variant, never a score.

Used twice: before round 1 every bank scores every bank's local model (cross-evaluation), and
in bagging/cyclic stages every bank scores the stage's candidate with and without each bank's
update (validation-gated acceptance and contribution). An acceptance question may carry
``masking`` (a secure-aggregation session, its banks and their relayed key offers): the bank then
answers a ``MaskedScoreAnswer``, each variant's histograms as pairwise-masked words, so the
aggregator learns only each variant's histograms summed over the session's banks.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedfraud.model_json import Doc
from fedfraud.scores import BINS, average_precision
from fedfraud.wire import DEFAULT_MAX_UPDATE_BYTES, EvaluationReport, WireFormatError, WireMessage

MAX_VARIANTS = 64  # variants a bank scores in one question (each is one pass over its holdout)


@dataclass(frozen=True)
class ScoreQuestion(WireMessage):
    """``models``: named documents; ``variants``: {label: {"model": name, "drop": [tree index, …]}}."""

    KIND: ClassVar[str] = "score question"
    MAX_BYTES: ClassVar[int] = 4 * DEFAULT_MAX_UPDATE_BYTES

    round_id: int
    purpose: str  # "crossval" | "accept"
    variants: dict[str, dict[str, Any]]
    models: dict[str, Doc] = field(repr=False)
    masking: dict[str, Any] | None = field(default=None, repr=False)  # {"session", "banks", "offers"[, "label"]}

    def digest(self) -> str:
        """What a masked answer is bound to: the round, purpose, variants and models (not the masking)."""
        body = {"round_id": self.round_id, "purpose": self.purpose, "variants": self.variants, "models": self.models}
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def variant_spec(self, label: str) -> tuple[str, list[int]]:
        """(model name, tree indices to drop) of one variant, checked; else WireFormatError."""
        spec = self.variants[label]
        if not isinstance(spec, dict) or spec.get("model") not in self.models:
            raise WireFormatError(f"variant {label!r} names no model of this question")
        drop = spec.get("drop", [])
        if not isinstance(drop, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in drop):
            raise WireFormatError(f"variant {label!r}: drop must be a list of tree indices")
        return spec["model"], drop

    def variant(self, label: str) -> Doc:
        """The model document of one variant: its model without the listed trees."""
        name, drop = self.variant_spec(label)
        return drop_trees(self.models[name], drop)


@dataclass(frozen=True)
class ScoreAnswer(WireMessage):
    """A bank's reports, one per variant it was asked to score."""

    KIND: ClassVar[str] = "score answer"
    MAX_BYTES: ClassVar[int] = 16 * 1024 * 1024

    bank: str
    round_id: int
    purpose: str
    reports: dict[str, dict[str, Any]] = field(repr=False)

    def parsed(self, labels: list[str]) -> dict[str, EvaluationReport]:
        """Every asked variant's report, each well-formed and all on the same holdout; else WireFormatError."""
        missing = [label for label in labels if label not in self.reports]
        if missing:
            raise WireFormatError(f"{self.bank}'s answer lacks {', '.join(missing)}")
        try:
            reports = {label: EvaluationReport(**self.reports[label]) for label in labels}
        except TypeError as exc:
            raise WireFormatError(f"{self.bank}'s answer holds a malformed report ({exc})") from exc
        totals = set()
        for label, report in reports.items():
            pos, neg = histogram(report.hist_pos), histogram(report.hist_neg)
            if report.bank != self.bank:
                raise WireFormatError(f"{label}: report names {report.bank}, the answer {self.bank}")
            if pos is None or neg is None:
                raise WireFormatError(f"{label}: histograms must be {BINS} non-negative integers")
            if int(pos.sum()) != report.positives or int(neg.sum()) != report.negatives:
                raise WireFormatError(f"{label}: histogram totals differ from its counts")
            totals.add((report.positives, report.negatives))
        if len(totals) > 1:
            raise WireFormatError(f"{self.bank} scored its variants on holdouts of different sizes: {sorted(totals)}")
        return reports


@dataclass(frozen=True)
class MaskedScoreAnswer(WireMessage):
    """A bank's answer to a masked question: per variant, its score histograms (positives then negatives) as
    pairwise-masked uint64 words (``fedfraud.secagg.masking.words_to_text``), uniformly random alone."""

    KIND: ClassVar[str] = "masked score answer"
    MAX_BYTES: ClassVar[int] = MAX_VARIANTS * 24 * 1024 + 64 * 1024  # 64 variants of 2 x BINS words in base64

    bank: str
    round_id: int
    purpose: str
    session: str
    question: str  # the question's digest
    words: dict[str, str] = field(repr=False)
    label: str | None = None  # acceptance: the label of the round's key session the words are masked under


def histogram(values: Any) -> np.ndarray | None:
    """``values`` as BINS non-negative int64 counts, or None."""
    if not isinstance(values, list) or len(values) != BINS:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53 for v in values):
        return None
    return np.asarray(values, dtype=np.int64)


def drop_trees(doc: Doc, drop: list[int]) -> Doc:
    """``doc`` without the trees at ``drop`` (the rest renumbered in order); the header is kept."""
    if not drop:
        return doc
    try:
        model = doc["learner"]["gradient_booster"]["model"]
        dropped = set(drop)
        kept = [t for i, t in enumerate(model["trees"]) if i not in dropped]
    except (KeyError, TypeError) as exc:
        raise WireFormatError(f"not a tree model document ({exc})") from exc
    out = copy.deepcopy({**doc, "learner": {**doc["learner"], "gradient_booster": {
        **doc["learner"]["gradient_booster"], "model": {**model, "trees": []}}}})
    target = out["learner"]["gradient_booster"]["model"]
    for index, tree in enumerate(kept):
        target["trees"].append({**copy.deepcopy(tree), "id": index})
    target["tree_info"] = [0] * len(kept)
    target["iteration_indptr"] = list(range(len(kept) + 1))
    param = target["gbtree_model_param"]
    param["num_trees"] = str(len(kept)) if isinstance(param.get("num_trees"), str) else len(kept)
    return out


# ---- what the aggregator reads from reports (histograms only) -----------------------------------


def pooled(reports: list[EvaluationReport]) -> tuple[np.ndarray, np.ndarray]:
    pos = np.sum([np.asarray(r.hist_pos, dtype=np.int64) for r in reports], axis=0)
    neg = np.sum([np.asarray(r.hist_neg, dtype=np.int64) for r in reports], axis=0)
    return pos, neg


def auprc(reports: list[EvaluationReport]) -> float:
    return float(average_precision(*pooled(reports))) if reports else float("nan")


def prevalence(reports: list[EvaluationReport]) -> float:
    """The no-skill AUPRC of these holdouts: their share of positives."""
    pos, neg = pooled(reports)
    total = pos.sum() + neg.sum()
    return float(pos.sum() / total) if total else float("nan")


def roc_auc(pos_hist: Any, neg_hist: Any) -> float:
    """ROC-AUC from score histograms (ties within a bin count half); nan without both classes."""
    pos, neg = np.asarray(pos_hist, dtype=np.float64), np.asarray(neg_hist, dtype=np.float64)
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    below = np.cumsum(neg) - neg  # negatives in lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))
