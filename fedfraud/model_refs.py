"""Models by reference: a message names a model the bank already holds and carries only the new trees.

A cyclic round sends every bank each turn's model, which repeats every tree of the turns before; by
reference, the aggregator sends an *envelope*::

    {"by_reference": 1, "message": <the message, each model slot replaced by a reference>}
    reference: {"base": <sha256 of a model the bank holds>, "base_trees": k,
                "append": [<the trees after the first k>], "model_sha256": <sha256 of the whole model>}

Model slots: a training task's ``base_model``, every model of a score question's ``models``. A hash is
the sha256 of the model's canonical JSON bytes (``model_json.to_bytes``). The bank rebuilds each model
(``extend``: its base with the appended trees, numbered on), checks the declared hash and hands the whole
message, byte for byte the one the aggregator would have sent, to its ordinary entry, which validates
every model as it validates a full one. Refused by name (``ModelReferenceRefused.check``):
``model_ref_malformed``, ``model_ref_too_large``, ``model_base_unknown`` (the aggregator then sends the
full model once), ``model_base_trees_mismatch`` and ``model_hash_mismatch``. Pure: no aggregator or bank
imports.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable

from fedfraud import model_json
from fedfraud.model_json import Doc
from fedfraud.wire import WireFormatError, loads_strict

ENVELOPE_PREFIX = b'{"by_reference":'  # canonical JSON: the envelope's first key
REFERENCE_KEYS = frozenset({"base", "base_trees", "append", "model_sha256"})
MALFORMED, TOO_LARGE = "model_ref_malformed", "model_ref_too_large"
BASE_UNKNOWN, BASE_TREES, HASH_MISMATCH = "model_base_unknown", "model_base_trees_mismatch", "model_hash_mismatch"
CHECKS = frozenset({MALFORMED, TOO_LARGE, BASE_UNKNOWN, BASE_TREES, HASH_MISMATCH})
SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelReferenceRefused(ValueError):
    """A model by reference the bank cannot or will not rebuild; ``check`` names why."""

    def __init__(self, check: str, detail: str):
        super().__init__(f"{check}: {detail}")
        self.check, self.detail = check, detail


def canonical(obj: Any) -> bytes:
    """The bytes a message or model is sent as (``WireMessage.to_bytes``, ``model_json.to_bytes``)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def content_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def is_envelope(data: bytes) -> bool:
    return bytes(data[:len(ENVELOPE_PREFIX)]) == ENVELOPE_PREFIX


def model_slots(message: dict) -> list[tuple[dict, str]]:
    """(holder, key) of every model a message carries: a task's ``base_model``, a question's ``models``."""
    slots = []
    if message.get("base_model") is not None:
        slots.append((message, "base_model"))
    models = message.get("models")
    if isinstance(models, dict):
        slots.extend((models, name) for name in sorted(models))
    return slots


def _model(doc: Doc) -> dict:
    return doc["learner"]["gradient_booster"]["model"]


def prefix(doc: Doc, k: int) -> Doc:
    """``doc`` cut to its first ``k`` trees (the model ``extend`` grows back into ``doc``)."""
    model = _model(doc)
    return model_json.with_trees(doc, list(model["trees"][:k]), list(model["tree_info"][:k]))


def extend(base: Doc, appended: list) -> Doc:
    """``base`` followed by ``appended`` trees, each numbered on (``id``), ``tree_info`` 0, one per iteration."""
    model = _model(base)
    start = len(model["trees"])
    trees = list(model["trees"]) + [{**tree, "id": start + i} for i, tree in enumerate(appended)]
    return model_json.with_trees(base, trees, list(model["tree_info"]) + [0] * len(appended))


def reference(doc: Doc, k: int, base_sha: str, model_sha256: str | None = None) -> dict:
    """``doc`` as a reference to its first ``k`` trees (a model hashed ``base_sha``); ``model_sha256``:
    ``doc``'s own hash when the caller has it."""
    return {"base": base_sha, "base_trees": k, "append": _model(doc)["trees"][k:],
            "model_sha256": model_sha256 or content_hash(model_json.to_bytes(doc))}


def extends_exactly(doc: Doc, k: int) -> bool:
    """True when ``extend`` of ``doc``'s first ``k`` trees with the rest gives ``doc`` back byte for byte.

    ``extend`` shares every tree body and rewrites only the tree ids, ``tree_info``, ``iteration_indptr``
    and ``num_trees``; so comparing ``doc``'s outline (its trees reduced to their ids) with the rebuilt
    one's is the byte-for-byte comparison, in time linear in the trees' count rather than their size."""
    rebuilt = extend(prefix(doc, k), _model(doc)["trees"][k:])
    return _outline(rebuilt) == _outline(doc)


def _outline(doc: Doc) -> bytes:
    """``doc``'s canonical bytes with each tree reduced to its id (or to [0] without one)."""
    booster = doc["learner"]["gradient_booster"]
    ids = [[1, tree["id"]] if "id" in tree else [0] for tree in booster["model"]["trees"]]
    return canonical({**doc, "learner": {**doc["learner"], "gradient_booster": {
        **booster, "model": {**booster["model"], "trees": ids}}}})


def _resolve(ref: Any, lookup: Callable[[str], bytes | None]) -> Doc:
    if not isinstance(ref, dict) or set(ref) != REFERENCE_KEYS:
        raise ModelReferenceRefused(MALFORMED, f"a reference holds exactly {sorted(REFERENCE_KEYS)}")
    base, k, appended, declared = ref["base"], ref["base_trees"], ref["append"], ref["model_sha256"]
    if not (isinstance(base, str) and SHA256.fullmatch(base) and isinstance(declared, str)
            and SHA256.fullmatch(declared)):
        raise ModelReferenceRefused(MALFORMED, "base and model_sha256 must be lowercase sha256 hex digests")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ModelReferenceRefused(MALFORMED, f"base_trees must be a non-negative integer, got {str(k)[:24]!r}")
    if not isinstance(appended, list) or not all(isinstance(tree, dict) for tree in appended):
        raise ModelReferenceRefused(MALFORMED, "append must be a list of tree objects")
    raw = lookup(base)
    if raw is None:
        raise ModelReferenceRefused(BASE_UNKNOWN, f"no model {base[:16]}… is held here")
    base_doc = json.loads(raw)  # bytes this side validated and kept itself
    held = len(_model(base_doc)["trees"])
    if held != k:
        raise ModelReferenceRefused(BASE_TREES, f"model {base[:16]}… has {held} trees, the reference says {k}")
    try:
        doc = extend(base_doc, appended)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ModelReferenceRefused(MALFORMED, f"the held model cannot be extended ({exc!r:.80})") from None
    actual = content_hash(model_json.to_bytes(doc))
    if actual != declared:
        raise ModelReferenceRefused(HASH_MISMATCH, f"the rebuilt model hashes {actual[:16]}…, declared "
                                                   f"{declared[:16]}…")
    return doc


def expand(data: bytes, lookup: Callable[[str], bytes | None], max_bytes: int) -> bytes:
    """The message an envelope stands for, as the bytes the full message is sent as (anything else: as is).

    ``lookup(sha256)``: the canonical bytes of a held model, or None. Nothing here validates a model: the
    result goes through the receiver's ordinary entry. Bounded: the envelope, and the rebuilt message's
    estimate (envelope plus bases), by ``max_bytes``."""
    if not is_envelope(data):
        return data
    if len(data) > max_bytes:
        raise ModelReferenceRefused(TOO_LARGE, f"envelope of {len(data)} bytes exceeds {max_bytes}")
    try:
        envelope = loads_strict(data, "model envelope")
    except WireFormatError as exc:
        raise ModelReferenceRefused(MALFORMED, str(exc)[:200]) from None
    if not isinstance(envelope, dict) or set(envelope) != {"by_reference", "message"} \
            or envelope["by_reference"] != 1 or not isinstance(envelope["message"], dict):
        raise ModelReferenceRefused(MALFORMED, 'an envelope is {"by_reference": 1, "message": {...}}')
    message, budget = envelope["message"], len(data)

    def bounded(sha: str) -> bytes | None:
        nonlocal budget
        raw = lookup(sha)
        budget += len(raw) if raw is not None else 0
        if budget > max_bytes:
            raise ModelReferenceRefused(TOO_LARGE, f"the rebuilt message would exceed {max_bytes} bytes")
        return raw

    slots = [(holder, key) for holder, key in model_slots(message)
             if isinstance(holder[key], dict) and "model_sha256" in holder[key]]
    if not slots:
        raise ModelReferenceRefused(MALFORMED, "an envelope holds at least one model by reference")
    for holder, key in slots:
        holder[key] = _resolve(holder[key], bounded)
    return canonical(message)
