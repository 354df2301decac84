"""Authenticated pairwise keys per session: signed ephemeral X25519 offers, relayed by the aggregator.

For every session (a string naming federation, round, phase and attempt, never reused) each bank
makes a fresh X25519 key and an *offer*: ``{"bank", "session", "public_key", "certificate",
"signature"}``, signed (ECDSA P-256, SHA-256) with the private key of the bank's consortium
certificate over the session, the bank's name and the public key. The aggregator only relays
offers. A bank verifies every peer's offer — bounded sizes, the session, a certificate issued by
the consortium CA and valid now, role ``bank``, a name equal to the offering bank and in the
session's bank list, the signature — and derives one 32-byte key per peer with HKDF-SHA256 over
the X25519 secret, salted with both public keys, with the session and the sorted pair in ``info``.
The aggregator holds every offer but no X25519 private key, so it cannot derive any key.

One session may serve several masked vectors (a cyclic round's acceptance: one key agreement per round):
``label_keys`` derives, per pair, a key for one *label* (a slot of the session the bank records, e.g. a
turn's question and attempt) with HKDF-SHA256 over the pair key, the session, the label, the label's sorted
bank list and what the vector answers (a question's digest): two labels, two bank lists or two questions
never share a keystream, whatever names the aggregator picks.

Every refusal is a ``KeyAgreementRefused`` whose ``check`` names the rule.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedfraud.pki import identity as cert_identity
from fedfraud.secagg.masking import KEY_BYTES, MAX_PARTIES, MIN_PARTIES, SecureAggregationError

BANK_ROLE = "bank"
OFFER_FIELDS = ("bank", "session", "public_key", "certificate", "signature")
SESSION_PATTERN = re.compile(r"^[A-Za-z0-9_.:/=-]{1,200}$")
BANK_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # fedfraud.pki's participant names
MAX_CERTIFICATE_CHARS = 8192
MAX_SIGNATURE_CHARS = 200  # base64 of a DER ECDSA P-256 signature (<= 72 bytes)
PUBLIC_KEY_CHARS = 44  # base64 of 32 bytes
DOMAIN = b"fedfraud-secagg-offer-v1"
KDF_DOMAIN = b"fedfraud-secagg-pair-v1"
LABEL_DOMAIN = b"fedfraud-secagg-label-v1"
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9_.:/=-]{1,120}$")


class KeyAgreementRefused(SecureAggregationError):
    """An offer or a session is refused; ``check`` names the rule, the message says which bank."""

    def __init__(self, check: str, detail: str):
        super().__init__(f"{check}: {detail}")
        self.check, self.detail = check, detail


@dataclass(frozen=True)
class Identity:
    """A bank's consortium certificate and its private key (the mTLS pair from ``fedfraud provision``)."""

    bank: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def from_files(cls, cert_path: str | Path, key_path: str | Path) -> "Identity":
        certificate = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyAgreementRefused("identity_key", f"{key_path} is not an EC private key")
        if key.public_key().public_numbers() != certificate.public_key().public_numbers():
            raise KeyAgreementRefused("identity_key", f"{key_path} does not match {cert_path}")
        name, role = cert_identity(certificate)
        if role != BANK_ROLE:
            raise KeyAgreementRefused("identity_role", f"{cert_path} is a {role!r} certificate, not a bank's")
        return cls(name, certificate, key)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Identity":
        """``cert.pem`` and ``key.pem`` of a participant's folder as ``fedfraud provision`` writes it."""
        return cls.from_files(Path(folder) / "cert.pem", Path(folder) / "key.pem")


@dataclass(frozen=True)
class Trust:
    """Whom a bank believes: the consortium CA, and optionally the consortium's bank names."""

    ca: x509.Certificate
    banks: frozenset[str] | None = None  # None: any bank certificate of this CA

    @classmethod
    def from_file(cls, ca_path: str | Path, banks: Iterable[str] | None = None) -> "Trust":
        ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
        return cls(ca, None if banks is None else frozenset(banks))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str, bank: str, max_chars: int) -> bytes:
    if not isinstance(text, str) or len(text) > max_chars:
        raise KeyAgreementRefused("offer_malformed", f"{bank}'s {what} must be base64 of at most {max_chars} chars")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise KeyAgreementRefused("offer_malformed", f"{bank}'s {what} is not base64") from None


def _signed_message(session: str, bank: str, public_key: bytes) -> bytes:
    parts = [DOMAIN, session.encode(), bank.encode(), public_key]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def check_session(session: Any) -> str:
    if not isinstance(session, str) or not SESSION_PATTERN.match(session):
        raise KeyAgreementRefused("session_malformed", f"session {str(session)[:60]!r} is not 1-200 of "
                                                       "A-Z a-z 0-9 _ . : / = -")
    return session


class SessionKeys:
    """One bank's ephemeral key for one session: its signed offer, then its key with every peer."""

    def __init__(self, bank: str, session: str, identity: Identity, private_key: X25519PrivateKey):
        if identity.bank != bank:
            raise KeyAgreementRefused("identity_name", f"the certificate names {identity.bank}, not {bank}")
        self.bank, self.session, self.identity = bank, check_session(session), identity
        self._private = private_key
        self.public_key = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                 serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls, bank: str, session: str, identity: Identity) -> "SessionKeys":
        """A fresh X25519 key for ``session`` (a new one every call: keys are never reused)."""
        return cls(bank, session, identity, X25519PrivateKey.generate())

    def secret_bytes(self) -> bytes:
        """The raw private key, for the bank to keep in its own work folder until it has masked."""
        return self._private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption())

    @classmethod
    def from_secret_bytes(cls, bank: str, session: str, identity: Identity, secret: bytes) -> "SessionKeys":
        return cls(bank, session, identity, X25519PrivateKey.from_private_bytes(secret))

    def offer(self) -> dict[str, str]:
        """The JSON-safe offer the aggregator relays to the session's other banks."""
        signature = self.identity.key.sign(_signed_message(self.session, self.bank, self.public_key),
                                           ec.ECDSA(hashes.SHA256()))
        certificate = self.identity.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return {"bank": self.bank, "session": self.session, "public_key": _b64(self.public_key),
                "certificate": certificate, "signature": _b64(signature)}

    def pair_keys(self, offers: Mapping[str, Any] | Iterable[Any], trust: Trust,
                  banks: Iterable[str] | None = None) -> dict[str, bytes]:
        """{peer: 32-byte key} from the session's offers (own offer may be among them; it must be ours).

        ``banks``: the session's bank list; each must have offered, and no one else may. Without
        it, the offering banks form the session. Fewer than ``MIN_PARTIES`` banks are refused."""
        peers = self.verified_peers(offers, trust, banks)
        if len(peers) + 1 < MIN_PARTIES:
            raise KeyAgreementRefused("too_few_parties", f"{len(peers) + 1} < {MIN_PARTIES} banks; with two, "
                                                         "the sum minus one's own reveals the other's vector")
        return self.keys_with(peers)

    def verified_peers(self, offers: Mapping[str, Any] | Iterable[Any], trust: Trust,
                       banks: Iterable[str] | None = None) -> dict[str, bytes]:
        """{peer: X25519 public key} of the session's offers, each verified (``pair_keys``'s rules but the
        party count): what a bank keeps to derive keys again later in the same session."""
        listed = list(offers.values()) if isinstance(offers, Mapping) else list(offers)
        if len(listed) > MAX_PARTIES:
            raise KeyAgreementRefused("too_many_parties", f"{len(listed)} offers > {MAX_PARTIES}")
        expected = None if banks is None else sorted(set(banks))
        if expected is not None and self.bank not in expected:
            raise KeyAgreementRefused("session_without_me", f"{self.bank} is not in the session's banks {expected}")
        peers: dict[str, bytes] = {}
        for raw in listed:
            bank, public_key = verify_offer(raw, self.session, trust, expected)
            if bank == self.bank:
                if public_key != self.public_key:
                    raise KeyAgreementRefused("offer_not_mine", f"the offer in {self.bank}'s name is not its own")
                continue
            if bank in peers:
                raise KeyAgreementRefused("offer_duplicate", f"two offers from {bank}")
            peers[bank] = public_key
        missing = sorted(set(expected or []) - set(peers) - {self.bank})
        if missing:
            raise KeyAgreementRefused("offer_missing", f"no offer from {', '.join(missing)}")
        return peers

    def keys_with(self, peers: Mapping[str, bytes]) -> dict[str, bytes]:
        """{peer: 32-byte key} with peers whose public keys were verified (``verified_peers``)."""
        return {peer: self._derive(peer, public_key) for peer, public_key in sorted(peers.items())}

    def _derive(self, peer: str, peer_public: bytes) -> bytes:
        try:
            secret = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # a low-order point gives an all-zero secret
            raise KeyAgreementRefused("offer_weak_key", f"{peer}'s public key: {exc}") from None
        return derive_pair_key(secret, self.session, (self.bank, self.public_key), (peer, peer_public))


def derive_pair_key(secret: bytes, session: str, one: tuple[str, bytes], other: tuple[str, bytes]) -> bytes:
    """HKDF-SHA256: salt = both public keys in bank order, info = session and the sorted pair."""
    (a, a_pub), (b, b_pub) = sorted([one, other])
    salt = hashlib.sha256(a_pub + b_pub).digest()
    info = b"\x00".join([KDF_DOMAIN, session.encode(), a.encode(), b.encode()])
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(secret)


def check_label(label: Any) -> str:
    if not isinstance(label, str) or not LABEL_PATTERN.match(label):
        raise KeyAgreementRefused("label_malformed", f"label {str(label)[:60]!r} is not 1-120 of "
                                                     "A-Z a-z 0-9 _ . : / = -")
    return label


def label_keys(pair_keys: Mapping[str, bytes], own: str, session: str, label: str, banks: Iterable[str],
               bound: str) -> dict[str, bytes]:
    """{peer: 32-byte key} for one label of a session, for the peers in ``banks`` (the label's bank list, this
    bank among them): HKDF-SHA256 over the session's pair key, info = the session, the label, the sorted bank
    list, ``bound`` (what the masked vector answers) and the sorted pair; both banks of a pair derive it alike."""
    listed = sorted(set(banks))
    if own not in listed:
        raise KeyAgreementRefused("session_without_me", f"{own} is not in label {label!r}'s banks")
    unknown = [b for b in listed if b != own and b not in pair_keys]
    if unknown:
        raise KeyAgreementRefused("session_bank_unknown", f"no agreed key with {', '.join(unknown)} in this session")
    out = {}
    for peer in (b for b in listed if b != own):
        a, b = sorted([own, peer])
        parts = [LABEL_DOMAIN, check_session(session).encode(), check_label(label).encode(),
                 "\n".join(listed).encode(), bound.encode(), a.encode(), b.encode()]
        info = b"".join(len(p).to_bytes(4, "big") + p for p in parts)
        out[peer] = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(pair_keys[peer])
    return out


def verify_offer(raw: Any, session: str, trust: Trust, banks: list[str] | None) -> tuple[str, bytes]:
    """(bank, its X25519 public key) of a well-formed, authentic offer for ``session``; else refused by name."""
    if not isinstance(raw, dict) or set(raw) != set(OFFER_FIELDS):
        keys = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise KeyAgreementRefused("offer_malformed", f"an offer has exactly {', '.join(OFFER_FIELDS)}; got {keys}")
    bank = raw["bank"]
    if not isinstance(bank, str) or not BANK_PATTERN.match(bank):
        raise KeyAgreementRefused("offer_malformed", f"bank {str(bank)[:40]!r} is not a participant name")
    if raw["session"] != session:
        raise KeyAgreementRefused("offer_wrong_session", f"{bank}'s offer is for session "
                                                         f"{str(raw['session'])[:80]!r}, not {session!r}")
    if banks is not None and bank not in banks:
        raise KeyAgreementRefused("offer_unknown_bank", f"{bank} is not in the session's banks {banks}")
    if trust.banks is not None and bank not in trust.banks:
        raise KeyAgreementRefused("offer_unknown_bank", f"{bank} is not a bank of this consortium")
    public_key = _unb64(raw["public_key"], "public key", bank, PUBLIC_KEY_CHARS)
    if len(public_key) != 32:
        raise KeyAgreementRefused("offer_malformed", f"{bank}'s public key is {len(public_key)} bytes, not 32")
    signature = _unb64(raw["signature"], "signature", bank, MAX_SIGNATURE_CHARS)
    certificate = _certificate(raw["certificate"], bank, trust)
    try:
        certificate.public_key().verify(signature, _signed_message(session, bank, public_key),
                                        ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise KeyAgreementRefused("offer_bad_signature", f"{bank}'s offer is not signed by its certificate's key") \
            from None
    return bank, public_key


def _certificate(pem: Any, bank: str, trust: Trust) -> x509.Certificate:
    """The offer's certificate if the consortium CA issued it to bank ``bank`` and it is valid now."""
    if not isinstance(pem, str) or len(pem) > MAX_CERTIFICATE_CHARS:
        raise KeyAgreementRefused("offer_malformed", f"{bank}'s certificate must be PEM of at most "
                                                     f"{MAX_CERTIFICATE_CHARS} chars")
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except ValueError:
        raise KeyAgreementRefused("offer_malformed", f"{bank}'s certificate is not a PEM certificate") from None
    try:
        certificate.verify_directly_issued_by(trust.ca)
    except (ValueError, TypeError, InvalidSignature):
        raise KeyAgreementRefused("offer_untrusted_certificate",
                                  f"{bank}'s certificate was not issued by the consortium CA") from None
    now = datetime.now(timezone.utc)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise KeyAgreementRefused("offer_expired_certificate", f"{bank}'s certificate is not valid now "
                                                               f"(until {certificate.not_valid_after_utc:%Y-%m-%d})")
    if not isinstance(certificate.public_key(), ec.EllipticCurvePublicKey):
        raise KeyAgreementRefused("offer_untrusted_certificate", f"{bank}'s certificate key is not ECDSA")
    try:
        name, role = cert_identity(certificate)
    except ValueError as exc:
        raise KeyAgreementRefused("offer_wrong_identity", f"{bank}'s certificate: {exc}") from None
    if role != BANK_ROLE:
        raise KeyAgreementRefused("offer_wrong_role", f"{bank}'s certificate is a {role!r} certificate, not a bank's")
    if name != bank:
        raise KeyAgreementRefused("offer_wrong_identity", f"the offer names {bank}, its certificate {name}")
    return certificate
