"""The federated channel's protobuf codec: canonical round trips, and every malformed shape refused by name."""

import numpy as np
import pytest

from fedfraud.secagg import federated_wire as fw


def test_requests_round_trip_and_match_the_protobuf_library_layout():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    request = fw.Request("Allreduce", 2**40 + 3, 2, np.arange(5, dtype="<f8").tobytes(), 2, 2)
    data = fw.encode_request(request)
    assert fw.parse_request("Allreduce", data) == request
    assert np.array_equal(fw.parse_request("Allreduce", data).values(), np.arange(5.0))
    # the same bytes as the protobuf runtime writes for the proto3 message (fields 1-5)
    file = descriptor_pb2.FileDescriptorProto(name="t.proto", package="t", syntax="proto3")
    message = file.message_type.add(name="AllreduceRequest")
    for number, (name, kind) in enumerate([("sequence_number", 4), ("rank", 5), ("send_buffer", 12),
                                           ("data_type", 5), ("reduce_operation", 5)], start=1):
        message.field.add(name=name, number=number, type=kind, label=1)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.AllreduceRequest"))
    theirs = cls(sequence_number=request.sequence_number, rank=2, send_buffer=request.send_buffer, data_type=2,
                 reduce_operation=2).SerializeToString()
    assert theirs == data
    broadcast = fw.Request("Broadcast", 0, 1, b"", root=2)
    assert fw.parse_request("Broadcast", fw.encode_request(broadcast)) == broadcast
    assert fw.parse_reply("Allgather", fw.encode_reply(b"abc")) == b"abc" and fw.parse_reply("Allgather", b"") == b""


@pytest.mark.parametrize("data, rule", [
    (b"\x48\x01", "federated_unknown_field"),  # field 9
    (b"\x20\x01", "federated_unknown_field"),  # Allgather has no field 4
    (b"\x1a\x05ab", "federated_malformed: .* claims 5 bytes"),
    (b"\x08", "federated_malformed: .* truncated"),
    (b"\x08" + b"\xff" * 10 + b"\x01", "federated_malformed: .* longer than 10 bytes"),
    (b"\x0a\x00", "federated_malformed: .* wire type 2"),  # sequence_number as bytes
    (b"\x08\x01\x08\x02", "federated_malformed: .* repeated"),
    (b"\x10" + b"\xff" * 9 + b"\x01", "federated_malformed: .* rank -1"),  # negative int32, sign-extended
    (b"\x1d\x00\x00\x00\x00", "federated_unknown_field|federated_malformed"),  # fixed32 wire type
])
def test_malformed_requests_are_refused_by_name(data, rule):
    with pytest.raises(fw.FederatedWireError, match=rule):
        fw.parse_request("Allgather", data)


def test_enums_sizes_and_methods_are_bounded():
    with pytest.raises(fw.FederatedWireError, match="federated_unknown_dtype"):
        fw.parse_request("Allreduce", b"\x20\x0c")  # data_type 12
    with pytest.raises(fw.FederatedWireError, match="federated_unknown_op"):
        fw.parse_request("Allreduce", b"\x28\x06")
    with pytest.raises(fw.FederatedWireError, match="federated_unsupported_dtype: LONG_DOUBLE"):
        fw.parse_request("Allreduce", b"\x1a\x10" + bytes(16) + b"\x20\x03").values()
    with pytest.raises(fw.FederatedWireError, match="not a whole number of DOUBLE"):
        fw.parse_request("Allreduce", b"\x1a\x03abc\x20\x02").values()
    with pytest.raises(fw.FederatedWireError, match="federated_message_too_large"):
        fw.parse_request("Allgather", fw.encode_request(fw.Request("Allgather", 1, 0, bytes(100))), max_bytes=64)
    with pytest.raises(fw.FederatedWireError, match="federated_unknown_method"):
        fw.parse_request("Shutdown", b"")
    with pytest.raises(fw.FederatedWireError, match="federated_unknown_field"):
        fw.parse_reply("Allreduce", b"\x10\x01")  # a reply holds its receive buffer only
