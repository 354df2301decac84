"""Test helpers on the federated channel: a recording relay in front of the real server, a raw client.

``Recorder`` is a gRPC relay on 127.0.0.1 that passes every call of the ``Federated`` service to
an upstream (XGBoost's real federated server) and keeps the exact request bytes it relayed, so a
test sees what the aggregator's server receives. ``tamper`` lets a test play a hostile server by
rewriting the reply. ``call`` is a bare client, for tests that speak to a sidecar like a worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from fedfraud.secagg import federated_wire as fw

OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


@dataclass(frozen=True)
class Relayed:
    method: str
    request: fw.Request
    reply: bytes  # the upstream's receive buffer


class Recorder:
    def __init__(self, upstream: str, tamper: Callable[[str, fw.Request, bytes], bytes] | None = None):
        self.records: list[Relayed] = []
        self.tamper = tamper
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(upstream, options=OPTIONS)
        self._server = grpc.server(ThreadPoolExecutor(max_workers=16), options=OPTIONS)
        handlers = {m: grpc.unary_unary_rpc_method_handler(self._relay(m)) for m in fw.METHODS}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(fw.SERVICE, handlers),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _relay(self, method: str):
        stub = self._channel.unary_unary(f"/{fw.SERVICE}/{method}")

        def relay(data: bytes, context) -> bytes:
            request = fw.parse_request(method, data)
            reply = fw.parse_reply(method, stub(data, wait_for_ready=True, timeout=300))
            with self._lock:
                self.records.append(Relayed(method, request, reply))
            if self.tamper is not None:
                reply = self.tamper(method, request, reply)
            return fw.encode_reply(reply)
        return relay

    def by_rank(self, rank: int) -> list[Relayed]:
        with self._lock:
            return sorted((r for r in self.records if r.request.rank == rank), key=lambda r: r.request.sequence_number)

    def stop(self) -> None:
        self._server.stop(grace=None)
        self._channel.close()


def call(address: str, method: str, request: fw.Request | bytes, timeout: float = 120) -> bytes:
    """One raw call on the Federated service; returns the receive buffer (grpc.RpcError on refusal)."""
    data = request if isinstance(request, bytes) else fw.encode_request(request)
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        reply = channel.unary_unary(f"/{fw.SERVICE}/{method}")(data, wait_for_ready=True, timeout=timeout)
    return fw.parse_reply(method, reply)


def recording_server(records: list[Recorder]):
    """XGBoost's federated server with a ``Recorder`` in front: the strategy's banks reach the relay, and
    ``records`` gets each launched server's recorder (patch it in as the strategy's ``FederatedServer``)."""
    from aggregator.federated_server import FederatedServer

    class RecordedServer(FederatedServer):
        def launch(self):
            super().launch()
            self.recorder = Recorder(f"127.0.0.1:{self.port}")
            records.append(self.recorder)
            return self

        @property
        def address(self) -> str:
            return self.recorder.address

        def stop(self, grace_s: float = 5.0) -> None:
            super().stop(grace_s)
            if getattr(self, "recorder", None) is not None:
                self.recorder.stop()

    return RecordedServer
