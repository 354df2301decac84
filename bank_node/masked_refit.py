"""A bank's side of compaction's leaf refit: its per-leaf loss sums leave only as pairwise-masked words.

The aggregator relays the session's key offers with the model to refit in a ``RefitTask``; the bank
validates the model (its received-model limits, its feature contract), computes on its **training rows**
the gradient and hessian sums of the model's own loss per leaf (``leaf_sums``) and the
loss summed over those rows, and answers them as masked fixed-point words at slot ``REFIT_SLOT + step``:
no per-bank sum leaves in the clear, only the sum over the session's banks decodes. The holdout is never
used (it judges the result).

Refused by name: a bank that declines to train (``BankDeclined``), one that trains under differential
privacy (``refit_private``: its leaf sums would not be noised), a step out of range (``refit_step_invalid``),
a model the bank's guard refuses (``ModelRefused``), and every rule of ``masked_evaluation.session_masker``.
Asked the same step again with the same model, the bank sends the same answer; another model under the
same step's masks is refused (``mask_reuse``).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from bank_node.masked_evaluation import credentials_of, session_masker
from bank_node.training import dmatrix
from fedfraud import leaf_refit, model_json
from fedfraud.model_json import Doc
from fedfraud.model_guard import parse_received_model
from fedfraud.secagg.keys import KeyAgreementRefused
from fedfraud.secagg.masking import MaskReuse, encode, words_to_text
from fedfraud.wire import MaskedRefitSums, RefitTask

if TYPE_CHECKING:
    from bank_node.node import BankNode

MAX_STEPS = 256
PHASE = "refit"


def leaf_sums(doc: Doc, X: np.ndarray, y: np.ndarray, feature_names: list[str]
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-leaf (gradient, hessian) sums of the model's loss on rows ``X``, ``y`` (flat leaf order), and the
    loss summed."""
    booster = model_json.to_booster(doc)
    matrix = dmatrix(X, None, feature_names)
    margin = booster.predict(matrix, output_margin=True).astype(np.float64)
    flat = leaf_refit.flat_leaves(doc, booster.predict(matrix, pred_leaf=True).reshape(len(X), -1))
    labels, weight = np.asarray(y, dtype=np.float64), leaf_refit.pos_weight(doc)
    grad, hess = leaf_refit.gradients(margin, labels, weight)
    return (*leaf_refit.sums(flat, grad, hess, leaf_refit.leaf_count(doc)), leaf_refit.loss_sum(margin, labels, weight))


def masked_refit_sums(node: "BankNode", task_bytes: bytes) -> bytes:
    """This bank's per-leaf (gradient, hessian) sums of the task's model on its training rows, masked."""
    credentials_of(node)  # a bank without a consortium certificate says so before anything else
    task = RefitTask.from_bytes(task_bytes)
    if isinstance(task.step, bool) or not isinstance(task.step, int) or not 0 <= task.step < MAX_STEPS:
        raise KeyAgreementRefused("refit_step_invalid", f"step must be an integer in 0..{MAX_STEPS - 1}")
    node._require_training_allowed()  # the sums are computed on the training rows: the bank's training policy
    if node.privacy.enabled:
        raise KeyAgreementRefused("refit_private", f"{node.bank} trains under differential privacy; its leaf sums "
                                                   "would leave without noise")
    session, masker = session_masker(node, task.session, task.banks, task.offers)
    data = node.data
    doc = parse_received_model(model_json.to_bytes(task.model), node.policy.received_limits(), data.feature_names)
    digest = hashlib.sha256(f"{model_json.model_id(doc)}/{task.step}".encode()).hexdigest()
    store, purpose = node.secagg_store, f"{PHASE}-{task.step}"
    store.bind_phase(session, PHASE)
    if (earlier := store.answered(session, purpose)) is not None:
        if earlier["model_id"] != digest:
            raise MaskReuse(f"mask_reuse: {node.bank} already masked other refit sums at step {task.step} "
                            f"in session {session}")
        return earlier["body"].encode()
    G, H, loss = leaf_sums(doc, data.X_train, data.y_train, data.feature_names)
    words = masker.mask(encode(np.concatenate([G, H, [loss]]), leaf_refit.FRAC_BITS),
                        leaf_refit.REFIT_SLOT + task.step)
    body = MaskedRefitSums(node.bank, session, words_to_text(words)).to_bytes()
    store.keep(session, purpose, digest, body)
    return body
