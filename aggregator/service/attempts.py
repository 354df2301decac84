"""A failed round opened again: its next *attempt*, with the banks still healthy, at most ``MAX_ROUND_ATTEMPTS``.

``open_round`` of a failed round calls ``reopen``. The next attempt runs with the failed attempt's banks
except those that are not healthy (``healthy_banks``): a bank whose agent has been silent for longer than
``liveness_seconds`` (the silence ``expire_silent_banks`` acts on; never heard from counts as silent), and a
bank that left a task of the failed attempt unanswered (expired at its deadline or for its silence) or said
it could not do it (failed). A task expired because the round failed names no bank; of a histogram round's
tasks (its workers all fail once one does) only a silent bank's, else the first failure reported. Banks rejected by a
check stay: the new attempt checks again. Below the round's quorum (``Plan.masking_quorum``: ``min_banks``, and
three for the masked sums every round ends with) the reopening is refused by name (``below_quorum``), as is
an attempt beyond the bound (``round_attempts_exhausted``); the round then stays failed.

Nothing of the failed attempt is lost: its row keeps it in ``earlier`` (banks, error, the banks left out of the
next attempt and why), its tasks and rejections keep their attempt number, and its files move to
``round-<r>.attempt-<k>`` beside the round's folder (its tasks' paths follow), so the new attempt starts
from an empty folder. Task ids include the attempt (``tasks.task_id``): no bank is handed an earlier
attempt's task, and an answer to one is refused as late.
"""

from __future__ import annotations

import time

from sqlalchemy import select

from aggregator.protocol.plan import Plan
from aggregator.protocol.workspace import Workspace
from aggregator.service import store
from aggregator.service.intake import Refused
from fedfraud.protocol import TaskKind
from fedfraud.secagg.masking import MIN_PARTIES

MAX_ROUND_ATTEMPTS = 3
ROUND_WIDE_EXPIRY = ("the round failed", "the collective round was aborted")  # name no bank


def healthy_banks(s, row: store.Round, plan: Plan, liveness_s: float, started_at: float) -> dict[str, str | None]:
    """Each bank of the failed attempt -> None when healthy, else why it is left out of the next attempt."""
    now = time.time()
    seen = {p.name: p.last_seen for p in s.scalars(select(store.Participant).where(
        store.Participant.name.in_(attempt_banks(row, plan.banks))))}
    verdicts: dict[str, str | None] = {}
    for bank in attempt_banks(row, plan.banks):
        last = seen.get(bank)
        silent = now - max(last, started_at) if last is not None else None  # the service's downtime is not silence
        verdicts[bank] = ("its agent was never heard from" if last is None else
                          f"its agent silent for {silent:.0f}s (liveness {liveness_s:.0f}s)" if silent > liveness_s
                          else None)
    ended = [task for task in s.scalars(select(store.Task).where(
        store.Task.federation == row.federation, store.Task.round_id == row.round_id,
        store.Task.attempt == row.attempt, store.Task.state.in_(("failed", "expired")))
        .order_by(store.Task.finished_at.is_(None), store.Task.finished_at, store.Task.created_at))
        if task.state == "failed" or task.detail not in ROUND_WIDE_EXPIRY]
    for task in _named_by_collective(ended):
        if verdicts.get(task.bank, "") is None:
            verdicts[task.bank] = f"its {task.kind} task {task.state} in attempt {row.attempt} ({task.detail})"
    return verdicts


def _named_by_collective(ended: list[store.Task]) -> list[store.Task]:
    """The tasks that name their bank. Histogram workers all fail once one does: of those, a bank silent or past
    its deadline is named, else only the first to report a failure."""
    histogram = [task for task in ended if task.kind == TaskKind.HISTOGRAM]
    named = [task for task in histogram if task.state == "expired"] or histogram[:1]
    return [task for task in ended if task.kind != TaskKind.HISTOGRAM] + named


def attempt_banks(row: store.Round, plan_banks: list[str]) -> list[str]:
    """The banks of the row's attempt: recorded when it reopened the round, else the plan's."""
    return list(row.banks) if row.banks is not None else list(plan_banks)


def reopen(s, row: store.Round, plan: Plan, ws: Workspace, liveness_s: float, started_at: float) -> list[str]:
    """Turn the failed ``row`` into its next attempt (the caller asks its banks); returns the attempt's banks."""
    where = f"round {row.round_id} of {row.federation}"
    if row.attempt >= MAX_ROUND_ATTEMPTS:
        raise Refused(409, "round_attempts_exhausted", f"{where} failed in each of its {row.attempt} attempts (at "
                      f"most {MAX_ROUND_ATTEMPTS}); the last: {row.error}")
    verdicts = healthy_banks(s, row, plan, liveness_s, started_at)
    banks = [b for b, why in verdicts.items() if why is None]
    left_out = {b: why for b, why in verdicts.items() if why is not None}
    if len(banks) < plan.masking_quorum:
        raise Refused(409, "below_quorum", f"{where}: {len(banks)} healthy bank(s) {banks} for attempt "
                      f"{row.attempt + 1}, a round needs {plan.masking_quorum} (min_banks {plan.settings.min_banks}, "
                      f"masked sums {MIN_PARTIES}); left out: {left_out}")
    for task in s.scalars(select(store.Task).where(  # none should be open; none may be handed out again
            store.Task.federation == row.federation, store.Task.round_id == row.round_id,
            store.Task.state.in_(store.OPEN_TASK_STATES))):
        task.state, task.detail = "expired", "the round failed"
    _set_aside(s, row, ws)
    row.earlier = [*(row.earlier or []), {"attempt": row.attempt, "banks": attempt_banks(row, plan.banks),
                                          "error": row.error, "failed_at": time.time(), "left_out": left_out}]
    row.attempt, row.banks, row.error, row.version = row.attempt + 1, banks, None, None
    return banks


def attempt_folder(ws: Workspace, round_id: int, attempt: int):
    return ws.root / f"round-{round_id}.attempt-{attempt}"


def _set_aside(s, row: store.Round, ws: Workspace) -> None:
    """The failed attempt's files to ``round-<r>.attempt-<k>``; its tasks' paths follow them."""
    current, kept = str(ws.round_dir(row.round_id)), attempt_folder(ws, row.round_id, row.attempt)
    if kept.exists():  # set aside by a reopening that did not complete: what is in the round's folder is its
        ws.clear_round(row.round_id)
    elif ws.round_dir(row.round_id).exists():
        ws.round_dir(row.round_id).rename(kept)
    for task in s.scalars(select(store.Task).where(store.Task.federation == row.federation,
                                                  store.Task.round_id == row.round_id,
                                                  store.Task.attempt == row.attempt)):
        for field in ("input_path", "result_path"):
            path = getattr(task, field)
            if path is not None and (path == current or path.startswith(current + "/")):
                setattr(task, field, str(kept) + path[len(current):])
