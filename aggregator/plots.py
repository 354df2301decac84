"""Round charts for the aggregator: PR curves, metrics by round, feature importance (PNG files)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import xgboost
from matplotlib.ticker import MaxNLocator

from fedfraud.scores import average_precision, pr_curve

POOLED = "pooled"
_DEFAULT_NAME = re.compile(r"^f(\d+)$")


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def _no_data(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def pr_curves_png(histograms: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """One precision-recall curve per bank (``pooled`` last, bold), AP in the legend."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    names = sorted(name for name in histograms if name != POOLED)
    if POOLED in histograms:
        names.append(POOLED)
    for name in names:
        pos, neg = histograms[name]
        precision, recall = pr_curve(pos, neg)
        ap = average_precision(pos, neg)
        bold = name == POOLED
        ax.plot(recall, precision, drawstyle="steps-post", label=f"{name} (AP={ap:.3f})",
                linewidth=2.5 if bold else 1.2, color="black" if bold else None)
    if not names:
        _no_data(ax, "no score histograms")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall by bank")
    ax.grid(alpha=0.3)
    if names:
        ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


def metrics_by_round_png(history: list[dict[str, float]], path: Path, metric: str = "auprc") -> Path:
    """``metric`` per round: one line per ``{name}.{metric}`` key, ``pooled`` bold."""
    suffix = f".{metric}"
    keys = sorted({key for row in history for key in row if key.endswith(suffix)})
    keys.sort(key=lambda key: key == f"{POOLED}{suffix}")  # pooled drawn last (on top)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key in keys:
        points = sorted((row["round"], row[key]) for row in history if key in row and "round" in row)
        if not points:
            continue
        rounds, values = zip(*points)
        bold = key == f"{POOLED}{suffix}"
        ax.plot(rounds, values, marker="o", label=key[: -len(suffix)],
                linewidth=2.5 if bold else 1.2, color="black" if bold else None)
    if keys:
        ax.legend(fontsize="small")
    else:
        _no_data(ax, f"no '{metric}' metrics yet")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel=metric, title=f"{metric} by round")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _display_name(name: str, feature_names: list[str]) -> str:
    match = _DEFAULT_NAME.match(name)
    if match and name not in feature_names and int(match.group(1)) < len(feature_names):
        return feature_names[int(match.group(1))]
    return name


def feature_importance_png(booster: xgboost.Booster, feature_names: list[str], path: Path, top: int = 25) -> Path:
    """Horizontal bars of total gain for the ``top`` features (``f{i}`` shown as ``feature_names[i]``)."""
    scores = booster.get_score(importance_type="total_gain")
    ranked = sorted(((_display_name(name, feature_names), float(gain)) for name, gain in scores.items()),
                    key=lambda item: item[1], reverse=True)[:top]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(ranked) + 1.2)))
    if ranked:
        labels, gains = zip(*reversed(ranked))  # largest at the top
        ax.barh(labels, gains, color="tab:blue")
    else:
        _no_data(ax, "model has no splits")
    ax.set(xlabel="total gain", title=f"Feature importance (top {len(ranked)})")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
