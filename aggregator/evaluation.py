"""Federated evaluation: consortium figures from summed score histograms, never from a score.

In a round the aggregator gets the pooled histograms only as the sum of the banks' masked words
(``pooled_evaluation``; ``aggregator.protocol.secure_evaluation``), and per-bank metrics only from
banks that share them (``metric_problem`` screens them). ``combine``/``screen_reports`` judge
clear reports (the in-process baselines): a report of the wrong shape, with counts that are not
non-negative integers, whose totals differ from the holdout counts the bank reported at planning,
or about another model, is excluded by name, never combined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfraud.scores import BINS, average_precision, pr_curve, recall_at_fpr
from fedfraud.wire import EvaluationReport, WireFormatError


@dataclass(frozen=True)
class FederatedEvaluation:
    per_bank: dict[str, dict[str, float]]
    pooled: dict[str, float]
    histograms: dict[str, tuple[np.ndarray, np.ndarray]]  # per bank and "pooled"


def precision_at_budget(pos_hist: np.ndarray, neg_hist: np.ndarray, budget: float) -> float:
    """Precision of the highest-scoring bins that hold at least ``budget`` of all rows."""
    precision, _ = pr_curve(pos_hist, neg_hist)
    flagged = np.cumsum((np.asarray(pos_hist) + np.asarray(neg_hist))[::-1])
    reached = np.nonzero(flagged >= budget * flagged[-1])[0]
    return float(precision[reached[0]]) if len(reached) else 0.0


def pooled_metrics(pos: np.ndarray, neg: np.ndarray, alert_budget: float) -> dict[str, float]:
    return {
        "auprc": average_precision(pos, neg),
        "recall_at_1pct_fpr": recall_at_fpr(pos, neg, 0.01),
        "precision_at_budget": precision_at_budget(pos, neg, alert_budget),
        "positives": float(pos.sum()),
        "negatives": float(neg.sum()),
    }


def pooled_evaluation(pos: np.ndarray, neg: np.ndarray, per_bank: dict[str, dict[str, float]],
                      alert_budget: float) -> FederatedEvaluation:
    """Pooled metrics from the (unmasked) summed histograms; per-bank metrics as shared, if any."""
    return FederatedEvaluation(per_bank=per_bank, pooled=pooled_metrics(pos, neg, alert_budget),
                               histograms={"pooled": (pos, neg)})


def combine(reports: list[EvaluationReport], alert_budget: float) -> FederatedEvaluation:
    """Clear reports (in-process baselines): per-bank metrics and histograms, pooled from their sum."""
    histograms = {r.bank: (np.asarray(r.hist_pos), np.asarray(r.hist_neg)) for r in reports}
    pos = np.sum([h[0] for h in histograms.values()], axis=0)
    neg = np.sum([h[1] for h in histograms.values()], axis=0)
    return FederatedEvaluation(
        per_bank={r.bank: dict(r.metrics) for r in reports},
        pooled=pooled_metrics(pos, neg, alert_budget),
        histograms={**histograms, "pooled": (pos, neg)},
    )


MAX_METRICS = 16


def metric_problem(metrics: Any) -> str | None:
    """Why shared metrics are unusable (None: at most 16 named numbers in [0, 1])."""
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and 0.0 <= v <= 1.0 for k, v in metrics.items()):
        return f"metrics must be at most {MAX_METRICS} named numbers in [0, 1]"
    return None


def _counts(values: Any) -> bool:
    return (isinstance(values, list) and len(values) == BINS
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values))


def report_problem(sender: str, report: EvaluationReport, model_id: str,
                   holdout: dict[str, int] | None) -> tuple[str, str] | None:
    """(check, detail) when a bank's report must not be combined; ``holdout``: its counts as planned
    (None only for a plan written before counts were recorded)."""
    if report.bank != sender:
        return "wrong_sender", f"report claims bank {str(report.bank)[:40]}, sent by {sender}"
    if report.model_id != model_id:
        return "wrong_model", f"report on model {str(report.model_id)[:32]}, the round's model is {model_id}"
    if not (_counts(report.hist_pos) and _counts(report.hist_neg)):
        return "report_shape", f"histograms must be {BINS} non-negative integers each"
    for name in ("positives", "negatives"):
        value = getattr(report, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return "report_counts", f"{name} {str(value)[:24]} is not a non-negative integer"
    if sum(report.hist_pos) != report.positives or sum(report.hist_neg) != report.negatives:
        return "report_totals", (f"histograms hold {sum(report.hist_pos)}/{sum(report.hist_neg)} rows, the report "
                                 f"says {report.positives}/{report.negatives}")
    if holdout and report.positives + report.negatives != holdout["holdout_rows"]:
        return "report_totals", (f"{report.positives + report.negatives} rows, its summary's holdout has "
                                 f"{holdout['holdout_rows']}")
    if metric_problem(report.metrics):
        return "report_metrics", "metrics must be numbers in [0, 1]"
    return None


def screen_reports(received: dict[str, bytes], model_id: str, holdout: dict[str, dict[str, int]],
                   what: str = "evaluation") -> tuple[list[EvaluationReport], list[dict[str, str]]]:
    """(reports fit to combine, named rejections ``{bank, check, detail}``) for one model's reports."""
    reports, rejections = [], []
    for sender, data in sorted(received.items()):
        try:
            report = EvaluationReport.from_bytes(data)
            if holdout and sender not in holdout:
                problem = "unexpected_bank", f"{sender} has no holdout counts in the plan"
            else:
                problem = report_problem(sender, report, model_id, holdout.get(sender))
        except WireFormatError as exc:
            problem = "malformed_report", str(exc)[:300]
        if problem:
            rejections.append({"bank": sender, "check": problem[0], "detail": f"{what}: {problem[1]}"})
        else:
            reports.append(report)
    return reports, rejections
