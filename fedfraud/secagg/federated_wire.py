"""Bounded protobuf codec for XGBoost 3.2's ``xgboost.collective.federated.Federated`` messages.

The masking sidecar sits between a bank's XGBoost worker and the aggregator's federated server.
It must read and rewrite each request and check each reply without trusting either side's
bytes, so this module parses the five message shapes by hand: sizes bounded, every field's
number and wire type checked, unknown or repeated fields refused by name, enums limited to
their declared values. Messages are rebuilt from the allowed fields only, never forwarded raw.

Layout: the ``federated.proto`` descriptor embedded in xgboost 3.2.0's ``libxgboost.so``:

    Allgather/AllgatherV/Broadcast/Allreduce request: 1 sequence_number (uint64), 2 rank (int32),
        3 send_buffer (bytes); Allreduce adds 4 data_type, 5 reduce_operation (enums);
        Broadcast adds 4 root (int32)
    every reply: 1 receive_buffer (bytes)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SERVICE = "xgboost.collective.federated.Federated"
METHODS = ("Allgather", "AllgatherV", "Allreduce", "Broadcast")
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

# DataType enum -> numpy dtype (LONG_DOUBLE has no portable width: refused)
DTYPES: dict[int, np.dtype | None] = {
    0: np.dtype("<f2"), 1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: None, 4: np.dtype("i1"),
    5: np.dtype("<i2"), 6: np.dtype("<i4"), 7: np.dtype("<i8"), 8: np.dtype("u1"), 9: np.dtype("<u2"),
    10: np.dtype("<u4"), 11: np.dtype("<u8")}
DTYPE_NAMES = {0: "HALF", 1: "FLOAT", 2: "DOUBLE", 3: "LONG_DOUBLE", 4: "INT8", 5: "INT16", 6: "INT32",
               7: "INT64", 8: "UINT8", 9: "UINT16", 10: "UINT32", 11: "UINT64"}
UINT64 = 11
OPS = {0: "MAX", 1: "MIN", 2: "SUM", 3: "BITWISE_AND", 4: "BITWISE_OR", 5: "BITWISE_XOR"}
SUM = 2

_VARINT, _BYTES = 0, 2
# field number -> (name, wire type) per request method; every reply is {1: receive_buffer}
_COMMON = {1: ("sequence_number", _VARINT), 2: ("rank", _VARINT), 3: ("send_buffer", _BYTES)}
_REQUEST_FIELDS = {
    "Allgather": _COMMON,
    "AllgatherV": _COMMON,
    "Allreduce": {**_COMMON, 4: ("data_type", _VARINT), 5: ("reduce_operation", _VARINT)},
    "Broadcast": {**_COMMON, 4: ("root", _VARINT)},
}
_REPLY_FIELDS = {1: ("receive_buffer", _BYTES)}
_INT32_MAX = 2**31 - 1


class FederatedWireError(ValueError):
    """Bytes on the federated channel are not a well-formed, bounded message; the message says which rule."""


@dataclass(frozen=True)
class Request:
    """One collective call from a worker, rebuilt from its allowed fields."""

    method: str
    sequence_number: int
    rank: int
    send_buffer: bytes
    data_type: int = 0  # Allreduce only
    reduce_operation: int = 0  # Allreduce only
    root: int = 0  # Broadcast only

    @property
    def dtype(self) -> np.dtype:
        dtype = DTYPES[self.data_type]
        if dtype is None:
            raise FederatedWireError(f"federated_unsupported_dtype: {DTYPE_NAMES[self.data_type]}")
        return dtype

    def values(self) -> np.ndarray:
        """The Allreduce payload as an array of its declared dtype (length checked)."""
        dtype = self.dtype
        if len(self.send_buffer) % dtype.itemsize:
            raise FederatedWireError(f"federated_malformed: {len(self.send_buffer)} bytes is not a whole number "
                                     f"of {DTYPE_NAMES[self.data_type]} values")
        return np.frombuffer(self.send_buffer, dtype=dtype)

    def describe(self) -> str:
        extra = f" {DTYPE_NAMES[self.data_type]} {OPS[self.reduce_operation]}" if self.method == "Allreduce" else ""
        return f"{self.method}#{self.sequence_number}{extra} ({len(self.send_buffer)} bytes)"


# ---------------------------------------------------------------------------- decoding

def _read_varint(data: bytes, at: int, what: str) -> tuple[int, int]:
    value, shift = 0, 0
    for i in range(10):
        if at + i >= len(data):
            raise FederatedWireError(f"federated_malformed: {what} truncated inside a varint")
        byte = data[at + i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if value >= 2**64:
                raise FederatedWireError(f"federated_malformed: {what} varint exceeds 64 bits")
            return value, at + i + 1
    raise FederatedWireError(f"federated_malformed: {what} varint longer than 10 bytes")


def _parse(data: bytes, fields: dict[int, tuple[str, int]], what: str, max_bytes: int) -> dict[str, int | bytes]:
    if len(data) > max_bytes:
        raise FederatedWireError(f"federated_message_too_large: {what} of {len(data)} bytes exceeds {max_bytes}")
    out: dict[str, int | bytes] = {}
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at, what)
        number, wire = key >> 3, key & 7
        if number not in fields:
            raise FederatedWireError(f"federated_unknown_field: {what} field {number} (wire type {wire})")
        name, expected = fields[number]
        if wire != expected:
            raise FederatedWireError(f"federated_malformed: {what} field {name} has wire type {wire}, "
                                     f"expected {expected}")
        if name in out:
            raise FederatedWireError(f"federated_malformed: {what} field {name} repeated")
        if wire == _VARINT:
            out[name], at = _read_varint(data, at, what)
        else:
            length, at = _read_varint(data, at, what)
            if length > len(data) - at:
                raise FederatedWireError(f"federated_malformed: {what} field {name} claims {length} bytes, "
                                         f"{len(data) - at} left")
            out[name] = bytes(data[at:at + length])
            at += length
    return out


def _int32(value: int, name: str, what: str) -> int:
    if value >= 2**63:  # a negative int32 is sent sign-extended to 64 bits
        value -= 2**64
    if not 0 <= value <= _INT32_MAX:
        raise FederatedWireError(f"federated_malformed: {what} {name} {value} is not a non-negative int32")
    return value


def parse_request(method: str, data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Request:
    """A worker's request, bounded and checked field by field."""
    if method not in _REQUEST_FIELDS:
        raise FederatedWireError(f"federated_unknown_method: {method!r}")
    what = f"{method} request"
    fields = _parse(data, _REQUEST_FIELDS[method], what, max_bytes)
    data_type = int(fields.get("data_type", 0))
    operation = int(fields.get("reduce_operation", 0))
    if data_type not in DTYPES:
        raise FederatedWireError(f"federated_unknown_dtype: {what} data_type {data_type}")
    if operation not in OPS:
        raise FederatedWireError(f"federated_unknown_op: {what} reduce_operation {operation}")
    return Request(method=method, sequence_number=int(fields.get("sequence_number", 0)),
                   rank=_int32(int(fields.get("rank", 0)), "rank", what),
                   send_buffer=bytes(fields.get("send_buffer", b"")), data_type=data_type,
                   reduce_operation=operation, root=_int32(int(fields.get("root", 0)), "root", what))


def parse_reply(method: str, data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The receive buffer of a server's reply (nothing else is allowed in it)."""
    return bytes(_parse(data, _REPLY_FIELDS, f"{method} reply", max_bytes).get("receive_buffer", b""))


# ---------------------------------------------------------------------------- encoding

def _varint(value: int) -> bytes:
    out = bytearray()
    value &= 2**64 - 1
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    """proto3: a field at its default (0, empty) is not written."""
    if isinstance(value, bytes):
        return _varint(number << 3 | _BYTES) + _varint(len(value)) + value if value else b""
    return _varint(number << 3 | _VARINT) + _varint(value) if value else b""


def encode_request(request: Request) -> bytes:
    out = _field(1, request.sequence_number) + _field(2, request.rank) + _field(3, request.send_buffer)
    if request.method == "Allreduce":
        out += _field(4, request.data_type) + _field(5, request.reduce_operation)
    elif request.method == "Broadcast":
        out += _field(4, request.root)
    return out


def encode_reply(receive_buffer: bytes) -> bytes:
    return _field(1, receive_buffer)
