"""The masking sidecar as real processes in front of XGBoost's real federated server.

Tests here play the XGBoost workers with a bare gRPC client, so they need no training: exact
sums come back while the server sees only masked words, and each refusal (malformed message,
overflow, a wrong rank, two banks, a hostile server's reply) is named.
"""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import assert_masked

from aggregator.federated_server import FederatedServer
from bank_node.histogram_worker import SIDECAR_LAUNCH, _launch
from bank_node.secagg_sidecar import OFFER_SLOT_BYTES, MaskingProxy
from federated_recorder import Recorder, call
from fedfraud import pki
from fedfraud.secagg import federated_wire as fw
from fedfraud.secagg.masking import TooFewParties, decode, encode

BANKS = ["alpha", "beta", "gamma"]
DOUBLE, INT64, UINT64, SUM, MAX = 2, 7, 11, 2, 0


class Sidecar:
    """One bank's sidecar process (``bank_node.secagg_sidecar``), given its secrets on stdin."""

    def __init__(self, folder: Path, bank: str, banks: list[str], upstream: str, secrets_in: dict):
        folder.mkdir(parents=True, exist_ok=True)
        self.address_file, self.log = folder / "sidecar.address", folder / "sidecar.log"
        self.audit, self.wire, self.egress = folder / "collectives.jsonl", folder / "wire.json", folder / "egress.jsonl"
        job = {"sidecar": {"bank": bank, "rank": banks.index(bank), "banks": banks, "upstream": upstream,
                           "tls": None, "session_id": "test:r1:a1:0011", "address_file": str(self.address_file),
                           "audit": str(self.audit), "timeout_s": 300, "max_bytes": 1 << 20,
                           "wire": str(self.wire), "egress": str(self.egress),
                           "parent_pid": __import__("os").getpid()}}
        (folder / "job.json").write_text(json.dumps(job))
        self.process = _launch(SIDECAR_LAUNCH, folder / "job.json", self.log, json.dumps(secrets_in).encode())

    def address(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not self.address_file.exists():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "sidecar did not listen"
            time.sleep(0.05)
        return self.address_file.read_text()

    def counted(self) -> dict:
        """The sidecar's count for its session (``bank_node.collective_bytes``)."""
        return json.loads(self.wire.read_text())

    def egress_bytes(self) -> list[int]:
        """The size of every request it sent upstream, in order (its egress record)."""
        return [len(base64.b64decode(json.loads(line)["request"])) for line in self.egress.read_text().splitlines()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def pair_keys(banks: list[str], seed: int = 0) -> dict[str, dict[str, str]]:
    rng = np.random.default_rng(seed)
    shared = {(a, b): rng.bytes(32).hex() for a in banks for b in banks if a < b}
    return {me: {p: shared[min(me, p), max(me, p)] for p in banks if p != me} for me in banks}


def credentials(folder: Path, banks: list[str]) -> dict[str, dict]:
    """Each bank's consortium certificate, key and CA as the node pipes them to its sidecar."""
    folders = pki.provision("test", [pki.AGGREGATOR, *banks], folder)
    return {b: {"credentials": {"cert": (folders[b] / "cert.pem").read_text(),
                                "key": (folders[b] / "key.pem").read_text(),
                                "ca": (folders[b] / "ca.crt").read_text(), "banks": None}} for b in banks}


@pytest.fixture
def world(tmp_path):
    """A real federated server for three ranks, a recorder in front of it, and a way to start sidecars."""
    server = FederatedServer(3).start()
    recorder = Recorder(server.address)
    started: list[Sidecar] = []

    def sidecar(bank, banks=BANKS, secrets_in=None, upstream=None):
        started.append(Sidecar(tmp_path / f"{bank}-{len(started)}", bank, banks, upstream or recorder.address,
                               secrets_in if secrets_in is not None else {"pair_keys": pair_keys(banks)[bank]}))
        return started[-1]

    yield sidecar, recorder
    for s in started:
        s.stop()
    recorder.stop()
    server.stop()


def relayed(records) -> dict[str, int]:
    """The bytes of ``records`` as the server's side of the channel saw them: requests in, replies out."""
    return {"sent": sum(len(fw.encode_request(r.request)) for r in records),
            "received": sum(len(fw.encode_reply(r.reply)) for r in records)}


def allreduce(seq, rank, values, dtype, op=SUM):
    return fw.Request("Allreduce", seq, rank, np.ascontiguousarray(values).tobytes(), dtype, op)


def refusal(address: str, method: str, request) -> str:
    with pytest.raises(grpc.RpcError) as error:
        call(address, method, request)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    return error.value.details()


def test_three_sidecars_agree_keys_and_return_exact_sums_while_the_server_sees_random_words(world, tmp_path):
    sidecar, recorder = world
    given = credentials(tmp_path / "pki", BANKS)
    sidecars = [sidecar(b, secrets_in=given[b]) for b in BANKS]
    addresses = [s.address() for s in sidecars]
    rng = np.random.default_rng(3)
    doubles = [rng.normal(0, 1e3, 4096) for _ in BANKS]
    counts = [rng.integers(0, 1000, 4096) for _ in BANKS]

    def worker(rank):
        total = np.frombuffer(call(addresses[rank], "Allreduce", allreduce(0, rank, doubles[rank], DOUBLE)), "<f8")
        summed = np.frombuffer(call(addresses[rank], "Allreduce", allreduce(1, rank, counts[rank], INT64)), "<i8")
        largest = np.frombuffer(call(addresses[rank], "Allreduce", allreduce(2, rank, np.array([rank + 7], "<u8"),
                                                                             UINT64, MAX)), "<u8")
        return total, summed, largest

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(worker, range(3)))
    for total, summed, largest in results:
        assert np.allclose(total, sum(doubles), rtol=0, atol=3 * 2.0**-32)
        assert np.array_equal(total, decode(sum(encode(d) for d in doubles)))  # exactly the fixed-point sum
        assert np.array_equal(summed, sum(counts)) and largest.tolist() == [9]
    for rank in range(3):
        seen = recorder.by_rank(rank)
        assert [(r.method, r.request.sequence_number) for r in seen] == [
            ("Allgather", 0), ("Allreduce", 1), ("Allreduce", 2), ("Allreduce", 3)]
        assert len(seen[0].request.send_buffer) == OFFER_SLOT_BYTES  # public key offers, one slot each
        for record, plain in ((seen[1], encode(doubles[rank])), (seen[2], counts[rank])):
            assert (record.request.data_type, record.request.reduce_operation) == (UINT64, SUM)
            words = np.frombuffer(record.request.send_buffer, "<u8")
            assert_masked(words, np.asarray(plain).view(np.uint64))
        assert seen[3].request.send_buffer == np.array([rank + 7], "<u8").tobytes()  # MAX passes in the clear
        # every byte both ways is counted for the session, key agreement included: as its egress record and
        # the server's side show them
        counted = sidecars[rank].counted()
        assert counted == {"session": "test:r1:a1:0011", **relayed(seen)}
        assert counted["sent"] == sum(sidecars[rank].egress_bytes()) > OFFER_SLOT_BYTES + 2 * 8 * 4096
        assert counted["received"] > len(BANKS) * OFFER_SLOT_BYTES
    audit = [json.loads(line) for line in (tmp_path / "alpha-0" / "collectives.jsonl").read_text().splitlines()]
    assert [(a["method"], a["masked"]) for a in audit] == [
        ("Allgather", False), ("Allreduce", True), ("Allreduce", True), ("Allreduce", False)]


def test_malformed_messages_overflow_and_a_wrong_rank_are_refused_by_name_and_break_the_session(world):
    sidecar, recorder = world
    alpha, beta, gamma, beta_again, beta_third, gamma_again = (
        sidecar(b).address() for b in [*BANKS, "beta", "beta", "gamma"])
    good = fw.encode_request(allreduce(0, 0, np.ones(4), DOUBLE))
    assert "federated_unknown_field" in refusal(alpha, "Allreduce", good + b"\x48\x01")  # field 9, varint
    assert "sidecar_session_broken" in refusal(alpha, "Allreduce", good)  # nothing more from this session
    truncated = fw.encode_request(allreduce(0, 1, np.ones(3), DOUBLE))[:-5]
    assert "federated_malformed" in refusal(beta, "Allreduce", truncated)
    assert "sidecar_wrong_rank" in refusal(gamma, "Allreduce", allreduce(0, 0, np.ones(2), DOUBLE))
    # 2**25 at 32 fractional bits: the sum of 64 parties could overflow int64
    assert "fixed_point_overflow" in refusal(beta_again, "Allreduce", allreduce(0, 1, np.array([1.0, 1e8]), DOUBLE))
    assert "fixed_point_overflow" in refusal(beta_third, "Allreduce", allreduce(0, 1, np.array([np.nan]), DOUBLE))
    sketch = fw.Request("AllgatherV", 0, 2, np.ones(8, "<f4").tobytes())
    assert "sidecar_gather_refused" in refusal(gamma_again, "AllgatherV", sketch)
    assert recorder.records == []  # nothing refused ever reached the server


def test_a_sidecar_refuses_a_session_of_two_banks():
    with pytest.raises(TooFewParties, match="too_few_parties"):
        MaskingProxy("alpha", 0, ["alpha", "beta"], forward=lambda method, data: b"")


def test_a_sidecar_process_for_two_banks_exits_naming_the_rule(world):
    sidecar, recorder = world
    two = sidecar("alpha", banks=["alpha", "beta"])
    assert two.process.wait(120) == 1
    assert "too_few_parties" in two.log.read_text() and not two.address_file.exists()


def test_a_hostile_server_reply_of_the_wrong_size_is_refused(tmp_path):
    with FederatedServer(3) as server:
        hostile = Recorder(server.address, tamper=lambda method, request, reply: reply + b"\0" * 8)
        sidecars = [Sidecar(tmp_path / b, b, BANKS, hostile.address, {"pair_keys": pair_keys(BANKS)[b]}) for b in BANKS]
        try:
            addresses = [s.address() for s in sidecars]
            with ThreadPoolExecutor(3) as pool:
                details = list(pool.map(
                    lambda r: refusal(addresses[r], "Allreduce", allreduce(0, r, np.ones(5), DOUBLE)), range(3)))
            assert all("sidecar_reply_size" in d and "answered with 48 bytes, expected 40" in d for d in details)
        finally:
            for s in sidecars:
                s.stop()
            hostile.stop()


class KeptSidecar(Sidecar):
    """A sidecar kept for a world: the identity on its first stdin line, then one re-key line per round."""

    def __init__(self, folder: Path, bank: str, banks: list[str], upstream: str, secrets_in: dict):
        folder.mkdir(parents=True, exist_ok=True)
        self.address_file, self.log = folder / "sidecar.address", folder / "sidecar.log"
        self.keyed = folder / "sidecar.keyed"
        self.audit, self.wire, self.egress = folder / "collectives.jsonl", folder / "wire.json", folder / "egress.jsonl"
        job = {"sidecar": {"bank": bank, "rank": banks.index(bank), "banks": banks, "upstream": upstream,
                           "tls": None, "session_id": "", "address_file": str(self.address_file),
                           "audit": str(self.audit), "timeout_s": 300, "max_bytes": 1 << 20, "persistent": True,
                           "keyed_file": str(self.keyed), "wire": str(self.wire), "egress": str(self.egress),
                           "parent_pid": __import__("os").getpid()}}
        (folder / "job.json").write_text(json.dumps(job))
        self.process = _launch(SIDECAR_LAUNCH, folder / "job.json", self.log,
                               json.dumps(secrets_in).encode() + b"\n", keep_stdin=True)

    def rekey(self, session_id: str) -> None:
        self.process.stdin.write(json.dumps({"session_id": session_id, "timeout_s": 300}).encode() + b"\n")
        self.process.stdin.flush()

    def wait_keyed(self, session_id: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not (self.keyed.exists() and self.keyed.read_text() == session_id):
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "sidecar did not agree keys"
            time.sleep(0.02)


def test_a_kept_sidecar_agrees_fresh_keys_every_round_between_the_workers_calls(world, tmp_path):
    _, recorder = world
    given = credentials(tmp_path / "pki", BANKS)
    kept = [KeptSidecar(tmp_path / f"kept-{b}", b, BANKS, recorder.address, given[b]) for b in BANKS]
    try:
        addresses = [s.address() for s in kept]
        values = [np.full(512, 10.0 * (rank + 1)) for rank in range(3)]
        counted = {}  # per round, each bank's count for the round's session
        for round_no, session in enumerate(("test:w1:r1:a1:aa", "test:w1:r2:a2:bb")):
            for s in kept:
                s.rekey(session)
            for s in kept:
                s.wait_keyed(session)
            with ThreadPoolExecutor(3) as pool:  # the workers' calls go on numbering across rounds
                totals = list(pool.map(lambda rank, seq=round_no: np.frombuffer(call(
                    addresses[rank], "Allreduce", allreduce(seq, rank, values[rank], DOUBLE)), "<f8"), range(3)))
            assert all(np.array_equal(t, np.full(512, 60.0)) for t in totals)
            counted[session] = [s.counted() for s in kept]
        for rank in range(3):
            seen = recorder.by_rank(rank)
            assert [(r.method, r.request.sequence_number) for r in seen] == [
                ("Allgather", 0), ("Allreduce", 1), ("Allgather", 2), ("Allreduce", 3)]
            assert seen[0].request.send_buffer != seen[2].request.send_buffer, "a fresh key offer each round"
            assert seen[1].request.send_buffer != seen[3].request.send_buffer, "the same vector, other masks"
            # each round's bytes (its key agreement and its calls) are that round's session's, none before
            sent = kept[rank].egress_bytes()
            for at, session in enumerate(("test:w1:r1:a1:aa", "test:w1:r2:a2:bb")):
                assert counted[session][rank] == {"session": session, **relayed(seen[2 * at:2 * at + 2])}
                assert counted[session][rank]["sent"] == sum(sent[2 * at:2 * at + 2])
        assert "sidecar_sequence_reused" in refusal(addresses[0], "Allreduce", allreduce(1, 0, values[0], DOUBLE))
    finally:
        for s in kept:
            s.stop()
