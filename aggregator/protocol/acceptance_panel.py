"""Who scores a stage's candidate: every bank of the round, or a bounded panel in a large cyclic federation.

A cyclic round has one stage per bank, and every stage's candidate was scored by every bank: n turns x
n banks questions, so each bank's scoring and the aggregator's reading of answers grew with the square of
the banks (50 banks: 2,550 questions a round). With ``acceptance_evaluators`` = k and a federation of at
least 2k banks, the federation's banks are dealt into panels of k to 2k - 1 banks once (a ring shuffled
by the federation's seed, dealt round-robin), and a turn is scored by the panel after its bank's own: each
bank answers only the turns of one other panel's banks (about k questions a round, not n), the judged bank
is never on its own panel, and no bank or turn order picks its judges.

Why fixed, disjoint panels: masked, the aggregator learns each variant's histograms summed over the
panel. The same model is scored twice — as a turn's candidate, then as the next turn's candidate without
that turn's trees (and a round's last model again in the next round) — and two sums of one model over
two *overlapping* sets of banks would give the aggregator their difference, e.g. one bank's histograms
minus another's. Two panels are either the same banks or disjoint, for the whole federation, so no
model is ever summed over two sets that differ by a few banks (see README, *Why masked acceptance judges
at every bank*). A masked panel is at least the masking quorum (``at_least``); a panel's banks that are
not in the round are left out (below the quorum, the masked question fails by name, as a round with too
few banks does).

Stages of several banks (bagging: every bank at once) and federations of fewer than 2k banks are scored
by every bank of the round, as before. The price of a panel: its pooled AUPRC rests on ~k holdouts, not
n, so δ "auto" (z standard errors on the pool's frauds) is wider, and a colluding panel has fewer honest
members to outvote. Pure: no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def panels(federation: Sequence[str], limit: int | None, seed: int, at_least: int = 1) -> list[list[str]] | None:
    """The federation's banks dealt into disjoint panels of ``max(limit, at_least)`` to twice that minus one
    banks (sorted), or None when there are fewer than two panels' worth of banks (or no limit)."""
    size = None if limit is None else max(limit, at_least)
    ring = sorted(set(federation))
    if size is None or len(ring) < 2 * size:
        return None
    random.Random(f"fedfraud-acceptance-panels/{seed}").shuffle(ring)
    count = len(ring) // size
    return [sorted(ring[i::count]) for i in range(count)]


def panel(federation: Sequence[str], round_banks: Sequence[str], stage: Sequence[str], limit: int | None,
          seed: int, at_least: int = 1) -> list[str]:
    """The banks of this round that score the stage's candidate, sorted (see the module)."""
    everyone = sorted(round_banks)
    dealt = panels(federation, limit, seed, at_least)
    if dealt is None or len(stage) != 1 or stage[0] not in federation:
        return everyone
    own = next(i for i, group in enumerate(dealt) if stage[0] in group)
    return [b for b in dealt[(own + 1) % len(dealt)] if b in everyone]
