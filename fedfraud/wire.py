"""What crosses a bank's boundary: training tasks in; model updates, key offers and evaluations out.

Every message is JSON: an update carries the bank's new trees (XGBoost JSON, training
statistics scrubbed) and metadata — bank, round, the global model it was trained on, the
feature-contract hash, row counts (``CLEAR_COUNTS``; label counts leave only masked) and local
metrics. Parsing never unpickles and refuses oversized, malformed or incomplete bytes with a
``WireFormatError`` that says which.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from fedfraud.model_json import Doc

DEFAULT_MAX_UPDATE_BYTES = 32 * 1024 * 1024
CLEAR_COUNTS = ("train_rows", "holdout_rows")  # the counts a summary or an update carries in the clear
MASKED_COUNTS = ("positives", "holdout_positives")  # leave only as pairwise-masked words (``MaskedCounts``)
Message = TypeVar("Message", bound="WireMessage")


class WireFormatError(ValueError):
    """Bytes received are not a well-formed, bounded message."""


class CollectiveBytesMalformed(WireFormatError):
    """An update's ``collective_bytes`` is not two counts within bounds (the refusal's name is ``check``)."""

    check = "collective_bytes_malformed"


def _refuse_constant(name: str) -> None:
    raise WireFormatError(f"JSON constant {name} is not allowed (numbers must be finite)")


def loads_strict(data: bytes, what: str = "message") -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, bounded nesting and integer length, else ``WireFormatError``."""
    try:
        return json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
    except WireFormatError:
        raise
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"{what} is not valid JSON (not UTF-8 at byte {exc.start})") from None
    except RecursionError:
        raise WireFormatError(f"{what} is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer beyond Python's digit limit
        raise WireFormatError(f"{what} is not valid JSON ({str(exc)[:160]})") from None


def _fields(message: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict of its values as they are: ``dataclasses.asdict`` deep-copied every
    node of a carried model before encoding it (a 500-tree model: ~2M nodes per message)."""
    return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}


def _nested(value: Any) -> dict[str, Any]:
    """JSON's hook for what it cannot encode itself: a dataclass nested in a message, as its fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def message_bytes(body: dict[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no spaces) of a message's fields; the same bytes as of its ``asdict``."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True, default=_nested).encode()


class WireMessage:
    """JSON (de)serialisation with a size bound, shared by every message type."""

    KIND: ClassVar[str] = "message"
    MAX_BYTES: ClassVar[int] = DEFAULT_MAX_UPDATE_BYTES

    def to_bytes(self) -> bytes:
        return message_bytes(_fields(self))

    @classmethod
    def from_bytes(cls: type[Message], data: bytes, max_bytes: int | None = None) -> Message:
        limit = cls.MAX_BYTES if max_bytes is None else max_bytes
        if len(data) > limit:
            raise WireFormatError(f"{cls.KIND} of {len(data)} bytes exceeds the {limit}-byte limit")
        parsed = loads_strict(data, cls.KIND)
        if not isinstance(parsed, dict):
            raise WireFormatError(f"{cls.KIND} must be a JSON object")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in parsed]
        if missing:
            raise WireFormatError(f"{cls.KIND} is missing {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in parsed.items() if k in known})


@dataclass(frozen=True)
class TrainTask(WireMessage):
    """What the aggregator asks of one bank in one round: K trees on top of the global model."""

    KIND: ClassVar[str] = "training task"
    MAX_BYTES: ClassVar[int] = 4 * DEFAULT_MAX_UPDATE_BYTES

    bank: str
    round_id: int
    base_model_id: str
    contract_hash: str
    num_trees: int
    params: dict[str, Any]
    base_model: Doc | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ModelUpdate(WireMessage):
    """A bank's new trees for one round, with the metadata the aggregator checks."""

    KIND: ClassVar[str] = "update"

    bank: str
    round_id: int
    base_model_id: str
    contract_hash: str
    seed: int
    counts: dict[str, int]
    metrics: dict[str, float]
    model: Doc = field(repr=False)
    privacy_epsilon: float | None = None  # ε the bank has spent so far, when it trains privately (its claim)
    # histogram rounds: the payload bytes the bank's masking sidecar sent to / received from the federated
    # server in the round's session (``bank_node.collective_bytes``; its claim, counted as its own report)
    collective_bytes: dict[str, int] | None = None

    MAX_EPSILON: ClassVar[float] = 1e6
    MAX_COLLECTIVE_BYTES: ClassVar[int] = 1 << 40  # per direction and round: 1 TiB, far above any real round

    def __post_init__(self) -> None:
        eps = self.privacy_epsilon
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                                or not 0 <= eps <= self.MAX_EPSILON):  # NaN fails the comparison too
            raise WireFormatError(f"update privacy_epsilon must be a number in [0, {self.MAX_EPSILON:g}], "
                                  f"got {str(eps)[:24]}")
        counted = self.collective_bytes
        if counted is not None and not (isinstance(counted, dict) and set(counted) == {"received", "sent"} and all(
                type(n) is int and 0 <= n <= self.MAX_COLLECTIVE_BYTES for n in counted.values())):
            raise CollectiveBytesMalformed(f"collective_bytes_malformed: the update's collective_bytes must be "
                                           f"{{'sent', 'received'}} integers in [0, 2**40], got {str(counted)[:80]}")

    def to_bytes(self) -> bytes:
        """As every message; without ``privacy_epsilon`` (``collective_bytes``) when the bank has none."""
        body = _fields(self)
        for optional in ("privacy_epsilon", "collective_bytes"):
            if body[optional] is None:
                del body[optional]
        return message_bytes(body)


@dataclass(frozen=True)
class EvaluationReport(WireMessage):
    """A bank's verdict on one model: metrics and score histograms, never a score (cross-evaluation and
    acceptance; the round's evaluation sends ``MaskedEvaluation``)."""

    KIND: ClassVar[str] = "evaluation report"
    MAX_BYTES: ClassVar[int] = 1024 * 1024

    bank: str
    model_id: str
    positives: int
    negatives: int
    metrics: dict[str, float]
    hist_pos: list[int] = field(repr=False)
    hist_neg: list[int] = field(repr=False)


# ---- secure aggregation: key offers and masked evaluations (``fedfraud.secagg``) -----------------


@dataclass(frozen=True)
class KeyRequest(WireMessage):
    """The aggregator asks a bank for a signed ephemeral key offer for one session."""

    KIND: ClassVar[str] = "key request"
    MAX_BYTES: ClassVar[int] = 64 * 1024

    session: str
    banks: list[str]


@dataclass(frozen=True)
class SessionOffer(WireMessage):
    """A bank's signed ephemeral X25519 public key for one session (``fedfraud.secagg.keys``)."""

    KIND: ClassVar[str] = "key offer"
    MAX_BYTES: ClassVar[int] = 16 * 1024

    bank: str
    session: str
    public_key: str
    certificate: str
    signature: str

    @classmethod
    def relayable(cls, data: bytes, bank: str, session: str) -> dict[str, str]:
        """``bank``'s offer for ``session`` as the aggregator relays it (its fields, unchanged); else refused."""
        offer = cls.from_bytes(data)
        if offer.bank != bank or offer.session != session:
            raise WireFormatError(f"offer names {str(offer.bank)[:40]} / session {str(offer.session)[:80]}")
        return _fields(offer)


@dataclass(frozen=True)
class MaskedEvaluationTask(WireMessage):
    """Evaluate ``model`` and mask its score histograms for ``session``: the banks, their relayed offers,
    and ``purpose`` (``candidate`` or ``champion``: the bank maps it to its own mask slot)."""

    KIND: ClassVar[str] = "masked evaluation task"
    MAX_BYTES: ClassVar[int] = 4 * DEFAULT_MAX_UPDATE_BYTES

    session: str
    purpose: str
    banks: list[str]
    offers: dict[str, Any] = field(repr=False)
    model: Doc = field(repr=False)


@dataclass(frozen=True)
class MaskedEvaluation(WireMessage):
    """A bank's evaluation of one model: its score histograms (positives then negatives) as pairwise-masked
    uint64 words (base64, little-endian), uniformly random alone; metrics only if the bank shares them."""

    KIND: ClassVar[str] = "masked evaluation"
    MAX_BYTES: ClassVar[int] = 64 * 1024

    bank: str
    model_id: str
    session: str
    purpose: str
    words: str = field(repr=False)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MaskedCountsTask(WireMessage):
    """Planning: mask this bank's label counts (``MASKED_COUNTS``) for ``session``: its banks, their relayed offers."""

    KIND: ClassVar[str] = "masked counts task"
    MAX_BYTES: ClassVar[int] = 2 * 1024 * 1024

    session: str
    banks: list[str]
    offers: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class RefitTask(WireMessage):
    """Leaf refit (bagging compaction): this bank's per-leaf gradient and hessian sums of ``model`` on its
    training rows (``fedfraud.leaf_refit``), masked for ``session`` at step ``step`` of the refit."""

    KIND: ClassVar[str] = "refit task"
    MAX_BYTES: ClassVar[int] = 4 * DEFAULT_MAX_UPDATE_BYTES

    round_id: int
    step: int
    session: str
    banks: list[str]
    offers: dict[str, Any] = field(repr=False)
    model: Doc = field(repr=False)


@dataclass(frozen=True)
class MaskedRefitSums(WireMessage):
    """A bank's per-leaf gradient sums, hessian sums (flat leaf order), then its training loss summed, as
    pairwise-masked uint64 words (base64): uniformly random alone, only the sum over the session's banks
    decodes. Same fields as ``MaskedCounts`` (the boundary declares both as ``masked counts``)."""

    KIND: ClassVar[str] = "masked refit sums"
    MAX_BYTES: ClassVar[int] = 16 * 1024 * 1024

    bank: str
    session: str
    words: str = field(repr=False)


@dataclass(frozen=True)
class MaskedCounts(WireMessage):
    """A bank's label counts (``MASKED_COUNTS``, in that order) as pairwise-masked uint64 words (base64,
    little-endian): uniformly random alone, only the sum over the session's banks decodes."""

    KIND: ClassVar[str] = "masked counts"
    MAX_BYTES: ClassVar[int] = 4 * 1024

    bank: str
    session: str
    words: str = field(repr=False)
