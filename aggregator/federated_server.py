"""XGBoost's federated server, in its own process, started and stopped for every round.

``xgboost.federated.run_federated_server`` blocks. It never returns on its own once the workers
are done, and it listens on 0.0.0.0. So it runs here as a child process
(``python -m aggregator.federated_server``), and ``FederatedServer`` always ends it by its
pid: when the round succeeds, fails or times out, and when the caller is interrupted. A server kept for
several rounds (``aggregator.strategies.histogram``'s kept worlds) is ended the same way when the world
ends; and the server exits by itself when the process that started it is gone (killed, say), so it never
outlives its aggregator.

TLS: pass ``ServerTLS``. The server then demands a client certificate signed by
``client_ca`` (the consortium CA) and presents ``server_cert``. The banks' side is
``bank_node.histogram_worker.ClientTLS``. Without TLS the server is plain gRPC. That is meant for embedded runs on
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# As ``python -m aggregator.federated_server``, minus xgboost's optional scikit-learn import (~2 s).
LAUNCH = "import sys; sys.modules.setdefault('sklearn', None); from aggregator.federated_server import main; main()"


class ServerFailed(RuntimeError):
    """The federated server could not be started."""


@dataclass(frozen=True)
class ServerTLS:
    server_key: str
    server_cert: str
    client_ca: str  # verifies the banks' client certificates (xgboost calls it client_cert_path)

    @classmethod
    def from_env(cls) -> "ServerTLS | None":
        """``FEDFRAUD_FEDERATED_SERVER_KEY`` / ``_SERVER_CERT`` / ``_CLIENT_CA``, or None if unset."""
        names = ("FEDFRAUD_FEDERATED_SERVER_KEY", "FEDFRAUD_FEDERATED_SERVER_CERT", "FEDFRAUD_FEDERATED_CLIENT_CA")
        values = [os.environ.get(name) for name in names]
        if not any(values):
            return None
        if not all(values):
            raise ServerFailed(f"set all of {', '.join(names)} or none")
        return cls(*values)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class FederatedServer:
    """``with FederatedServer(n) as server:`` -> ``server.address``; the process is always ended."""

    def __init__(self, n_workers: int, tls: ServerTLS | None = None, timeout_s: float = 1800.0,
                 startup_timeout_s: float = 60.0, host: str = LOOPBACK, attempts: int = 3):
        if n_workers < 1:
            raise ValueError("a federated server needs at least one worker")
        self.n_workers, self.tls, self.timeout_s = n_workers, tls, timeout_s
        self.startup_timeout_s, self.host, self.attempts = startup_timeout_s, host, attempts
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"{self.host}:{self.port}"

    def start(self) -> "FederatedServer":
        """Launch and wait until it listens; a port taken meanwhile is retried with another one."""
        errors = []
        for _ in range(self.attempts):  # a free port can be taken between probing and binding it
            try:
                self.launch()
                self.wait_ready()
                return self
            except ServerFailed as exc:
                errors.append(str(exc))
                self.stop()
        raise ServerFailed("; ".join(errors))

    def launch(self) -> "FederatedServer":
        """Start the process on a free port without waiting: ``address`` is known at once, so
        workers can start alongside (they wait for the server to listen)."""
        if self.process is not None:
            raise RuntimeError("server already launched")
        port = free_port(self.host)
        self._log = tempfile.TemporaryFile(prefix="fedfraud-federated-server-")
        command = [sys.executable, "-c", LAUNCH, "--workers", str(self.n_workers),
                   "--port", str(port), "--timeout", str(int(self.timeout_s)), "--parent-pid", str(os.getpid())]
        if self.tls:
            command += ["--server-key", self.tls.server_key, "--server-cert", self.tls.server_cert,
                        "--client-ca", self.tls.client_ca]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                                        os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.port = port
        return self

    def wait_ready(self) -> None:
        """Block (bounded) until the server accepts connections; ServerFailed if it exits or times out."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            process = self.process
            if process is None:
                raise ServerFailed("federated server was stopped")
            if process.poll() is not None:
                raise ServerFailed(f"federated server exited with {process.returncode}: {self.log_tail()}")
            if _accepts(self.host, self.port):
                return
            time.sleep(0.05)
        raise ServerFailed(f"federated server did not listen on {self.address} "
                           f"within {self.startup_timeout_s:.0f}s: {self.log_tail()}")

    def log_tail(self, limit: int = 2000) -> str:
        if self._log is None or self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-limit:].strip()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate the server process (then kill it); idempotent."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "FederatedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _exit_with_parent(parent: int, period_s: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(period_s)
    print(f"federated server: parent {parent} is gone, exiting", flush=True)
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run XGBoost's federated server until terminated.")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--server-key")
    parser.add_argument("--server-cert")
    parser.add_argument("--client-ca")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the aggregator) is gone")
    args = parser.parse_args(argv)
    if args.parent_pid:
        import threading

        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    from xgboost.federated import run_federated_server

    run_federated_server(args.workers, args.port, server_key_path=args.server_key,
                         server_cert_path=args.server_cert, client_cert_path=args.client_ca, timeout=args.timeout)


if __name__ == "__main__":
    main()
