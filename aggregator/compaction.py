"""Compaction of a bagged model: smaller models proposed by the aggregator, judged by the banks.

Bagging appends banks x trees per round, so a model and its scoring time grow every round. The
aggregator sees the model only, never a row, so it cannot refit anything; it *proposes* smaller
models and the banks judge them through their ordinary evaluation path (reports only). Two
families of candidates, both expressed as "the expanded model without some trees", so one model
document goes to the banks:

* *thinning*: a round's banks grew their trees on the same model from different rows, so their
  blocks are near-duplicates of one step. Thinning an earlier round keeps only the block of its
  bank with the largest weight, scaled by (the round's weights) / (its weight) so the round still
  takes a whole step; ``thin:n`` thins the n oldest rounds not yet thinned. The scaled copies of
  the kept blocks are appended to the model (``expand``); a candidate drops either the copy or
  the originals of each round.
* *weakest trees*: ``drop:n`` drops the n earlier trees of smallest mean |leaf value|.

``choose`` keeps the candidate with the fewest trees whose pooled AUPRC loss against the
uncompacted model stays within ``tolerance`` in *every* pool that leaves one bank out, so no
single bank's answers (a liar's, or one noisy holdout) can push a drop that the others notice.
With ``compaction_budget`` the tolerance is the whole federation's: a round may lose only what the
earlier rounds' chosen losses (``spend``: the positive ones, summed) left of it, so small per-round
losses cannot add up beyond it; a drop the banks measure as free stays allowed.
The round's new trees are dropped only with ``compaction_new_trees``; the next round's trees grow on
the compacted model.

Provenance — which round and bank each tree came from, and the weight its leaves carry — is the
aggregator's own record (``[round, bank, weight]`` per tree), kept next to every round's model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedfraud import crosscheck, model_json
from fedfraud.model_json import Doc
from fedfraud.wire import EvaluationReport

FULL = "full"
Origin = list  # [round, bank, weight]: where a tree came from, the weight its leaves were scaled by


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


@dataclass(frozen=True)
class Thinning:
    """One earlier round: the kept block (its indices), every other tree of the round, the kept block's scale."""

    round_id: int
    bank: str
    kept: list[int]
    others: list[int]
    factor: float
    weight: float  # the round's summed weight, carried by the scaled copy


def thinnings(origins: list[Origin], droppable: int) -> list[Thinning]:
    """Every earlier round with more than one bank's block, oldest first."""
    rounds: dict[int, dict[str, list[int]]] = {}
    weights: dict[tuple[int, str], float] = {}
    for index, (round_id, bank, weight) in enumerate(origins[:droppable]):
        rounds.setdefault(round_id, {}).setdefault(bank, []).append(index)
        weights[round_id, bank] = float(weight)
    out = []
    for round_id in sorted(rounds):
        blocks = rounds[round_id]
        if len(blocks) < 2:
            continue
        bank = max(blocks, key=lambda b: (weights[round_id, b], b))
        total = sum(weights[round_id, b] for b in blocks)
        if not weights[round_id, bank] > 0:
            continue
        others = sorted(i for b, indices in blocks.items() if b != bank for i in indices)
        out.append(Thinning(round_id, bank, blocks[bank], others, total / weights[round_id, bank], total))
    return out


def expand(doc: Doc, thins: list[Thinning]) -> Doc:
    """``doc`` followed by each thinned round's kept block, scaled (the copies, in ``thins`` order)."""
    forest = model_json.trees(doc)
    copies = [model_json.scale_leaves(_only(doc, [forest[i] for i in t.kept]), t.factor) for t in thins]
    return model_json.append_trees(doc, *copies)


def _only(doc: Doc, forest: list[Doc]) -> Doc:
    empty = model_json.empty_like(doc)
    empty["learner"]["gradient_booster"]["model"]["trees"] = forest
    return empty


def variants(doc: Doc, origins: list[Origin] | None, droppable: int, steps: int,
             max_fraction: float, weakest_of: int | None = None) -> tuple[Doc, dict[str, list[int]], list[Thinning]]:
    """(the expanded model, {label: tree indices of it to drop}, the thinnings): ``FULL`` is ``doc``
    itself, ``thin:n`` (earlier rounds: the first ``droppable`` trees) and ``drop:n`` (among the first
    ``weakest_of`` trees, default ``droppable``) smaller models. Without provenance, only ``drop:n``."""
    thins = thinnings(origins, droppable) if origins is not None and len(origins) >= droppable else []
    weakest_of = droppable if weakest_of is None else weakest_of
    count = len(model_json.trees(doc))
    copies, start = [], count
    for t in thins:
        copies.append(list(range(start, start + len(t.kept))))
        start += len(t.kept)
    every_copy = [i for block in copies for i in block]
    labels = {FULL: every_copy}
    order = rank(doc, weakest_of)
    for n in ladder(weakest_of, steps, max_fraction):
        labels[f"drop:{n}"] = sorted(order[:n] + every_copy)
    for n in ladder(len(thins), steps, 1.0):
        thinned = [i for t in thins[:n] for i in t.kept + t.others]
        labels[f"thin:{n}"] = sorted(thinned + [i for block in copies[n:] for i in block])
    return expand(doc, thins), labels, thins


def origins_after(origins: list[Origin], thins: list[Thinning], drop: list[int]) -> list[Origin]:
    """The provenance of the expanded model without ``drop``: a kept copy carries its round's whole weight."""
    expanded = list(origins) + [[t.round_id, t.bank, t.weight] for t in thins for _ in t.kept]
    dropped = set(drop)
    return [origin for i, origin in enumerate(expanded) if i not in dropped]


@dataclass(frozen=True)
class Verdict:
    """The chosen label (``FULL``: keep every tree), the worst pooled loss and pooled AUPRC per label."""

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


def choose(reports: dict[str, dict[str, EvaluationReport]], sizes: dict[str, int], tolerance: float) -> Verdict:
    """The label of fewest trees (``sizes``) with every leave-one-out pooled loss within ``tolerance``."""
    losses = {label: worst_loss(reports, label) for label in sizes if label != FULL}
    pooled = {label: crosscheck.auprc([reports[b][label] for b in sorted(reports)]) for label in sizes}
    fine = [label for label, loss in losses.items() if loss <= tolerance and sizes[label] < sizes[FULL]]
    best = min(fine, key=lambda label: (sizes[label], label), default=FULL)
    return Verdict(best, losses, pooled)


def allowance(tolerance: float, spent: float) -> float:
    """What a round may lose when earlier rounds already spent ``spent`` of a federation's ``tolerance``."""
    return max(0.0, tolerance - spent)


def spend(spent: float, verdict: Verdict) -> float:
    """The budget spent after ``verdict``: its chosen label's worst loss, when positive, added."""
    loss = verdict.worst_loss.get(verdict.label, 0.0)
    return spent + max(0.0, loss) if math.isfinite(loss) else spent


def sizes_of(expanded: Doc, labels: dict[str, list[int]]) -> dict[str, int]:
    """Trees left in each label's model."""
    count = len(model_json.trees(expanded))
    return {label: count - len(set(drop)) for label, drop in labels.items()}


def as_json(thins: list[Thinning]) -> list[dict[str, Any]]:
    return [t.__dict__ for t in thins]


def from_json(raw: list[dict[str, Any]]) -> list[Thinning]:
    return [Thinning(**t) for t in raw]
