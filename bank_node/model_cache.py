"""The models a bank validated lately, kept so that the aggregator may send only new trees (``fedfraud.model_refs``).

A bank keeps the canonical JSON bytes of the last models that passed its entry check (a training task's
base model, a score question's models), keyed by their sha256, in memory: bounded in entries and bytes,
least recently used first out, lost when the node restarts (the aggregator then sends the full model once,
after a ``model_base_unknown`` refusal). ``expand`` turns an envelope back into the full message; the
node's ordinary entry then validates every model in it exactly as a full one. A refusal is logged here.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from fedfraud import model_refs
from fedfraud.model_refs import ModelReferenceRefused, content_hash

if TYPE_CHECKING:
    from bank_node.node import BankNode

log = logging.getLogger("fedfraud.bank")
KEPT_MODELS = 4  # a cyclic turn refers to the model of the turn before
KEPT_BYTES = 64 * 1024 * 1024


class ModelCache:
    """sha256 -> canonical bytes of a model this bank validated; at most ``entries`` models and ``max_bytes``."""

    def __init__(self, entries: int = KEPT_MODELS, max_bytes: int = KEPT_BYTES):
        self.entries, self.max_bytes = entries, max_bytes
        self._kept: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha: str) -> bytes | None:
        with self._lock:
            raw = self._kept.get(sha)
            if raw is not None:
                self._kept.move_to_end(sha)
            return raw

    def keep(self, raw: bytes) -> str:
        """Keep a validated model's canonical bytes (a model over the byte bound is not kept); its hash."""
        sha = content_hash(raw)
        with self._lock:
            self._kept.pop(sha, None)
            if len(raw) <= self.max_bytes:
                self._kept[sha] = bytes(raw)
            while len(self._kept) > self.entries or self.size() > self.max_bytes:
                self._kept.popitem(last=False)
        return sha

    def size(self) -> int:
        return sum(len(raw) for raw in self._kept.values())

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, sha: str) -> bool:
        return sha in self._kept


def model_cache(node: "BankNode") -> ModelCache:
    """The node's cache (created on first use; a new node, e.g. after a restart, starts empty)."""
    cache = node.__dict__.get("_model_cache")
    if cache is None:
        cache = node.__dict__.setdefault("_model_cache", ModelCache())
    return cache


def expand(node: "BankNode", data: bytes, max_bytes: int, what: str) -> bytes:
    """``data`` itself, or the full message its envelope stands for; a refusal is logged and raised by name."""
    if not model_refs.is_envelope(data):
        return data
    try:
        return model_refs.expand(data, model_cache(node).get, max_bytes)
    except ModelReferenceRefused as refused:
        log.warning("%s: %s by reference refused by %s: %s", node.bank, what, refused.check, refused.detail)
        raise
