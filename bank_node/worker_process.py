"""The bank's training processes for histogram rounds: start the worker (and its masking sidecar), wait for
its update within a deadline, kill both when the round is aborted; failures named with the logs' tails.

``WorkerProcess``: one round, then the processes exit (``bank_node.kept_worker`` keeps them for a world)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# ``python -m bank_node.histogram_worker JOB`` works too; this skips xgboost's optional import of
# scikit-learn (~2 s of a round on a busy machine), which training does not use.
LAUNCH = "import sys; sys.modules.setdefault('sklearn', None); from bank_node.histogram_worker import main; main()"
SIDECAR_LAUNCH = "from bank_node.secagg_sidecar import main; main()"


class WorkerFailed(RuntimeError):
    """The bank's training process failed, timed out or was aborted."""


def _launch(code: str, job: Path, log: Path, stdin_bytes: bytes | None = None, keep_stdin: bool = False
            ) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-c", code, str(job)],
                                   stdin=subprocess.PIPE if stdin_bytes is not None or keep_stdin
                                   else subprocess.DEVNULL,
                                   stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    if stdin_bytes is not None:  # keys travel by pipe, never through a file
        process.stdin.write(stdin_bytes)
        if keep_stdin:
            process.stdin.flush()
        else:
            process.stdin.close()
    return process


def _tail(path: Path, limit: int) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


class WorkerProcess:
    """One running worker (and its sidecar): ``result()`` waits (bounded) for its update, ``kill()`` aborts."""

    def __init__(self, job: Path, log: Path, out: Path, timeout_s: float, sidecar_log: Path | None = None,
                 sidecar_stdin: bytes = b"{}"):
        self.out, self.log, self.timeout_s, self.sidecar_log = out, log, timeout_s, sidecar_log
        # the sidecar first: it agrees keys while the worker loads its rows
        self.sidecar = _launch(SIDECAR_LAUNCH, job, sidecar_log, sidecar_stdin) if sidecar_log else None
        self.process = _launch(LAUNCH, job, log)
        self.aborted = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        self.aborted = True
        for process in (self.process, self.sidecar):
            if process is not None and process.poll() is None:
                process.kill()

    def result(self) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        try:
            while self.process.poll() is None:
                if self.sidecar is not None and self.sidecar.poll() is not None:
                    self.kill()
                    raise self._sidecar_failed()
                if time.monotonic() > deadline:
                    self.kill()
                    raise WorkerFailed(f"no result within {self.timeout_s:.0f}s; killed. {self.log_tail()}")
                time.sleep(0.05)
            if self.process.returncode != 0 and self._sidecar_crashed():
                raise self._sidecar_failed()  # the worker only lost its channel: name the cause
        finally:
            self._stop_sidecar()
        code = self.process.returncode
        if code != 0 or not self.out.exists():
            reason = "aborted" if self.aborted else f"exited with {code}"
            raise WorkerFailed(f"training process {reason}. {self.log_tail()}")
        return self.out.read_bytes()

    def _sidecar_crashed(self) -> bool:
        """The sidecar died on its own (a kill closes its sockets a moment before it can be reaped)."""
        try:
            return self.sidecar is not None and self.sidecar.wait(1) != 0
        except subprocess.TimeoutExpired:
            return False

    def _sidecar_failed(self) -> WorkerFailed:
        return WorkerFailed(f"secagg sidecar exited with {self.sidecar.returncode}; worker killed. {self.log_tail()}")

    def _stop_sidecar(self) -> None:
        if self.sidecar is not None and self.sidecar.poll() is None:
            self.sidecar.terminate()
            try:
                self.sidecar.wait(5)
            except subprocess.TimeoutExpired:
                self.sidecar.kill()
                self.sidecar.wait(5)
        self.process.wait()

    def log_tail(self, limit: int = 1500) -> str:
        worker = _tail(self.log, limit)
        if self.sidecar_log is None:
            return worker
        return f"{worker} | sidecar: {_tail(self.sidecar_log, limit)}"
