"""A bank's side of the masked planning counts: its label counts leave only as pairwise-masked words.

The summary carries row counts only (``fedfraud.wire.CLEAR_COUNTS``). After planning, the aggregator
asks the planned banks for key offers (``masked_evaluation.make_offer``, unchanged) and relays them in
a ``MaskedCountsTask``; ``masked_counts`` verifies every peer's offer, derives the pairwise keys and
answers ``MASKED_COUNTS`` (positives, holdout positives) as masked words at its own slot
``COUNTS_SLOT`` — a label no evaluation or acceptance slot uses, so a session name reused by the
aggregator never repeats a keystream over another vector. Fewer than three banks, an unknown session,
a bad offer: refused by name (``masked_evaluation.session_masker``). Asked again in the same session,
the bank sends the same answer; other counts under the same masks are refused (``mask_reuse``).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np

from bank_node.masked_evaluation import credentials_of, earlier_answer, session_masker
from fedfraud.secagg.masking import encode_counts, words_to_text
from fedfraud.wire import MASKED_COUNTS, MaskedCounts, MaskedCountsTask

if TYPE_CHECKING:
    from bank_node.node import BankNode

COUNTS_SLOT = 2**32  # above any evaluation (0, 1) or acceptance (a variant's index, < 64) slot
PURPOSE = "planning-counts"


def masked_counts(node: "BankNode", task_bytes: bytes, counts: dict[str, int] | None = None) -> bytes:
    """This bank's label counts (``counts``, default its data's) as masked words for the task's session (the
    same answer if asked again)."""
    credentials_of(node)  # a bank without a consortium certificate says so before anything else
    task = MaskedCountsTask.from_bytes(task_bytes)
    session, masker = session_masker(node, task.session, task.banks, task.offers)
    counts = node.data.counts() if counts is None else counts
    values = [int(counts[key]) for key in MASKED_COUNTS]
    digest = hashlib.sha256(json.dumps(values).encode()).hexdigest()  # kept in the bank's own folder only
    if (earlier := earlier_answer(node, session, PURPOSE, digest)) is not None:
        return earlier
    words = masker.mask(encode_counts(np.asarray(values, dtype=np.int64)), COUNTS_SLOT)
    body = MaskedCounts(node.bank, session, words_to_text(words)).to_bytes()
    node.secagg_store.keep(session, PURPOSE, digest, body)
    return body
