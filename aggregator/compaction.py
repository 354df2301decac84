"""Compaction of a bagged model: drop the trees the banks' holdouts do not miss.

Bagging appends banks x trees per round, so a model and its scoring time grow every round. The
aggregator sees the model only, never a row, so it cannot refit anything; what it can do is
*propose* smaller models and let the banks judge them through the ordinary evaluation path:

* ``rank``: every droppable tree (those of earlier rounds; the round's new trees stay) ordered
  by a data-free strength, the mean |leaf value| (bagging scaled it by its bank's weight);
* ``ladder``: candidates that drop the n weakest of them, n on a geometric ladder up to
  ``max_fraction`` of them; the banks score every candidate on their holdouts (reports only);
* ``choose``: the largest drop whose pooled AUPRC loss against the uncompacted model stays
  within ``tolerance`` in *every* pool that leaves one bank out, so no single bank's answers
  (a liar's, or one noisy holdout) can push a drop that the others notice.

The next round's trees are grown on the compacted model, so boosting refits what a drop left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedfraud import crosscheck, model_json
from fedfraud.model_json import Doc
from fedfraud.wire import EvaluationReport

FULL = "full"


def strength(tree: Doc) -> float:
    """A tree's mean |leaf value|: how far it moves a score on average over its leaves."""
    leaves = [abs(float(v)) for n, v in enumerate(tree["split_conditions"]) if model_json.is_leaf(tree, n)]
    return sum(leaves) / len(leaves) if leaves else 0.0


def rank(doc: Doc, droppable: int) -> list[int]:
    """Indices of the first ``droppable`` trees, weakest first (ties: later tree first)."""
    forest = model_json.trees(doc)[:droppable]
    return sorted(range(len(forest)), key=lambda i: (strength(forest[i]), -i))


def ladder(count: int, steps: int, max_fraction: float) -> list[int]:
    """Up to ``steps`` distinct drop sizes, geometric from the largest (``max_fraction`` of ``count``) down."""
    top = int(count * max_fraction)
    sizes = {max(1, round(top * 0.75 ** k)) for k in range(steps)} if top >= 1 else set()
    return sorted(s for s in sizes if s <= top)


def drop_label(size: int) -> str:
    return f"drop:{size}"


def variants(doc: Doc, droppable: int, steps: int, max_fraction: float) -> dict[str, list[int]]:
    """{label: tree indices to drop}: the full model and every ladder step of the weakest trees."""
    order = rank(doc, droppable)
    return {FULL: [], **{drop_label(n): sorted(order[:n]) for n in ladder(droppable, steps, max_fraction)}}


@dataclass(frozen=True)
class Verdict:
    """The chosen label (``FULL``: keep every tree) and, per label, the worst pooled loss found."""

    label: str
    worst_loss: dict[str, float]
    pooled: dict[str, float]


def worst_loss(reports: dict[str, dict[str, EvaluationReport]], label: str) -> float:
    """The largest pooled AUPRC loss of ``label`` against ``FULL``, over every pool that leaves one
    bank out (with a single bank: its own holdout)."""
    banks = sorted(reports)
    pools = [[b for b in banks if b != out] for out in banks] if len(banks) > 1 else [banks]
    losses = []
    for pool in pools:
        full = crosscheck.auprc([reports[b][FULL] for b in pool])
        dropped = crosscheck.auprc([reports[b][label] for b in pool])
        losses.append(full - dropped if math.isfinite(full) and math.isfinite(dropped) else math.inf)
    return max(losses) if losses else math.inf


def choose(reports: dict[str, dict[str, EvaluationReport]], labels: list[str], tolerance: float) -> Verdict:
    """The label that drops the most trees with every leave-one-out pooled loss within ``tolerance``."""
    losses = {label: worst_loss(reports, label) for label in labels if label != FULL}
    pooled = {label: crosscheck.auprc([reports[b][label] for b in sorted(reports)]) for label in labels}
    fine = [label for label, loss in losses.items() if loss <= tolerance]
    best = max(fine, key=lambda label: int(label.split(":")[1]), default=FULL)
    return Verdict(best, losses, pooled)
