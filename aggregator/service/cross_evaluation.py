"""Round 0 in the service: the masked planning counts, then cross-evaluation, with their exchanges as tasks.

After planning, a federation is ``counting``: a thread sums the banks' label counts masked
(``secure_planning.run_with``: key offers, then one masked counts answer per bank), then, when the
settings ask for it, is ``cross-evaluating`` (``crossval.run_with``: local models, then scoring every
model on each holdout), and sums the kept banks' counts again if cross-evaluation excluded any. Each bank
phase is posted as round-0 tasks and closed when every bank has answered or at the phase deadline. The
federation is then ``planned`` (without the banks left out, by name) or ``failed`` (quorum lost, a
masked sum that cannot be made). Rounds cannot open before that. It is re-runnable: after a restart it
runs again, tasks already answered stay answered (task ids are deterministic) and a finished masked
exchange is read back.
"""

from __future__ import annotations

import logging
import threading

from aggregator.protocol import crossval, secure_planning
from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.plan import Plan
from aggregator.protocol.state import Exchange

log = logging.getLogger("fedfraud.service")
COUNTING = "counting"
CROSS_EVALUATING = "cross-evaluating"
PREPARING = (COUNTING, CROSS_EVALUATING)  # round 0 runs; rounds wait


def start(coordinator, key: str) -> threading.Thread:
    thread = threading.Thread(target=run, args=(coordinator, key), daemon=True, name=f"fedfraud-crossval-{key}")
    coordinator.background.append(thread)
    thread.start()
    return thread


def run(coordinator, key: str) -> None:
    """Sum the planned federation ``key``'s label counts masked and cross-evaluate it; leave it planned or
    failed, by name."""
    c = coordinator
    with c.Session() as s:
        federation = c._federation(s, key)
    ws = c.workspace(federation)

    def ask(exchanges: list[Exchange]) -> None:
        with c.lock, c.Session.begin() as s:
            if c._stop.is_set():  # a stopping service posts no more tasks: its restart posts them
                raise RoundFailed("the service stopped during round 0")
            ids = [c._add_task(s, federation, 0, x.kind, x.bank, x.question, x.answer, x.part).id for x in exchanges]
        c.wait_for_tasks(ids, "no answer before the cross-evaluation deadline", min(1.0, c.config.tick_seconds))

    def enter(state: str) -> None:
        with c.lock, c.Session.begin() as s:
            c._federation(s, key).state = state

    try:
        plan = secure_planning.run_with(ws, Plan.from_dict(federation.plan), ask)
        if plan.settings.crossval:
            enter(CROSS_EVALUATING)
            plan = crossval.run_with(ws, plan, ask)
            plan = secure_planning.run_with(ws, plan, ask)  # the kept banks' sums (none excluded: as is)
        state, error, plan_dict = "planned", None, plan.to_dict()
    except Exception as exc:
        reason = str(exc) if isinstance(exc, RoundFailed) else f"{exc.__class__.__name__}: {exc}"
        log.warning("cross-evaluation of %s failed: %s", key, reason)
        state, error, plan_dict = "failed", f"round 0: {reason}", None
    if c._stop.is_set():
        return  # a stopping service leaves the federation in round 0: its restart runs it again
    with c.lock, c.Session.begin() as s:
        row = c._federation(s, key)
        row.state, row.error = state, error
        if plan_dict is not None:
            row.plan = plan_dict
