"""A bank's grid counts for the histogram strategy's shared bins, masked: the aggregator learns the pooled counts only.

``masked_grid_counts`` answers a ``GridCountTask`` (after the bank's key offer for its session, made by
``masked_evaluation.make_offer``): it verifies every peer's relayed offer, counts its training rows over the
task's public dense layout (``fedfraud.grid_counts.GridLayout``) and sends them only as pairwise-masked words.
Every row is counted (no bank-side ``min_count``: the aggregator applies it to the pooled counts).

Refused by name: no consortium certificate (``secagg_no_identity``), fewer than three banks
(``too_few_parties``), a layout too large for the bank's features (``grid_too_large``), a session it never
offered in (``session_unknown``), another layout in the same session (``mask_reuse``), and every offer rule
of ``fedfraud.secagg.keys``. The same task again gets the same answer.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from bank_node.masked_evaluation import credentials_of, earlier_answer, session_masker
from bank_node.policy import ALLOW_UNMASKED_ENV, TaskRefused
from fedfraud.grid_counts import GridCountTask, GridLayout, MaskedGridCounts
from fedfraud.secagg.masking import encode_counts, words_to_text

if TYPE_CHECKING:
    from bank_node.node import BankNode

PURPOSE = "grid"
SLOT = 2  # the mask label of grid counts (evaluation uses 0 and 1; every session has its own keys anyway)


def is_masked_task(data: bytes) -> bool:
    """A masked grid-count task (a JSON object naming a session), not a plain ``binning.Grid``."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return False
    return isinstance(parsed, dict) and "session" in parsed


def masked_grid_counts(node: "BankNode", task_bytes: bytes) -> bytes:
    """The bank's dense grid counts, masked for the task's session."""
    credentials_of(node)  # a bank without a consortium certificate says so before anything else
    task = GridCountTask.from_bytes(task_bytes)
    try:
        layout = GridLayout.from_dict(task.layout)
        X = node.data.X_train
        layout.check_size(X.shape[1])
    except ValueError as exc:
        check = str(exc).split(":")[0] if str(exc).startswith("grid_too_large") else "grid_layout_invalid"
        raise TaskRefused(check, str(exc)) from None
    session, masker = session_masker(node, task.session, task.banks, task.offers)
    if (earlier := earlier_answer(node, session, PURPOSE, layout.digest)) is not None:
        return earlier  # the same answer again is harmless
    masked = masker.mask(encode_counts(layout.dense_counts(X).reshape(-1)), SLOT)
    body = MaskedGridCounts(node.bank, session, words_to_text(masked)).to_bytes()
    node.secagg_store.keep(session, PURPOSE, layout.digest, body)
    return body


def clear_grid_counts(node: "BankNode", grid_bytes: bytes) -> bytes:
    """Sparse grid counts in the clear: only for a bank that allows unmasked sessions (benches)."""
    from fedfraud.binning import BinCounts, Grid, count_cells

    if os.environ.get(ALLOW_UNMASKED_ENV) != "1":
        raise TaskRefused("secagg_required", f"{node.bank} sends grid counts only masked "
                                             f"({ALLOW_UNMASKED_ENV}=1 allows them in the clear)")
    grid = Grid.from_bytes(grid_bytes)
    return BinCounts(node.bank, grid.mantissa_bits, count_cells(node.data.X_train, grid)).to_bytes()
