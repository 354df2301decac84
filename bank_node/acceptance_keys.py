"""Masked acceptance under one key agreement per round: each question's masks come from a label of its own.

A round's acceptance key session (``<federation>/round-<r>/accept/<nonce>``) is agreed once per round: the
bank offers one signed ephemeral X25519 key (``masked_evaluation.make_offer``), and the first acceptance
question it gets in the round carries every offering bank's offer. The bank verifies them (every rule of
``fedfraud.secagg.keys``) and keeps the peers' public keys in its own session folder; later questions of the
round name the session without offers. Offers sent again must be the kept ones (``offer_changed``); a question
without offers in a session whose offers the bank never got is refused (``session_offers_unknown``).

Each question names a label ``stage-<turn>/<first|pairs>/attempt-<n>/<nonce>`` and its banks (at least three,
this bank among them, each one whose offer the bank verified). The words of variant i are masked at slot i
with keys of the label (``keys.label_keys``: HKDF over the pair key, the session, the label, the sorted bank
list and the question's digest). The bank records per label the question and banks it answered: the same again
gets the same answer; another question or bank list under that label is refused (``mask_reuse``). No keystream
masks two vectors, whatever labels the aggregator picks (and two questions could not share one even if the
record were lost: the digest is in the key).

Dropouts. A bank missing from attempt k of a question ends that attempt; the banks that answered are asked
again under attempt k+1 (a new label, the bank list without the missing bank):

* attempt k+1's masks cancel: every remaining bank masks with every other remaining bank once, with the key
  both derive from the same (session, label, bank list, digest), added by the one whose name sorts first and
  subtracted by the other; the missing bank is in no one's list, so nothing of its keys is left over;
* attempt k's uploads add nothing: each upload is a vector plus keystreams of per-label keys, independent
  HKDF outputs for different labels, so a combination of uploads of both attempts removes every mask only if,
  label by label, it sums whole groups of banks masking with each other. In attempt k the missing bank's masks
  with every remaining bank never cancel (its words are absent and its keys are its own and theirs), so the
  aggregator gets nothing from attempt k, and from attempt k+1 the remaining banks' sum: what was asked.
* Not ruled out (nor was it with a session per attempt before): an aggregator that *holds* the "missing" bank's
  attempt-k words and only claims them missing gets the sum with that bank (attempt k) and without it
  (attempt k+1), so that bank's vector. The banks cannot tell a claimed dropout from a real one; ruling it
  out needs double masking (self masks revealed once per question, Bonawitz et al. 2017): not built.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from bank_node.masked_evaluation import credentials_of, session_banks
from fedfraud.crosscheck import ScoreQuestion
from fedfraud.secagg.keys import KeyAgreementRefused, SessionKeys, Trust, check_label, check_session, label_keys
from fedfraud.secagg.masking import MAX_PARTIES, MaskReuse, PairwiseMasker

if TYPE_CHECKING:
    from bank_node.node import BankNode

PHASE = "accept"  # what the round's key session serves (``SessionStore.bind_phase``)
FIELDS = {"session", "label", "banks"}  # and "offers" until the bank holds them
LABEL = re.compile(r"^stage-\d{1,4}/(first|pairs)/attempt-\d{1,2}/[0-9a-f]{16}$")


def label_masker(node: "BankNode", question: ScoreQuestion) -> tuple[str, str, list[str], PairwiseMasker]:
    """(session, label, its banks, the masker of the label) for an acceptance question; refused by name."""
    masking = question.masking
    if not isinstance(masking, dict) or set(masking) - {"offers"} != FIELDS:
        raise KeyAgreementRefused("masking_malformed", f"a masked acceptance question names exactly "
                                                       f"{sorted(FIELDS)} (and the offers until they are held)")
    credentials = credentials_of(node)
    session = check_session(masking["session"])
    if f"/round-{question.round_id}/accept/" not in session:
        raise KeyAgreementRefused("session_not_this_round", f"session {session!r} is not round "
                                                            f"{question.round_id}'s acceptance")
    label = check_label(masking["label"])
    if not LABEL.match(label):
        raise KeyAgreementRefused("label_malformed", f"label {label!r} is not stage-<turn>/<first|pairs>/"
                                                     "attempt-<n>/<16 hex>")
    banks = session_banks(node.bank, masking["banks"])
    keys = node.secagg_store.keys(session, credentials.identity, create=False)
    node.secagg_store.bind_phase(session, PHASE)
    peers = _peers(node, keys, session, masking.get("offers"), credentials.trust)
    unknown = [b for b in banks if b != node.bank and b not in peers]
    if unknown:
        raise KeyAgreementRefused("session_bank_unknown", f"{', '.join(unknown)} offered no key in session "
                                                          f"{session!r} that {node.bank} verified")
    pair = keys.keys_with({b: peers[b] for b in banks if b != node.bank})
    return session, label, banks, PairwiseMasker(node.bank, label_keys(pair, node.bank, session, label, banks,
                                                                       question.digest()))


def _peers(node: "BankNode", keys: SessionKeys, session: str, offers: Any, trust: Trust) -> dict[str, bytes]:
    """The session's verified peer keys: kept from the first offers the bank got, which later ones must repeat."""
    kept = node.secagg_store.peers(session)
    if offers is None:
        if kept is None:
            raise KeyAgreementRefused("session_offers_unknown", f"{node.bank} holds no verified offers of "
                                                                f"session {session!r}")
        return kept
    if not isinstance(offers, dict) or len(offers) > MAX_PARTIES:
        raise KeyAgreementRefused("offer_malformed", f"offers must be an object of at most {MAX_PARTIES}")
    if kept is not None:
        if _public_keys(offers, node.bank) != kept:
            raise KeyAgreementRefused("offer_changed", f"the offers of session {session!r} differ from those "
                                                       f"{node.bank} verified earlier in it")
        return kept
    peers = keys.verified_peers(offers, trust)
    node.secagg_store.keep_peers(session, peers)
    return peers


def _public_keys(offers: dict, own: str) -> dict[str, bytes] | None:
    """{bank: public key} of offers compared with kept ones (the bank's own left out); None if malformed."""
    out = {}
    for raw in offers.values():
        if not isinstance(raw, dict) or not isinstance(raw.get("bank"), str) or not isinstance(
                raw.get("public_key"), str) or len(raw["public_key"]) > 64:
            return None
        if raw["bank"] != own:
            out[raw["bank"]] = raw["public_key"]
    try:
        return {b: base64.b64decode(k, validate=True) for b, k in out.items()}
    except ValueError:
        return None


def _purpose(label: str) -> str:
    return "accept-" + hashlib.sha256(label.encode()).hexdigest()[:32]


def _record(digest: str, banks: list[str]) -> str:
    return json.dumps({"question": digest, "banks": banks}, sort_keys=True)


def earlier_label_answer(node: "BankNode", session: str, label: str, digest: str, banks: list[str]) -> bytes | None:
    """The answer already sent under ``label`` for this question and bank list, sent again; None if none; another
    question or bank list under the label is refused (``mask_reuse``)."""
    earlier = node.secagg_store.answered(session, _purpose(label))
    if earlier is None:
        return None
    if earlier["model_id"] != _record(digest, banks):
        raise MaskReuse(f"mask_reuse: {node.bank} already answered label {label} of session {session} for "
                        "another question or bank list")
    return earlier["body"].encode()


def keep_label_answer(node: "BankNode", session: str, label: str, digest: str, banks: list[str], body: bytes) -> None:
    node.secagg_store.keep(session, _purpose(label), _record(digest, banks), body)
