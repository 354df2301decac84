"""Memory of a bench process and its children, read from ``/proc`` (Linux).

``VmHWM`` is a process's peak resident set size as the kernel counts it; ``VmRSS`` its current
one. ``TreeSampler`` polls the process tree of this process in a thread: the peak of the summed
RSS of all descendants (histogram workers, masking sidecars, Spark's JVM), how many ran at once,
and each descendant's last-seen ``VmHWM`` by command (``java`` for Spark's driver JVM).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

PROC = Path("/proc")


def status_kb(pid: int | str, key: str) -> int:
    """``key`` (``VmHWM``, ``VmRSS``) of ``pid`` in KiB; 0 when the process is gone."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def own_mib(key: str = "VmHWM") -> float:
    return status_kb("self", key) / 1024


def _parents() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command)} of every process visible now."""
    out = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        command, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        out[int(entry.name)] = (int(rest[1]), command)
    return out


def descendants(root: int) -> dict[int, str]:
    """{pid: command} of every descendant of ``root``."""
    table = _parents()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, command) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = command
                frontier.append(pid)
    return found


class TreeSampler:
    """Context manager: peak summed RSS of this process's descendants, polled every ``interval`` s."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_children_mib = 0.0
        self.peak_children = 0
        self.hwm_by_command: dict[str, float] = {}  # max VmHWM (MiB) of any descendant with this command
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        children = descendants(os.getpid())
        total = 0
        for pid, command in children.items():
            total += status_kb(pid, "VmRSS")
            hwm = status_kb(pid, "VmHWM") / 1024
            self.hwm_by_command[command] = max(self.hwm_by_command.get(command, 0.0), hwm)
        self.peak_children_mib = max(self.peak_children_mib, total / 1024)
        self.peak_children = max(self.peak_children, len(children))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def as_dict(self) -> dict:
        return {"children_peak_rss_mib": round(self.peak_children_mib, 1), "children_peak_count": self.peak_children,
                "children_peak_hwm_mib_by_command": {k: round(v, 1) for k, v in sorted(self.hwm_by_command.items())}}
