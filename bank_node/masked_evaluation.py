"""A bank's side of secure aggregation in the round's evaluation: its key offer, then its masked histograms.

``make_offer`` answers a ``KeyRequest``: a fresh X25519 key for the session (kept in the bank's
work folder, mode 0600, never sent, deleted ``SESSION_TTL_S`` after the session's last use), signed
with the bank's consortium certificate. ``evaluate_masked`` answers a ``MaskedEvaluationTask``: it
verifies every peer's relayed offer, derives the pairwise keys, scores its holdout through the node's
ordinary (guarded) evaluation and sends its score histograms only as masked words — plus its metrics
if, and only if, the bank shares them (``share_metrics``).

Refused by name: a bank without a consortium certificate (``secagg_no_identity``), fewer than three
banks (``too_few_parties``), a session it never offered in (``session_unknown``), a second, different
answer in the same session and slot (``mask_reuse``), and every offer rule of ``fedfraud.secagg.keys``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from fedfraud import model_json
from fedfraud.secagg.keys import Identity, KeyAgreementRefused, SessionKeys, Trust, check_session
from fedfraud.secagg.masking import (
    MAX_PARTIES, MIN_PARTIES, MaskReuse, PairwiseMasker, TooFewParties, encode_counts, words_to_text,
)
from fedfraud.wire import EvaluationReport, KeyRequest, MaskedEvaluation, MaskedEvaluationTask, SessionOffer

if TYPE_CHECKING:
    from bank_node.node import BankNode

SESSION_TTL_S = 7 * 24 * 3600  # a session's private key and answers are deleted this long after their last use
SLOTS = {"candidate": 0, "champion": 1}  # the bank's own mask label per purpose: never chosen by the aggregator


class SecAggUnavailable(RuntimeError):
    """The bank has no consortium certificate to sign its key offers with."""


@dataclass(frozen=True)
class SecAggCredentials:
    """What a bank signs with (its certificate and key) and whom it believes (the consortium CA, banks)."""

    identity: Identity
    trust: Trust

    @classmethod
    def from_files(cls, ca: str | Path, cert: str | Path, key: str | Path,
                   banks: Iterable[str] | None = None) -> "SecAggCredentials":
        return cls(Identity.from_files(cert, key), Trust.from_file(ca, banks))


class SessionStore:
    """``<work>/secagg/<sha256(bank, session)>/``: the session's private key and the answers already sent.

    Keyed by bank as well as session: two agents given one work folder by mistake never read each
    other's keys or answers (each would otherwise refuse its own offer as ``offer_not_mine``)."""

    def __init__(self, folder: Path, bank: str):
        self.folder, self.bank = Path(folder), bank

    def _dir(self, session: str) -> Path:
        return self.folder / hashlib.sha256(f"{self.bank}\n{session}".encode()).hexdigest()[:32]

    def keys(self, session: str, identity: Identity, create: bool) -> SessionKeys:
        bank, path = self.bank, self._dir(session) / "x25519.key"
        if path.exists():
            return SessionKeys.from_secret_bytes(bank, session, identity, path.read_bytes())
        if not create:
            raise KeyAgreementRefused("session_unknown", f"{bank} made no key offer in session {session!r}")
        keys = SessionKeys.generate(bank, session, identity)
        _write_private(path, keys.secret_bytes())
        return keys

    def prune(self, older_than_s: float = SESSION_TTL_S) -> list[str]:
        """Delete the sessions unused for ``older_than_s`` (their private keys need not outlive them)."""
        if not self.folder.is_dir():
            return []
        cutoff, removed = time.time() - older_than_s, []
        for folder in self.folder.iterdir():
            if folder.is_dir() and not folder.is_symlink() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder)
                removed.append(folder.name)
        return removed

    def bind_phase(self, session: str, phase: str) -> None:
        """A session serves one phase: its first answer fixes which. Phases number their mask slots on their own
        (evaluation 0-1, acceptance 0-63, grid 2, cross-evaluation and counts from 2**32), so two phases under
        one session's keys could mask two vectors with one keystream (``mask_reuse``)."""
        path = self._dir(session) / "phase"
        if path.exists() and path.read_text() != phase:
            raise MaskReuse(f"mask_reuse: session {session} already serves {path.read_text()[:40]}, not {phase}")
        if not path.exists():
            _write_private(path, phase.encode())

    def peers(self, session: str) -> dict[str, bytes] | None:
        """The peers' X25519 public keys this bank verified for ``session`` (``keep_peers``), or None."""
        path = self._dir(session) / "peers.json"
        if not path.exists():
            return None
        return {bank: bytes.fromhex(key) for bank, key in json.loads(path.read_bytes()).items()}

    def keep_peers(self, session: str, peers: dict[str, bytes]) -> None:
        _write_private(self._dir(session) / "peers.json",
                       json.dumps({bank: key.hex() for bank, key in sorted(peers.items())}).encode())

    def answered(self, session: str, purpose: str) -> dict | None:
        path = self._dir(session) / f"{purpose}.json"
        return json.loads(path.read_bytes()) if path.exists() else None

    def keep(self, session: str, purpose: str, model_id: str, body: bytes) -> None:
        _write_private(self._dir(session) / f"{purpose}.json",
                       json.dumps({"model_id": model_id, "body": body.decode()}).encode())


def _write_private(path: Path, data: bytes) -> None:
    """Atomically, readable by the bank only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def credentials_of(node: "BankNode") -> SecAggCredentials:
    credentials = node.secagg_credentials()
    if credentials is None:
        raise SecAggUnavailable(f"secagg_no_identity: {node.bank} has no consortium certificate to sign key offers")
    return credentials


def session_banks(bank: str, banks: object) -> list[str]:
    if not isinstance(banks, list) or not all(isinstance(b, str) for b in banks) or len(set(banks)) != len(banks):
        raise KeyAgreementRefused("session_malformed", "the session's banks must be distinct names")
    if bank not in banks:
        raise KeyAgreementRefused("session_without_me", f"{bank} is not in the session's banks")
    if len(banks) < MIN_PARTIES:
        raise TooFewParties(f"too_few_parties: {len(banks)} < {MIN_PARTIES} banks; {bank} does not mask for fewer")
    if len(banks) > MAX_PARTIES:
        raise KeyAgreementRefused("too_many_parties", f"{len(banks)} > {MAX_PARTIES} banks")
    return sorted(banks)


def make_offer(node: "BankNode", request_bytes: bytes) -> bytes:
    """This bank's signed offer for the request's session (the same key if asked again)."""
    credentials = credentials_of(node)
    request = KeyRequest.from_bytes(request_bytes)
    session = check_session(request.session)
    session_banks(node.bank, request.banks)
    node.secagg_store.prune()
    keys = node.secagg_store.keys(session, credentials.identity, create=True)
    return SessionOffer(**keys.offer()).to_bytes()


def session_masker(node: "BankNode", session: object, banks: object, offers: object) -> tuple[str, PairwiseMasker]:
    """The session's name and this bank's pairwise masker for it: the session well named, its banks (at least
    three, this bank among them), every relayed offer verified against the consortium; refused by name."""
    credentials = credentials_of(node)
    session = check_session(session)
    listed = session_banks(node.bank, banks)
    if not isinstance(offers, dict):
        raise KeyAgreementRefused("offer_malformed", "offers must be an object")
    keys = node.secagg_store.keys(session, credentials.identity, create=False)
    return session, PairwiseMasker(node.bank, keys.pair_keys(offers, credentials.trust, listed))


def earlier_answer(node: "BankNode", session: str, purpose: str, answered: str) -> bytes | None:
    """The answer already sent in this session and slot for the same ``answered`` (model or question id), sent
    again; None if there is none. Another vector under the same masks is refused (``mask_reuse``), and so is
    another phase under the same session (``SessionStore.bind_phase``)."""
    node.secagg_store.bind_phase(session, "evaluation" if purpose in SLOTS else purpose)
    earlier = node.secagg_store.answered(session, purpose)
    if earlier is None:
        return None
    if earlier["model_id"] != answered:
        raise MaskReuse(f"mask_reuse: {node.bank} already masked another {purpose} answer in session {session}")
    return earlier["body"].encode()


def evaluate_masked(node: "BankNode", task_bytes: bytes) -> bytes:
    """Score the task's model on the holdout; answer its histograms masked, metrics only if shared."""
    credentials_of(node)  # a bank without a consortium certificate says so before anything else
    task = MaskedEvaluationTask.from_bytes(task_bytes)
    if task.purpose not in SLOTS:
        raise KeyAgreementRefused("purpose_unknown", f"purpose {str(task.purpose)[:30]!r} is not one of {list(SLOTS)}")
    session, masker = session_masker(node, task.session, task.banks, task.offers)
    report = EvaluationReport.from_bytes(node.evaluate(model_json.to_bytes(task.model)))
    if (earlier := earlier_answer(node, session, task.purpose, report.model_id)) is not None:
        return earlier  # the same answer again is harmless
    words = encode_counts(np.concatenate([np.asarray(report.hist_pos, dtype=np.int64),
                                          np.asarray(report.hist_neg, dtype=np.int64)]))
    masked = masker.mask(words, SLOTS[task.purpose])
    metrics = dict(report.metrics) if node.share_metrics else {}
    body = MaskedEvaluation(node.bank, report.model_id, session, task.purpose, words_to_text(masked),
                            metrics).to_bytes()
    node.secagg_store.keep(session, task.purpose, report.model_id, body)
    return body
