"""What the service checks on every upload before it keeps a byte: size, format, sender.

Each refusal is a ``Refused`` with an HTTP status and a named check, recorded in the
rejections table and returned to the caller. Nothing received is unpickled: every body is
bounded, then parsed as strict JSON (no NaN/Infinity, bounded nesting) into the wire message its
task expects; a summary's counts must be row counts, non-negative integers (``invalid_counts``: a label
count in the clear is refused; it leaves a bank only masked).
Whatever the bytes, the answer is a named refusal, never a server error.
"""

from __future__ import annotations

from aggregator.protocol.plan import summary_problem
from fedfraud.binning import BinCounts
from fedfraud.grid_counts import MaskedGridCounts
from fedfraud.crosscheck import MaskedScoreAnswer, ScoreAnswer
from fedfraud.protocol import TaskKind
from fedfraud.wire import (
    MaskedCounts, MaskedEvaluation, MaskedRefitSums, ModelUpdate, SessionOffer, WireFormatError, loads_strict,
)

MAX_SUMMARY_BYTES = 64 * 1024
MAX_FAILURE_BYTES = 16 * 1024
SUMMARY_KEYS = ("bank", "contract_hash", "counts", "training_allowed", "decline_reasons", "data_window")


class Refused(Exception):
    """An API call the service refuses: HTTP ``status``, the ``check`` that refused it, ``detail``."""

    def __init__(self, status: int, check: str, detail: str):
        super().__init__(f"{check}: {detail}")
        self.status, self.check, self.detail = status, check, detail

    def as_dict(self) -> dict[str, str]:
        return {"rejected": self.check, "detail": self.detail}


def limit_for(kind: str, max_update_bytes: int) -> int:
    limits = {TaskKind.SUMMARY: MAX_SUMMARY_BYTES, TaskKind.EVALUATE: MaskedEvaluation.MAX_BYTES,
              TaskKind.EVALUATE_CHAMPION: MaskedEvaluation.MAX_BYTES,
              TaskKind.BIN_COUNTS: max(BinCounts.MAX_BYTES, MaskedGridCounts.MAX_BYTES),
              TaskKind.ACCEPT: ScoreAnswer.MAX_BYTES, TaskKind.CROSSVAL: ScoreAnswer.MAX_BYTES,
              TaskKind.KEYS: SessionOffer.MAX_BYTES, TaskKind.COUNTS: MaskedCounts.MAX_BYTES,
              TaskKind.REFIT: MaskedRefitSums.MAX_BYTES}
    return limits.get(kind, max_update_bytes)


def screen_upload(kind: str, body: bytes, caller: str, round_id: int, max_update_bytes: int) -> None:
    """Refuse a body too large, not the message ``kind`` expects, or sent on behalf of another bank."""
    limit = limit_for(kind, max_update_bytes)
    if len(body) > limit:
        raise Refused(413, "too_large", f"{kind} of {len(body)} bytes exceeds the {limit}-byte limit")
    try:
        sender, for_round = _parse(kind, body)
    except Refused:
        raise
    except (WireFormatError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise Refused(400, getattr(exc, "check", "malformed"),  # named when the message says which rule
                      f"{kind} from {caller} is not a well-formed message: {exc.__class__.__name__}: "
                      f"{str(exc)[:300]}") from None
    if sender != caller:
        raise Refused(403, "wrong_sender", f"{caller} cannot upload a {kind} on behalf of {sender}")
    if for_round is not None and for_round != round_id:
        raise Refused(422, "wrong_round", f"{kind} is for round {for_round}, the task is for round {round_id}")


def _parse(kind: str, body: bytes) -> tuple[str, int | None]:
    """(the bank the message says it is from, the round it says it is for)."""
    if kind in TaskKind.UPDATES:
        update = ModelUpdate.from_bytes(body, max_bytes=len(body))
        return update.bank, update.round_id
    if kind in TaskKind.EVALUATIONS:  # masked words; the tally checks session, model and words
        return MaskedEvaluation.from_bytes(body).bank, None
    if kind == TaskKind.KEYS:  # a signed key offer: the banks verify it, the service only relays it
        return SessionOffer.from_bytes(body).bank, None
    if kind == TaskKind.COUNTS:  # planning: masked words; the tally checks session and words
        return MaskedCounts.from_bytes(body).bank, None
    if kind == TaskKind.REFIT:  # leaf refit: masked words; the step checks session, words and the decoded sums
        return MaskedRefitSums.from_bytes(body).bank, None
    if kind == TaskKind.BIN_COUNTS:  # masked words (the default); sparse clear counts from a bank that allows them
        masked = b'"words"' in body
        return (MaskedGridCounts if masked else BinCounts).from_bytes(body).bank, None
    if kind in TaskKind.SCORES:  # masked unless the federation chose the clear (acceptance, cross-evaluation)
        masked = b'"words"' in body
        answer = (MaskedScoreAnswer if masked else ScoreAnswer).from_bytes(body)
        return answer.bank, answer.round_id
    if kind == TaskKind.SUMMARY:
        summary = loads_strict(body, "summary")
        if not isinstance(summary, dict):
            raise ValueError("a summary must be a JSON object")
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise ValueError(f"summary is missing {', '.join(missing)}")
        problem = summary_problem(summary)
        if problem:
            raise Refused(422, *problem)
        return str(summary["bank"]), None
    raise ValueError(f"unknown task kind {kind!r}")
