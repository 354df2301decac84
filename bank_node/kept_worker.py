"""A bank's histogram worker and masking sidecar kept for a whole *world* (one federated server, the same
banks, several rounds): ``persistent_round`` starts them at the world's round 0 and sends every round to
them, ``stop_live_workers`` ends them (the embedded driver's shutdown hook).

Each round is one command line on the worker's stdin and, with masking, one re-key line on the sidecar's
(fresh keys every round, the round's own session). XGBoost's server numbers every call of a world, so a
round of a world is sent only to the worker that trained exactly the world's earlier rounds; any other
bank refuses at once (``histogram_worker_lost``). Any failure kills both processes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bank_node.worker_process import LAUNCH, SIDECAR_LAUNCH, WorkerFailed, _launch, _tail
from fedfraud.histogram_session import HistogramSession


class PersistentWorker:
    """A bank's worker (and sidecar) for a whole world: ``start_round`` sends one round, ``result`` waits
    (bounded) for its update. ``world`` is what the processes were started for (reuse only for the same)."""

    def __init__(self, job: Path, log: Path, sidecar_log: Path | None, sidecar_secrets: bytes, world: tuple):
        self.log, self.sidecar_log, self.world = log, sidecar_log, world
        self.sidecar = (_launch(SIDECAR_LAUNCH, job, sidecar_log, sidecar_secrets.rstrip(b"\n") + b"\n",
                                keep_stdin=True) if sidecar_log else None)
        self.process = _launch(LAUNCH, job, log, keep_stdin=True)
        self.rounds_done = 0  # rounds this world's processes have trained (every bank of the world agrees)
        self.aborted = False
        self.out: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        sidecar_alive = self.sidecar is None or self.sidecar.poll() is None
        return not self.aborted and self.process.poll() is None and sidecar_alive

    def start_round(self, command: dict, sidecar_command: dict | None, out: Path) -> None:
        """The sidecar's re-key first (it agrees the round's keys while the worker prepares), then the worker's."""
        import json

        self.out = out
        try:
            if self.sidecar is not None:
                self.sidecar.stdin.write(json.dumps(sidecar_command).encode() + b"\n")
                self.sidecar.stdin.flush()
            self.process.stdin.write(json.dumps(command).encode() + b"\n")
            self.process.stdin.flush()
        except OSError as exc:  # a process that died between rounds
            self.kill()
            raise WorkerFailed(f"the bank's persistent worker is gone ({exc}). {self.log_tail()}") from None

    def result(self, timeout_s: float) -> bytes:
        """The round's update; on any failure (or the deadline) both processes are killed."""
        deadline = time.monotonic() + timeout_s
        out = self.out
        while not out.exists():
            if self.process.poll() is not None:
                reason = "aborted" if self.aborted else f"exited with {self.process.returncode}"
                self.kill()
                raise WorkerFailed(f"training process {reason}. {self.log_tail()}")
            if self.sidecar is not None and self.sidecar.poll() is not None:
                self.kill()
                raise WorkerFailed(f"secagg sidecar exited with {self.sidecar.returncode}; worker killed. "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise WorkerFailed(f"no result within {timeout_s:.0f}s; killed. {self.log_tail()}")
            time.sleep(0.01)
        self.rounds_done += 1
        return out.read_bytes()

    def kill(self) -> None:
        self.aborted = True
        for process in (self.process, self.sidecar):
            if process is not None:
                if process.poll() is None:
                    process.kill()
                process.wait()
                if process.stdin is not None:
                    try:
                        process.stdin.close()
                    except OSError:
                        pass

    def log_tail(self, limit: int = 1500) -> str:
        worker = _tail(self.log, limit)
        if self.sidecar_log is None:
            return worker
        return f"{worker} | sidecar: {_tail(self.sidecar_log, limit)}"


class RoundOfPersistent:
    """One round on a ``PersistentWorker``, shaped like ``WorkerProcess`` (result, kill, pid, sidecar)."""

    def __init__(self, worker: PersistentWorker, timeout_s: float):
        self.worker, self.timeout_s = worker, timeout_s

    @property
    def pid(self) -> int:
        return self.worker.pid

    @property
    def sidecar(self):
        return self.worker.sidecar

    def result(self) -> bytes:
        return self.worker.result(self.timeout_s)

    def kill(self) -> None:
        self.worker.kill()

    def log_tail(self, limit: int = 1500) -> str:
        return self.worker.log_tail(limit)


_LIVE: dict[str, PersistentWorker] = {}  # work folder -> this process's kept worker for one world


def persistent_round(folder: Path, paths: dict, job: dict, session: HistogramSession, task_bytes: bytes,
                      bins_digest: str, secrets_in: bytes, private, pair_keys) -> RoundOfPersistent:
    """The round on this bank's kept worker for the session's world: started fresh at the world's round 0,
    else the live one, which must have trained exactly ``world_round`` rounds of it."""
    world = (session.world_id, session.bank, session.rank, session.world_size, tuple(session.banks),
             session.server_address, session.tls, session.secagg, session.nthread, bins_digest, job["x"])
    key = str(folder)
    live = _LIVE.get(key)
    if live is not None and (session.world_round == 0 or live.world != world or not live.alive()):
        _LIVE.pop(key, None)
        live.kill()
        live = None
    if session.world_round and (live is None or live.rounds_done != session.world_round):
        found = "none" if live is None else f"one that trained {live.rounds_done}"
        raise WorkerFailed(f"histogram_worker_lost: round {session.world_round} of world {session.world_id} needs "
                           f"this bank's worker of that world after {session.world_round} rounds; found {found}")
    if live is None:
        job["persistent"] = True
        if session.secagg:
            job["sidecar"]["persistent"] = True
            job["sidecar"]["keyed_file"] = str(folder / "sidecar.keyed")
            (folder / "sidecar.keyed").unlink(missing_ok=True)
        paths["job.json"].write_text(json.dumps(job))
        live = PersistentWorker(paths["job.json"], paths["worker.log"],
                                paths["sidecar.log"] if session.secagg else None, secrets_in, world)
        _LIVE[key] = live
    n = session.world_round
    task_path, out = folder / f"task-w{n}.json", folder / f"update-w{n}.json"
    for stale in folder.glob("update-w*.json"):
        stale.unlink(missing_ok=True)
    task_path.write_bytes(task_bytes)
    command = {"task": str(task_path), "out": str(out), "round_id": session.round_id, "timeout_s": session.timeout_s,
               "secagg_session": session.secagg_session, "privacy": private and private.worker_job()}
    rekey = None
    if session.secagg:
        rekey = {"session_id": session.secagg_session, "timeout_s": session.timeout_s,
                 "noise": private and private.noise.to_dict(), **(private.secrets() if private is not None else {})}
        if pair_keys is not None:
            rekey["pair_keys"] = {peer: k.hex() for peer, k in pair_keys.items()}
    live.start_round(command, rekey, out)
    return RoundOfPersistent(live, session.timeout_s + 30.0)


def stop_live_workers() -> None:
    """End every kept worker (and sidecar) of this process: the federation is over."""
    while _LIVE:
        _, live = _LIVE.popitem()
        live.kill()
