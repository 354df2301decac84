"""The bank's masking sidecar: every SUM its XGBoost worker sends leaves the bank pairwise-masked.

XGBoost 3.2 has no encryption plugin, so the bank's worker talks to this gRPC proxy on
127.0.0.1 instead of the aggregator's federated server. The proxy speaks the same
``xgboost.collective.federated.Federated`` service and holds the bank's channel to the real
server (with TLS when the session asks for it). Per collective call:

* ``Allreduce(SUM)``: the payload becomes fixed-point uint64 words (``fedfraud.secagg.masking``),
  plus this bank's pairwise masks labelled by the call's sequence number, sent as a ``UINT64``
  sum. The masks cancel in the server's sum; the reply is checked (exact size) and decoded back
  to the worker's dtype. Values the sum could overflow are refused by name.
* ``Allreduce(MAX/MIN/bitwise)`` and ``Broadcast``: forwarded in the clear (the README lists what
  they carry). Replies are checked against the size they must have.
* ``Allgather``/``AllgatherV`` from the worker: refused. They would hand this bank's buffer to
  every peer in the clear (XGBoost's quantile sketch does that); the histogram path, with cut
  points from the public edges, sends none.

Keys: before the worker's first call, each sidecar makes a fresh X25519 key for the session
(``fedfraud.secagg.keys``), signs it with the bank's consortium certificate and sends the offer
through the server as the session's call 0 (an ``Allgather`` of fixed-size slots: the aggregator
relays public material only). It verifies every peer's offer and derives one key per peer; the
worker's calls then go upstream one sequence number later. No key ever touches disk.

Every request and reply is parsed bounded and rebuilt from its allowed fields
(``fedfraud.secagg.federated_wire``); a request claiming another rank is refused. After any
refusal the session is broken: every later call is refused too, so no partial sum goes out.
Every upstream call's bytes count towards the session's total (``bank_node.collective_bytes``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import threading
import traceback
from collections.abc import Callable, Mapping

import numpy as np

from bank_node.child_process import publish, server_watch, watchdog
from bank_node.collective_bytes import WireCount
from fedfraud.secagg import federated_wire as fw
from fedfraud.secagg.masking import (
    FRAC_BITS, MIN_PARTIES, WORD_LIMIT, FixedPointOverflow, PairwiseMasker, SecureAggregationError, TooFewParties,
    decode, encode,
)

STARTED = __import__("time").monotonic()
OFFER_SLOT_BYTES = 16384  # one bank's offer in the key allgather: 4-byte length + JSON, zero padded
FLOATS = {0, 1, 2}  # HALF, FLOAT, DOUBLE


class SidecarRefused(SecureAggregationError):
    """The sidecar refused a call or a reply; the message starts with the rule's name."""


Forward = Callable[[str, bytes], bytes]  # (method, request bytes) -> reply bytes, on the upstream channel


def _refuse_constant(name: str):
    raise ValueError(f"JSON constant {name}")


def _offer_json(data: bytes, bank: str):
    """A relayed offer as strict JSON (fedfraud.wire's parser would import XGBoost: seconds per sidecar)."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SidecarRefused(f"sidecar_offer_malformed: {bank}'s offer is not JSON ({str(exc)[:80]})") from None


def key_session(session_id: str, banks: list[str]) -> str:
    """The session string the offers are signed for: the aggregator's id bound to the world by rank, so
    banks given different worlds derive no common key."""
    world = hashlib.sha256("\n".join(banks).encode()).hexdigest()[:16]
    return f"{session_id}:w={world}"


class MaskingProxy:
    """One bank's rewriting of one collective session (no networking: ``forward`` reaches the server)."""

    def __init__(self, bank: str, rank: int, banks: list[str], forward: Forward,
                 max_bytes: int = fw.DEFAULT_MAX_BYTES, frac_bits: int = FRAC_BITS,
                 audit: Callable[[dict], None] = lambda record: None,
                 noise: Callable[[np.ndarray, int, int], np.ndarray] | None = None):
        if len(banks) < MIN_PARTIES:
            raise TooFewParties(f"too_few_parties: {len(banks)} < {MIN_PARTIES} banks in the session; with two, "
                                "the sum minus one's own reveals the other's vector")
        if len(set(banks)) != len(banks) or not 0 <= rank < len(banks) or banks[rank] != bank:
            raise SidecarRefused(f"sidecar_session: {bank} is not rank {rank} of {banks}")
        self.bank, self.rank, self.banks = bank, rank, list(banks)
        self.forward, self.max_bytes, self.frac_bits, self.audit = forward, max_bytes, frac_bits, audit
        self.noise = noise  # DP: (values, data_type, label) -> noised values, before masking (histogram_privacy)
        self.masker: PairwiseMasker | None = None
        self.seq_offset = 0  # key agreements so far: each took one upstream sequence number
        self.worker_next = 0  # the worker's next sequence number (a kept world numbers calls across rounds)
        self.broken: str | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ keys

    def use_pair_keys(self, pair_keys: Mapping[str, bytes]) -> None:
        """Keys agreed elsewhere: exactly one per peer of the session."""
        peers = sorted(set(self.banks) - {self.bank})
        if sorted(pair_keys) != peers:
            raise SidecarRefused(f"sidecar_keys: keys for {sorted(pair_keys)}, the session's peers are {peers}")
        self.masker = PairwiseMasker(self.bank, pair_keys)

    def agree_keys(self, session_id: str, identity, trust) -> None:
        """Offers through the server as call 0 (fixed-size slots), every peer's verified, one key per peer."""
        from fedfraud.secagg.keys import SessionKeys

        keys = SessionKeys.generate(self.bank, key_session(session_id, self.banks), identity)
        offer = json.dumps(keys.offer(), sort_keys=True, separators=(",", ":")).encode()
        if len(offer) > OFFER_SLOT_BYTES - 4:
            raise SidecarRefused(f"sidecar_offer_size: own offer of {len(offer)} bytes exceeds its slot")
        slot = len(offer).to_bytes(4, "big") + offer.ljust(OFFER_SLOT_BYTES - 4, b"\0")
        seq = self.worker_next + self.seq_offset  # 0 in a fresh world; between rounds in a kept one
        request = fw.Request("Allgather", seq, self.rank, slot)
        gathered = self._upstream(request, len(self.banks) * OFFER_SLOT_BYTES)
        offers = []
        for rank, bank in enumerate(self.banks):
            part = gathered[rank * OFFER_SLOT_BYTES:(rank + 1) * OFFER_SLOT_BYTES]
            length = int.from_bytes(part[:4], "big")
            if not 0 < length <= OFFER_SLOT_BYTES - 4 or part[4 + length:].strip(b"\0"):
                raise SidecarRefused(f"sidecar_offer_malformed: rank {rank}'s slot")
            parsed = _offer_json(part[4:4 + length], bank)
            if not isinstance(parsed, dict) or parsed.get("bank") != bank:
                raise SidecarRefused(f"sidecar_offer_malformed: rank {rank}'s offer is not {bank}'s")
            offers.append(parsed)
        self.masker = PairwiseMasker(self.bank, keys.pair_keys(offers, trust, self.banks))
        self.seq_offset += 1
        self.audit({"method": "Allgather", "seq": seq, "what": "key offers", "bytes": len(slot), "masked": False})

    def rekey(self, session_id: str, given: dict, identity, noise: dict | None = None) -> None:
        """A session's keys (piped in, or agreed with ``identity``) and its DP noise; held off the worker's calls."""
        with self._lock:  # between rounds of a kept world the worker waits for the keyed file anyway
            self.masker, self.noise = None, None
            if noise:  # differential privacy: this bank's noise on its gradient sums, before masking
                from bank_node.histogram_privacy import SumNoiser

                self.noise = SumNoiser.from_job(noise, given.get("noise_seed"))
            if "pair_keys" in given:  # keys agreed elsewhere
                self.use_pair_keys({peer: bytes.fromhex(key) for peer, key in given["pair_keys"].items()})
            elif identity is not None:
                self.agree_keys(session_id, *identity)
            else:
                raise SidecarRefused("secagg_no_identity: neither pair keys nor a certificate to agree them")

    # ------------------------------------------------------------------ calls

    def handle(self, method: str, data: bytes) -> bytes:
        """A worker's call in, the worker's reply out; any refusal breaks the session."""
        with self._lock:  # XGBoost issues one collective at a time; keep it that way
            if self.broken:
                raise SidecarRefused(f"sidecar_session_broken: after {self.broken}")
            try:
                return self._handle(method, data)
            except SecureAggregationError as exc:
                self.broken = str(exc)
                raise
            except Exception as exc:
                self.broken = f"{exc.__class__.__name__}: {exc}"
                raise

    def _handle(self, method: str, data: bytes) -> bytes:
        if self.masker is None:
            raise SidecarRefused("sidecar_no_keys: the session's pairwise keys are not agreed")
        request = fw.parse_request(method, data, self.max_bytes)
        if request.rank != self.rank:
            raise SidecarRefused(f"sidecar_wrong_rank: the worker claims rank {request.rank}, this bank is "
                                 f"rank {self.rank}")
        if request.sequence_number < self.worker_next:  # a repeated number would repeat a mask label
            raise SidecarRefused(f"sidecar_sequence_reused: call {request.sequence_number} after "
                                 f"{self.worker_next - 1}")
        self.worker_next = request.sequence_number + 1
        if method in ("Allgather", "AllgatherV"):
            raise SidecarRefused(f"sidecar_gather_refused: {request.describe()} would send this bank's buffer "
                                 "to every peer in the clear (a sketch?); cut points come from the shared edges")
        upstream = fw.Request(request.method, request.sequence_number + self.seq_offset, request.rank,
                              request.send_buffer, request.data_type, request.reduce_operation, request.root)
        if method == "Allreduce" and request.reduce_operation == fw.SUM:
            return fw.encode_reply(self._masked_sum(request, upstream))
        if method == "Broadcast" and request.root >= len(self.banks):
            raise SidecarRefused(f"sidecar_broadcast_root: root {request.root} outside {len(self.banks)} ranks")
        expected = {"Allreduce": len(request.send_buffer),
                    "Broadcast": len(request.send_buffer) if request.root == self.rank else None}[method]
        reply = self._upstream(upstream, expected)
        self.audit({"method": method, "seq": upstream.sequence_number, "op": fw.OPS[request.reduce_operation]
                    if method == "Allreduce" else None, "dtype": fw.DTYPE_NAMES[request.data_type]
                    if method == "Allreduce" else None, "bytes": len(request.send_buffer), "masked": False})
        return fw.encode_reply(reply)

    def _masked_sum(self, request: fw.Request, upstream: fw.Request) -> bytes:
        values = raw = request.values()
        if self.noise is not None:
            values = self.noise(raw, request.data_type, upstream.sequence_number)
        words = self._encode(values, request.data_type)
        masked = self.masker.mask(words, label=upstream.sequence_number)
        forwarded = fw.Request("Allreduce", upstream.sequence_number, self.rank, masked.astype("<u8").tobytes(),
                               fw.UINT64, fw.SUM)
        total = np.frombuffer(self._upstream(forwarded, 8 * words.size), dtype="<u8")
        record = {"method": "Allreduce", "seq": upstream.sequence_number, "op": "SUM",
                  "dtype": fw.DTYPE_NAMES[request.data_type], "values": int(values.size), "masked": True}
        if request.data_type in FLOATS and (beyond := inexact_sums(total)):
            record["beyond_exact"] = beyond  # float64 rounds these sums: see bank_node.exact_gradients
        self.audit(record if self.noise is None else {**record, "noised": values is not raw})
        return self._decode(total, request.data_type, raw.dtype).tobytes()

    def _encode(self, values: np.ndarray, data_type: int) -> np.ndarray:
        if data_type in FLOATS:
            return encode(values.astype(np.float64), self.frac_bits)
        if values.dtype.kind == "u" and values.size and int(values.max()) >= WORD_LIMIT:
            raise FixedPointOverflow(f"fixed_point_overflow: an unsigned value >= {WORD_LIMIT} could overflow the sum")
        wide = values.astype(np.int64)
        if wide.size and int(np.abs(wide).max()) >= WORD_LIMIT:
            raise FixedPointOverflow(f"fixed_point_overflow: |value| >= {WORD_LIMIT} could overflow the sum")
        return wide.view(np.uint64)

    def _decode(self, total: np.ndarray, data_type: int, dtype: np.dtype) -> np.ndarray:
        if data_type in FLOATS:
            out = decode(total, self.frac_bits).astype(dtype)
            if not np.all(np.isfinite(out)):
                raise FixedPointOverflow(f"fixed_point_overflow: the sum does not fit {dtype}")
            return out
        sums = total.view(np.int64)
        info = np.iinfo(dtype)
        if sums.size and (int(sums.min()) < info.min or int(sums.max()) > info.max):
            raise FixedPointOverflow(f"fixed_point_overflow: the sum does not fit {dtype}")
        return sums.astype(dtype)

    def _upstream(self, request: fw.Request, expected_bytes: int | None) -> bytes:
        reply = fw.parse_reply(request.method, self.forward(request.method, fw.encode_request(request)),
                               self.max_bytes)
        if expected_bytes is not None and len(reply) != expected_bytes:
            raise SidecarRefused(f"sidecar_reply_size: {request.describe()} answered with {len(reply)} bytes, "
                                 f"expected {expected_bytes}")
        return reply


# ---------------------------------------------------------------------------- the process

def inexact_sums(total: np.ndarray) -> int:
    """How many summed words float64 cannot hold exactly (|word| > 2**53, i.e. |sum| > 2**21 at 32 bits)."""
    return int(np.count_nonzero(np.abs(total.view(np.int64).astype(np.float64)) > 2.0 ** 53))


def _credentials(bank: str, given: dict):
    """(Identity, Trust) from the PEM text the bank's node piped in; the key must be the certificate's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fedfraud.secagg.keys import BANK_ROLE, Identity, KeyAgreementRefused, Trust, cert_identity

    certificate = x509.load_pem_x509_certificate(given["cert"].encode())
    key = serialization.load_pem_private_key(given["key"].encode(), password=None)
    if key.public_key().public_numbers() != certificate.public_key().public_numbers():
        raise KeyAgreementRefused("identity_key", f"{bank}'s key does not match its certificate")
    name, role = cert_identity(certificate)
    if role != BANK_ROLE or name != bank:
        raise KeyAgreementRefused("identity_name", f"the certificate is {role} {name!r}, not bank {bank!r}")
    banks = given.get("banks")
    trust = Trust(x509.load_pem_x509_certificate(given["ca"].encode()), None if banks is None else frozenset(banks))
    return Identity(name, certificate, key), trust


def _upstream_channel(address: str, tls: dict | None, max_bytes: int):
    import grpc

    options = [("grpc.max_send_message_length", max_bytes + 1024),
               ("grpc.max_receive_message_length", max_bytes + 1024),
               # the server may still be starting: retry every 0.1-0.5 s, not gRPC's backoff up to 2 min
               ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 500)]
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    from pathlib import Path

    credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls["server_ca"]).read_bytes(),
                                               private_key=Path(tls["client_key"]).read_bytes(),
                                               certificate_chain=Path(tls["client_cert"]).read_bytes())
    return grpc.secure_channel(address, credentials, options=options)


def _serve(proxy: MaskingProxy, max_bytes: int):
    """A gRPC server on 127.0.0.1 (a free port) answering the Federated service through ``proxy``."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    def handler(method: str):
        def call(data: bytes, context) -> bytes:
            try:
                return proxy.handle(method, data)
            except Exception as exc:  # the worker's call fails with the rule's name; the session is broken
                print(f"secagg sidecar refused {method}: {exc}", file=sys.stderr, flush=True)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)[:1000])
        return grpc.unary_unary_rpc_method_handler(call)

    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[
        ("grpc.max_send_message_length", max_bytes + 1024), ("grpc.max_receive_message_length", max_bytes + 1024),
        ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        fw.SERVICE, {method: handler(method) for method in fw.METHODS}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def run(job_path: str, stdin=None) -> None:
    """Agree keys (or read them from stdin), serve the worker, publish the address; until terminated.

    Kept for a world (``persistent``): the first stdin line is the bank's identity, then one line per round
    (its session, noise): fresh keys for each, published in ``keyed_file`` once agreed."""
    import time
    from pathlib import Path

    job = json.loads(Path(job_path).read_text())["sidecar"]
    persistent = bool(job.get("persistent"))
    deadline = [time.monotonic() + float(job["timeout_s"])]
    threading.Thread(target=watchdog, args=(lambda: deadline[0], int(job["parent_pid"]), "secagg sidecar"),
                     daemon=True).start()
    max_bytes = int(job["max_bytes"])
    channel = _upstream_channel(job["upstream"], job.get("tls"), max_bytes)
    stubs = {m: channel.unary_unary(f"/{fw.SERVICE}/{m}") for m in fw.METHODS}

    egress = Path(job["egress"]) if job.get("egress") else None
    wire = WireCount(job.get("wire"))  # the session's bytes both ways, reported with the bank's update

    def forward(method: str, data: bytes) -> bytes:
        if egress is not None:  # the bank's own record of every byte it sends its aggregator on this channel
            with open(egress, "a") as handle:
                handle.write(json.dumps({"method": method, "request": base64.b64encode(data).decode()}) + "\n")
        reply = stubs[method](data, timeout=max(1.0, deadline[0] - time.monotonic()), wait_for_ready=True)
        wire.add(len(data), len(reply))
        return reply

    audit_path = Path(job["audit"])

    def audit(record: dict) -> None:
        with open(audit_path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    proxy = MaskingProxy(job["bank"], int(job["rank"]), list(job["banks"]), forward, max_bytes,
                         int(job.get("frac_bits", FRAC_BITS)), audit)
    stdin = stdin or sys.stdin
    secrets_in = json.loads((stdin.readline() if persistent else stdin.read()) or "{}")
    identity = _credentials(job["bank"], secrets_in["credentials"]) if "credentials" in secrets_in else None
    if persistent:
        return _serve_world(job, proxy, secrets_in, identity, deadline, stdin, max_bytes, wire)
    ready = time.monotonic()
    wire.start(job["session_id"])
    proxy.rekey(job["session_id"], secrets_in, identity, job.get("privacy"))
    server, port = _serve(proxy, max_bytes)
    publish(Path(job["address_file"]), f"127.0.0.1:{port}")
    print(f"secagg sidecar for {job['bank']} (rank {job['rank']}/{len(job['banks'])}): 127.0.0.1:{port} -> "
          f"{job['upstream']}; keys in {time.monotonic() - ready:.2f}s (ready {ready - STARTED:.2f}s after launch)",
          flush=True)
    server.wait_for_termination()


def _serve_world(job: dict, proxy: MaskingProxy, secrets_in: dict, identity, deadline: list, stdin,
                 max_bytes: int, wire: WireCount) -> None:
    """A kept sidecar: serve the worker for the whole world, agreeing fresh keys for every round's session."""
    import time
    from pathlib import Path

    server, port = _serve(proxy, max_bytes)
    publish(Path(job["address_file"]), f"127.0.0.1:{port}")
    threading.Thread(target=server_watch, args=(job["upstream"], 3, 1.0, "secagg sidecar"), daemon=True).start()
    for line in stdin:  # one round per line; the node closing the pipe ends the world
        command = json.loads(line)
        deadline[0] = time.monotonic() + float(command["timeout_s"])
        started = time.monotonic()
        wire.start(command["session_id"])  # the round's bytes from its key agreement on
        proxy.rekey(command["session_id"], {**secrets_in, **command}, identity, command.get("noise"))
        publish(Path(job["keyed_file"]), command["session_id"])
        print(f"secagg sidecar for {job['bank']}: keys for {command['session_id']} in "
              f"{time.monotonic() - started:.2f}s", flush=True)
    server.stop(0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bank_node.secagg_sidecar JOB.json  (pair keys, if any, on stdin)", file=sys.stderr)
        raise SystemExit(2)
    try:
        run(argv[0])
    except BaseException:  # noqa: BLE001 - report by name, then leave at once
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main()
