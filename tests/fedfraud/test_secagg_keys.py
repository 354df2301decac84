"""Authenticated pairwise keys: banks agree pairwise, every forged or foreign offer is refused by name,
and the aggregator, holding every offer, derives nothing."""

from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedfraud.pki import issue, provision
from fedfraud.secagg.keys import Identity, KeyAgreementRefused, SessionKeys, Trust, derive_pair_key, label_keys
from fedfraud.secagg.masking import PairwiseMasker, decode_counts, encode_counts, unmasked_sum

BANKS = ["bankA", "bankB", "bankC", "bankD"]
SESSION = "fed-1/round-2/evaluate/attempt-1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("secagg") / "consortium"
    provision("nordic", ["aggregator", *BANKS], out, days=30)
    foreign = tmp_path_factory.mktemp("foreign") / "consortium"
    provision("pirates", ["aggregator", "bankA"], foreign, days=30)
    issue(out / "ca", "bankE", "operator", out)  # a valid certificate of this CA with the wrong role
    return out, foreign


def identities(pki):
    out, _ = pki
    return {b: Identity.from_folder(out / b) for b in BANKS}


def trust(pki, banks=None) -> Trust:
    return Trust.from_file(pki[0] / "ca" / "ca.crt", banks)


def session_of(pki, banks, session=SESSION):
    ids = identities(pki)
    keys = {b: SessionKeys.generate(b, session, ids[b]) for b in banks}
    offers = {b: json.loads(json.dumps(k.offer())) for b, k in keys.items()}  # relayed as JSON
    return keys, offers


@pytest.mark.parametrize("count", [3, 4])
def test_banks_agree_pairwise_and_masks_cancel(pki, count):
    banks = BANKS[:count]
    keys, offers = session_of(pki, banks)
    pairs = {b: keys[b].pair_keys(offers, trust(pki), banks) for b in banks}
    for a, b in itertools.combinations(banks, 2):
        assert pairs[a][b] == pairs[b][a] and len(pairs[a][b]) == 32
    assert len({k for p in pairs.values() for k in p.values()}) == count * (count - 1) // 2  # every pair differs
    counts = {b: np.arange(50) * (i + 1) for i, b in enumerate(banks)}
    uploads = [PairwiseMasker(b, pairs[b]).mask(encode_counts(counts[b]), label=0) for b in banks]
    assert np.array_equal(decode_counts(unmasked_sum(uploads)), sum(counts.values()))


def test_a_new_session_and_a_new_generate_give_new_keys(pki):
    banks = BANKS[:3]
    keys, offers = session_of(pki, banks)
    again, offers_again = session_of(pki, banks)  # same session string, fresh ephemeral keys
    other, other_offers = session_of(pki, banks, SESSION.replace("attempt-1", "attempt-2"))
    first = keys["bankA"].pair_keys(offers, trust(pki), banks)["bankB"]
    assert first != again["bankA"].pair_keys(offers_again, trust(pki), banks)["bankB"]
    assert first != other["bankA"].pair_keys(other_offers, trust(pki), banks)["bankB"]


def _refused(pki, offers, check, banks=BANKS[:3], me="bankA", keys=None, session=SESSION):
    keys = keys or session_of(pki, [me], session)[0]
    with pytest.raises(KeyAgreementRefused) as caught:
        keys[me].pair_keys(offers, trust(pki), banks)
    assert caught.value.check == check, caught.value
    return caught.value


def test_forged_signature_is_refused(pki):
    keys, offers = session_of(pki, BANKS[:3])
    forged = copy.deepcopy(offers)
    forged["bankB"]["public_key"] = offers["bankC"]["public_key"]  # the aggregator swaps in a key it chose
    error = _refused(pki, forged, "offer_bad_signature", keys=keys)
    assert "bankB" in str(error)
    resigned = copy.deepcopy(offers)
    resigned["bankB"]["signature"] = offers["bankC"]["signature"]
    _refused(pki, resigned, "offer_bad_signature", keys=keys)


def test_foreign_ca_certificate_is_refused(pki):
    _, foreign = pki
    stranger = SessionKeys.generate("bankA", SESSION, Identity.from_folder(foreign / "bankA"))
    keys, offers = session_of(pki, ["bankA", "bankB", "bankC"])
    offers["bankA"] = stranger.offer()  # a bank of another consortium claims bankA's place for bankB
    error = _refused(pki, offers, "offer_untrusted_certificate", me="bankB", keys=keys)
    assert "bankA" in str(error)


def test_wrong_role_and_wrong_name_are_refused(pki):
    out, _ = pki
    keys, offers = session_of(pki, BANKS[:3])
    with pytest.raises(KeyAgreementRefused, match="identity_role"):
        Identity.from_folder(out / "bankE")  # an operator cannot even sign as a bank
    offers["bankC"] = {**offers["bankC"], "certificate": offers["bankB"]["certificate"]}
    _refused(pki, offers, "offer_wrong_identity", keys=keys)
    aggregator = (out / "aggregator" / "cert.pem").read_text()
    offers["bankC"] = {**offers["bankC"], "certificate": aggregator}
    _refused(pki, offers, "offer_wrong_role", keys=keys)


def test_wrong_session_and_replayed_offer_are_refused(pki):
    old, old_offers = session_of(pki, BANKS[:3], "fed-1/round-1/evaluate/attempt-1")
    keys, offers = session_of(pki, BANKS[:3])
    replayed = {**offers, "bankB": old_offers["bankB"]}  # last round's offer, relayed again
    error = _refused(pki, replayed, "offer_wrong_session", keys=keys)
    assert "round-1" in str(error)
    relabelled = {**offers, "bankB": {**old_offers["bankB"], "session": SESSION}}  # its session field edited
    _refused(pki, relabelled, "offer_bad_signature", keys=keys)


def test_a_bank_not_in_the_session_or_consortium_is_refused(pki):
    keys, offers = session_of(pki, BANKS)
    _refused(pki, offers, "offer_unknown_bank", banks=BANKS[:3], keys=keys)
    with pytest.raises(KeyAgreementRefused, match="offer_unknown_bank"):
        keys["bankA"].pair_keys(offers, trust(pki, banks=BANKS[:3]))
    _refused(pki, {b: offers[b] for b in BANKS[:2]}, "offer_missing", banks=BANKS[:3], keys=keys)
    _refused(pki, {b: offers[b] for b in BANKS[:2]}, "too_few_parties", banks=None, keys=keys)


def test_malformed_and_oversized_offers_are_refused(pki):
    keys, offers = session_of(pki, BANKS[:3])
    for bad in ({**offers["bankB"], "extra": 1}, {**offers["bankB"], "certificate": "x" * 9000},
                {**offers["bankB"], "public_key": base64.b64encode(b"k" * 16).decode()},
                {**offers["bankB"], "signature": "not base64!"}, ["bankB"]):
        _refused(pki, {**offers, "bankB": bad}, "offer_malformed", keys=keys)
    _refused(pki, {**offers, "bankA": offers["bankB"] | {"bank": "bankA"}}, "offer_wrong_identity", keys=keys)
    other_mine = SessionKeys.generate("bankA", SESSION, identities(pki)["bankA"]).offer()
    _refused(pki, {**offers, "bankA": other_mine}, "offer_not_mine", keys=keys)
    with pytest.raises(KeyAgreementRefused, match="session_malformed"):
        SessionKeys.generate("bankA", "a session\nwith spaces", identities(pki)["bankA"])


def test_the_aggregator_with_every_offer_cannot_derive_a_key(pki):
    keys, offers = session_of(pki, BANKS[:3])
    real = keys["bankA"].pair_keys(offers, trust(pki), BANKS[:3])["bankB"]
    pub = {b: base64.b64decode(o["public_key"]) for b, o in offers.items()}
    # everything public: the two public keys, their concatenation, the session and names, fed to the same KDF
    guesses = [derive_pair_key(material, SESSION, ("bankA", pub["bankA"]), ("bankB", pub["bankB"]))
               for material in (pub["bankA"], pub["bankB"], pub["bankA"] + pub["bankB"], hashlib.sha256(
                   pub["bankA"] + pub["bankB"]).digest(), bytes(32))]
    guesses += [HKDF(hashes.SHA256(), 32, None, SESSION.encode()).derive(pub["bankA"] + pub["bankB"]),
                hashlib.sha256(pub["bankA"] + pub["bankB"] + SESSION.encode()).digest()]
    assert real not in guesses
    # only the X25519 private key of one of the two gives it: the aggregator has none
    secret = keys["bankB"]._private.exchange(
        SessionKeys.from_secret_bytes("bankA", SESSION, identities(pki)["bankA"],
                                      keys["bankA"].secret_bytes())._private.public_key())
    assert derive_pair_key(secret, SESSION, ("bankA", pub["bankA"]), ("bankB", pub["bankB"])) == real
    assert set(offers["bankA"]) == {"bank", "session", "public_key", "certificate", "signature"}
    assert "PRIVATE" not in json.dumps(offers)


# ---- one session, many labels (a cyclic round's acceptance: one key agreement per round) ----------------------

LABEL = "stage-0/first/attempt-1/0123456789abcdef"


def _label_uploads(pairs, banks, counts, label, bound="q1"):
    return {b: PairwiseMasker(b, label_keys(pairs[b], b, SESSION, label, banks, bound)).mask(
        encode_counts(counts[b]), label=0) for b in banks}


def test_label_keys_cancel_and_differ_per_label_bank_list_and_question(pki):
    keys, offers = session_of(pki, BANKS)
    pairs = {b: keys[b].pair_keys(offers, trust(pki), BANKS) for b in BANKS}
    counts = {b: np.arange(40) * (i + 2) for i, b in enumerate(BANKS)}
    first = _label_uploads(pairs, BANKS, counts, LABEL)
    assert np.array_equal(decode_counts(unmasked_sum(list(first.values()))), sum(counts.values()))
    turn = _label_uploads(pairs, BANKS, counts, LABEL.replace("stage-0", "stage-1"))  # the next turn, same vector
    assert np.array_equal(decode_counts(unmasked_sum(list(turn.values()))), sum(counts.values()))
    for b in BANKS:  # the same vector under another label: other masks (never one keystream twice)
        assert not np.array_equal(first[b], turn[b])
        assert len(set((first[b] - turn[b]).tolist())) > 35  # the difference of two uploads is noise, not 0
    three = BANKS[:3]  # a re-run without bankD: a new label, its bank list; the remaining masks cancel
    rerun = _label_uploads(pairs, three, counts, LABEL.replace("attempt-1", "attempt-2"))
    assert np.array_equal(decode_counts(unmasked_sum(list(rerun.values()))), sum(counts[b] for b in three))
    aborted = unmasked_sum([first[b] for b in three])  # attempt 1 without bankD's words: masks left, no counts
    assert len(set(aborted.tolist())) > 35
    ab = label_keys(pairs["bankA"], "bankA", SESSION, LABEL, BANKS, "q1")["bankB"]
    assert ab == label_keys(pairs["bankB"], "bankB", SESSION, LABEL, BANKS, "q1")["bankA"]  # both derive it
    variants = [label_keys(pairs["bankA"], "bankA", SESSION, LABEL, BANKS[:3], "q1")["bankB"],
                label_keys(pairs["bankA"], "bankA", SESSION, LABEL, BANKS, "q2")["bankB"],
                label_keys(pairs["bankA"], "bankA", SESSION, LABEL + "0", BANKS, "q1")["bankB"],
                pairs["bankA"]["bankB"]]
    assert len({ab, *variants}) == 5  # bank list, question, label: each its own key, none the pair's


def test_label_keys_refuse_by_name(pki):
    keys, offers = session_of(pki, BANKS[:3])
    pairs = keys["bankA"].pair_keys(offers, trust(pki), BANKS[:3])
    for label in ("", "a label with spaces", "x" * 121, 7):
        with pytest.raises(KeyAgreementRefused, match="label_malformed"):
            label_keys(pairs, "bankA", SESSION, label, BANKS[:3], "q")
    with pytest.raises(KeyAgreementRefused, match="session_bank_unknown"):
        label_keys(pairs, "bankA", SESSION, LABEL, BANKS, "q")  # bankD: no agreed key
    with pytest.raises(KeyAgreementRefused, match="session_without_me"):
        label_keys(pairs, "bankA", SESSION, LABEL, BANKS[1:], "q")
