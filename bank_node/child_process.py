"""What the bank's child processes (histogram worker, masking sidecar) share: they end themselves when their
deadline passes, their bank's node or the federated server is gone, and hand files over atomically."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_WATCHDOG = 3


def watchdog(deadline: float | Callable[[], float], parent: int, what: str = "histogram worker") -> None:
    """Exit the process at ``deadline`` (a time, or a function giving the current one: a kept process moves it
    every round) or when its parent (the bank's node) is gone."""
    import time

    while True:
        if time.monotonic() > (deadline() if callable(deadline) else deadline):
            print(f"{what}: deadline passed, exiting", file=sys.stderr, flush=True)
            os._exit(EXIT_WATCHDOG)
        if os.getppid() != parent:
            print(f"{what}: parent gone, exiting", file=sys.stderr, flush=True)
            os._exit(EXIT_WATCHDOG)
        time.sleep(0.5)


def server_watch(address: str, misses: int = 3, period_s: float = 1.0, what: str = "histogram worker") -> None:
    """Exit the (kept) process when the federated server stops listening: the world is over."""
    import socket
    import time

    host, port = address.rsplit(":", 1)
    missed = 0
    while True:
        time.sleep(period_s)
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                missed = 0
        except OSError:
            missed += 1
            if missed >= misses:
                print(f"{what}: the federated server at {address} is gone, exiting", file=sys.stderr, flush=True)
                os._exit(0)


def publish(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a reader polls for the file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
