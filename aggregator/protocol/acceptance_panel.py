"""Who scores a stage's candidate: every bank of the round, or a bounded panel in a large cyclic round.

A cyclic round has one stage per bank, and every stage's candidate was scored by every bank: n turns x
n banks questions, so each bank's scoring and the aggregator's reading of answers grew with the square of
the banks (50 banks: 2,550 questions a round). With ``acceptance_evaluators`` = k, a stage whose round has
more than k banks outside the stage is scored by k of them only, the *panel*: the k banks after the
stage's bank on a ring of the round's banks shuffled by the federation's seed and the round. Each bank
then sits on exactly k panels a round (n x k questions in all, k per bank), the judged bank is never on
its own panel, and the panel is fixed by the seed, not chosen by any bank or by the order of the turns.
Stages that leave k or fewer banks outside them (every bagging stage, cyclic rounds of up to k + 1 banks)
are scored by every bank of the round, as before.

The price: a panel's pooled AUPRC rests on k holdouts, not n - 1, so its δ ("auto": z standard errors of
the drop on the panel's pooled frauds) is wider, and a colluding panel has fewer honest members to
outvote. Masked, the panel is at least the masking quorum. Pure: no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def panel(banks: Sequence[str], stage: Sequence[str], limit: int | None, seed: int, round_id: int,
          at_least: int = 1) -> list[str]:
    """The banks that score a stage's candidate, sorted: every bank of the round unless more than
    ``max(limit, at_least)`` banks are outside the stage; then that many of them (see the module)."""
    everyone = sorted(banks)
    size = None if limit is None else max(limit, at_least)
    outside = [b for b in everyone if b not in stage]
    if size is None or len(outside) <= size:
        return everyone
    ring = list(everyone)
    random.Random(f"fedfraud-acceptance-panel/{seed}/{round_id}").shuffle(ring)
    if len(stage) == 1:  # a cyclic turn: the next ``size`` banks on the ring
        at = ring.index(stage[0])
        return sorted(ring[(at + 1 + i) % len(ring)] for i in range(size))
    chosen = [b for b in ring if b not in stage][:size]  # a stage of several banks (none today): the first outside
    return sorted(chosen)
