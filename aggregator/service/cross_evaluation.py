"""Cross-evaluation in the service: ``aggregator.protocol.crossval`` with its exchanges as tasks.

After planning, a federation whose settings ask for it is ``cross-evaluating``: a thread runs
``crossval.run_with``, each of its two bank phases (local models, then scoring every model on each
holdout) posted as round-0 tasks and closed when every bank has answered or at the phase deadline.
The federation is then ``planned`` (without the banks it excluded, by name) or ``failed`` (quorum
lost). Rounds cannot open before that. It is re-runnable: after a restart it runs again, and
tasks already answered stay answered (task ids are deterministic).
"""

from __future__ import annotations

import logging
import threading

from aggregator.protocol import crossval
from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.plan import Plan
from aggregator.protocol.state import Exchange

log = logging.getLogger("fedfraud.service")
CROSS_EVALUATING = "cross-evaluating"


def start(coordinator, key: str) -> threading.Thread:
    thread = threading.Thread(target=run, args=(coordinator, key), daemon=True, name=f"fedfraud-crossval-{key}")
    coordinator.background.append(thread)
    thread.start()
    return thread


def run(coordinator, key: str) -> None:
    """Cross-evaluate the planned federation ``key``; leave it planned or failed, by name."""
    c = coordinator
    with c.Session() as s:
        federation = c._federation(s, key)
    ws = c.workspace(federation)

    def ask(exchanges: list[Exchange]) -> None:
        with c.lock, c.Session.begin() as s:
            if c._stop.is_set():  # a stopping service posts no more tasks: its restart posts them
                raise RoundFailed("the service stopped during the cross-evaluation")
            ids = [c._add_task(s, federation, 0, x.kind, x.bank, x.question, x.answer, x.part).id for x in exchanges]
        c.wait_for_tasks(ids, "no answer before the cross-evaluation deadline", min(1.0, c.config.tick_seconds))

    try:
        plan = crossval.run_with(ws, Plan.from_dict(federation.plan), ask)
        state, error, plan_dict = "planned", None, plan.to_dict()
    except Exception as exc:
        reason = str(exc) if isinstance(exc, RoundFailed) else f"{exc.__class__.__name__}: {exc}"
        log.warning("cross-evaluation of %s failed: %s", key, reason)
        state, error, plan_dict = "failed", f"cross-evaluation: {reason}", None
    if c._stop.is_set():
        return  # a stopping service leaves the federation cross-evaluating: its restart runs it again
    with c.lock, c.Session.begin() as s:
        row = c._federation(s, key)
        row.state, row.error = state, error
        if plan_dict is not None:
            row.plan = plan_dict
