"""Cyclic rounds send each bank only the trees it has not got (``fedfraud.model_refs``).

Every turn of a cyclic round sends each bank the model so far (a task's base model, the acceptance
question's candidate), which repeats the trees of every turn before: per bank and round the bytes grew
with the square of the banks. Here a training task or score question of a cyclic round goes to a bank as
an envelope referring to the longest model that bank acknowledged (answered a message carrying it) whose
trees start the model sent, with only the trees after it. The aggregator keeps, per bank, the hashes
and tree counts of the last models it acknowledged (``<federation>/model-refs/<bank>.json``); it sends
an envelope only when what the bank rebuilds from it is the question byte for byte (checked in time linear
in the trees' count: ``model_refs.extends_exactly``), within the bank's bound, and only when
it is smaller. A bank that does not hold the base (a restart emptied its cache) refuses by name
(``model_base_unknown``): the same question is then sent once more, in full. Every other strategy, and
every other message, is sent as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fedfraud import model_json, model_refs
from fedfraud.model_refs import BASE_UNKNOWN, ModelReferenceRefused, canonical, content_hash
from fedfraud.crosscheck import ScoreQuestion
from fedfraud.protocol import StrategyName, TaskKind
from fedfraud.wire import TrainTask
from pipelines.io import write_bytes

if TYPE_CHECKING:
    from aggregator.protocol.state import RoundState
    from aggregator.protocol.workspace import Workspace

log = logging.getLogger("fedfraud.rounds")
ENABLED = True  # False: every message in full (the tests' baseline)
KINDS = (TaskKind.TRAIN, TaskKind.ACCEPT)
HELD_PER_BANK = 3  # fewer than a bank keeps (``bank_node.model_cache.KEPT_MODELS``)
MAX_ENVELOPE_BYTES = max(TrainTask.MAX_BYTES, ScoreQuestion.MAX_BYTES)  # what the bank rebuilds is bound so
_lock = threading.Lock()


@dataclass
class _Question:
    """One question's models: each slot's document, tree count, hash, and its prefixes' canonical bytes."""

    message: dict
    docs: list[dict]
    shas: list[str]
    prefixes: dict[tuple[int, int], tuple[bytes, str]] = field(default_factory=dict)
    envelopes: dict[tuple, bytes | None] = field(default_factory=dict)

    def prefix(self, slot: int, k: int) -> tuple[bytes, str]:
        """The canonical bytes of the slot's model cut to ``k`` trees, and their hash (once per question)."""
        if (slot, k) not in self.prefixes:
            raw = model_json.to_bytes(model_refs.prefix(self.docs[slot], k))
            self.prefixes[(slot, k)] = raw, content_hash(raw)
        return self.prefixes[(slot, k)]


_questions: OrderedDict[str, _Question] = OrderedDict()  # the last few questions asked, by content hash


def applies(r: "RoundState | None", kind: str) -> bool:
    return ENABLED and r is not None and r.plan.strategy == StrategyName.CYCLIC and kind in KINDS


def _question(question: bytes) -> _Question:
    key = hashlib.sha256(question).hexdigest()
    with _lock:
        if key in _questions:
            _questions.move_to_end(key)
            return _questions[key]
    message = json.loads(question)  # the aggregator's own bytes
    docs = [holder[name] for holder, name in model_refs.model_slots(message)]
    parsed = _Question(message, docs, [content_hash(model_json.to_bytes(d)) for d in docs])
    with _lock:
        _questions[key] = parsed
        while len(_questions) > 4:
            _questions.popitem(last=False)
    return parsed


def _ledger(ws: "Workspace", bank: str) -> Path:
    return ws.root / "model-refs" / f"{bank}.json"


def held(ws: "Workspace", bank: str) -> list[list]:
    """[[sha256, trees], …] of the models ``bank`` acknowledged lately in this federation, the latest last."""
    path = _ledger(ws, bank)
    return json.loads(path.read_bytes())["held"] if path.exists() else []


def _acknowledge(ws: "Workspace", bank: str, q: _Question) -> None:
    entries = [[sha, len(model_json.trees(doc))] for sha, doc in zip(q.shas, q.docs)]
    with _lock:
        kept = [e for e in held(ws, bank) if e not in entries] + entries
        write_bytes(json.dumps({"held": kept[-HELD_PER_BANK:]}).encode(), _ledger(ws, bank))


def envelope(r: "RoundState", bank: str, question: bytes) -> bytes | None:
    """``question`` as an envelope for ``bank`` (its models by reference to models it holds), or None to send
    it in full (no model it holds starts a model sent, or the envelope would not be smaller)."""
    q = _question(question)
    bases = held(r.ws, bank)
    choice = []
    for slot, doc in enumerate(q.docs):
        trees = len(model_json.trees(doc))
        found = next(((sha, k) for sha, k in sorted(bases, key=lambda e: -e[1])  # the longest first
                      if 0 < k <= trees and q.prefix(slot, k)[1] == sha), None)
        choice.append(found)
    key = tuple(choice)
    if key not in q.envelopes:
        q.envelopes[key] = _build(q, choice, question) if any(choice) else None
    return q.envelopes[key]


def _build(q: _Question, choice: list, question: bytes) -> bytes | None:
    """The envelope, if it is smaller than ``question`` and what the bank rebuilds from it is ``question``
    byte for byte (``model_refs.extends_exactly`` on each model sent by reference: the envelope's other
    bytes are the question's own, copied along the path to each model slot only)."""
    message, bases = dict(q.message), 0
    if isinstance(message.get("models"), dict):
        message["models"] = dict(message["models"])
    for slot, ((holder, name), found) in enumerate(zip(model_refs.model_slots(message), choice)):
        if found is None:
            continue
        sha, k = found
        try:
            why = None if model_refs.extends_exactly(q.docs[slot], k) else "it would not rebuild the model's bytes"
        except (KeyError, TypeError, AttributeError) as exc:
            why = f"the model cannot be extended ({exc!r:.80})"
        if why:
            log.warning("model %s of a question by reference to its first %s trees: %s; sent in full", name, k, why)
            return None
        holder[name] = model_refs.reference(q.docs[slot], k, sha, q.shas[slot])
        bases += len(q.prefix(slot, k)[0])
    body = canonical({"by_reference": 1, "message": message})
    if len(body) + bases > MAX_ENVELOPE_BYTES:  # the bank's bound on what it rebuilds (``model_refs.expand``)
        return None
    return body if len(body) < len(question) else None


def ask(r: "RoundState | None", kind: str, bank: str, question: bytes, call: Callable[[bytes], bytes]
        ) -> tuple[bytes, int]:
    """``call`` (the bank's node) answers ``question``, sent by reference where it applies; the answer and
    the bytes the bank received (an envelope, and the full question after a ``model_base_unknown``)."""
    if not applies(r, kind):
        return call(question), len(question)
    body = envelope(r, bank, question)
    if body is None:
        reply, received = call(question), len(question)
    else:
        try:
            reply, received = call(body), len(body)
        except Exception as exc:
            if base_unknown(exc) is None:
                raise
            log.warning("round %s: %s does not hold the base of its %s (%s); sending the full model",
                        r.round_id, bank, kind, base_unknown(exc))
            reply, received = call(question), len(body) + len(question)
    _acknowledge(r.ws, bank, _question(question))
    return reply, received


def base_unknown(exc: BaseException) -> str | None:
    """The refusal's text if ``exc`` is a bank's ``model_base_unknown`` (in process, or named in a service
    task's failure), else None: only that refusal is answered with the full model."""
    if isinstance(exc, ModelReferenceRefused):
        return str(exc) if exc.check == BASE_UNKNOWN else None
    marker = f"{ModelReferenceRefused.__name__}: {BASE_UNKNOWN}:"
    text = str(exc)
    return text[text.index(marker):][:300] if marker in text else None
