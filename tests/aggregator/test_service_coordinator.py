"""The service's state machine on a real sqlite database, without HTTP: who may answer what, once."""

from __future__ import annotations

import json
import time

import pytest
from conftest import SERVICE_BANKS as BANKS, bank_summary as summary, federation_request as request, make_coordinator
from conftest import settle_counts

from aggregator.service import store
from aggregator.service.intake import Refused

def refused(call, *args) -> tuple[int, str]:
    with pytest.raises(Refused) as exc:
        call(*args)
    return exc.value.status, exc.value.check


def test_a_task_is_answered_once_by_its_own_bank_with_a_well_formed_message(tmp_path):
    c = make_coordinator(tmp_path)
    c.start_federation("f1", request())
    task = c.next_task("alpha")
    assert task["kind"] == "summary" and task["round"] == 0
    assert refused(c.accept_result, "beta", task["id"], summary("beta")) == (403, "wrong_sender")
    assert refused(c.accept_result, "alpha", task["id"], summary("beta")) == (403, "wrong_sender")
    assert refused(c.accept_result, "alpha", task["id"], summary("alpha")[:40]) == (400, "malformed")
    assert refused(c.accept_result, "alpha", task["id"], b" " * 70_000) == (413, "too_large")
    assert c.accept_result("alpha", task["id"], summary("alpha"))["state"] == "done"
    assert refused(c.accept_result, "alpha", task["id"], summary("alpha")) == (409, "duplicate")
    assert c.next_task("alpha") is None
    assert c.federation_status("f1")["summaries"]["alpha"] == {"summary": "done"}


def test_the_plan_names_every_bank_left_out_and_a_late_summary_is_refused(tmp_path):
    c = make_coordinator(tmp_path)
    c.start_federation("f1", request(min_banks=2))
    tasks = {bank: c.next_task(bank)["id"] for bank in BANKS}
    c.accept_result("alpha", tasks["alpha"], summary("alpha"))
    c.accept_failure("beta", tasks["beta"], "BankDeclined: fraud rate out of band")
    status = c.plan_federation("f1")
    assert status["state"] == "failed"
    assert "quorum is 2" in status["error"] and "beta" in status["error"] and "gamma" in status["error"]
    assert refused(c.accept_result, "gamma", tasks["gamma"], summary("gamma")) == (409, "late")
    assert refused(c.open_round, "f1", 1) == (409, "not_planned")


def test_federations_are_idempotent_and_only_for_members(tmp_path):
    c = make_coordinator(tmp_path)
    assert c.start_federation("f1", request()) == c.start_federation("f1", request())
    assert refused(c.start_federation, "f1", request(rounds=3)) == (409, "conflict")
    assert refused(c.start_federation, "f2", request(banks=["alpha", "zurich"])) == (422, "unknown_bank")


def test_a_planned_bagging_round_hands_out_training_tasks_in_order(tmp_path):
    c = make_coordinator(tmp_path)
    c.start_federation("f1", request(crossval=False))
    for bank in BANKS:
        c.accept_result(bank, c.next_task(bank)["id"], summary(bank))
    assert c.plan_federation("f1")["state"] == "counting"  # round 0: the masked planning counts
    assert refused(c.open_round, "f1", 1) == (409, "not_planned")
    assert settle_counts(c, "f1", tmp_path)["banks"] == list(BANKS)
    assert refused(c.open_round, "f1", 2) == (409, "previous_round")
    status = c.open_round("f1", 1)
    assert status["state"] == "training" and {b: t["train"] for b, t in status["tasks"].items()} == dict.fromkeys(
        BANKS, "pending")
    task = c.next_task("gamma")
    assert task["kind"] == "train" and json.loads(c.task_input("gamma", task["id"]))["bank"] == "gamma"
    assert refused(c.task_input, "alpha", task["id"]) == (403, "wrong_sender")
    assert c.open_round("f1", 1)["tasks"]["gamma"]["train"] == "fetched"  # opening again changes nothing


def test_a_bank_that_falls_silent_loses_its_open_tasks_before_the_deadline(tmp_path):
    c = make_coordinator(tmp_path, liveness_seconds=0.3)
    c.start_federation("f1", request())
    for bank in ("alpha", "beta"):  # gamma has never been heard from: left to the deadline
        c.seen(bank)
    taken = c.next_task("alpha")["id"]
    c.tick()
    assert c.federation_status("f1")["summaries"]["alpha"] == {"summary": "pending"}  # not silent yet
    time.sleep(0.5)
    c.seen("beta")  # beta keeps beating (a working agent does, every few seconds)
    c.tick()
    summaries = c.federation_status("f1")["summaries"]
    assert summaries == {"alpha": {"summary": "expired"}, "beta": {"summary": "pending"},
                         "gamma": {"summary": "pending"}}
    with c.Session() as s:
        assert s.get(store.Task, taken).detail.startswith("alpha silent for ")
    assert refused(c.accept_result, "alpha", taken, summary("alpha")) == (409, "late")


def test_the_services_own_downtime_is_not_a_banks_silence(tmp_path):
    c = make_coordinator(tmp_path, liveness_seconds=0.3)
    c.start_federation("f1", request())
    c.seen("alpha")
    c.stop()
    time.sleep(0.5)  # down for longer than the liveness window
    c = make_coordinator(tmp_path, liveness_seconds=0.3)
    c.tick()
    assert c.federation_status("f1")["summaries"]["alpha"] == {"summary": "pending"}
    time.sleep(0.5)  # and now alpha has been silent for that long since the restart
    c.tick()
    assert c.federation_status("f1")["summaries"]["alpha"] == {"summary": "expired"}


def test_a_collective_round_in_flight_fails_by_name_when_the_service_restarts(tmp_path):
    c = make_coordinator(tmp_path)
    c.start_federation("f1", request(strategy="histogram"))
    with c.Session.begin() as s:
        s.add(store.Round(federation="f1", round_id=1, collective=True, deadline=0.0))
    c.stop()
    status = make_coordinator(tmp_path).round_status("f1", 1)
    assert status["state"] == "failed" and "restarted" in status["error"]


def test_waiting_for_tasks_ends_when_each_is_answered_or_expired_at_its_own_deadline(tmp_path):
    from aggregator.protocol.errors import RoundFailed

    c = make_coordinator(tmp_path, deadline_seconds=0.6)
    c.start_federation("f1", request())
    ids = {bank: c.next_task(bank)["id"] for bank in BANKS}
    c.accept_result("alpha", ids["alpha"], summary("alpha"))
    c.accept_failure("beta", ids["beta"], "BankDeclined: not today")
    c.wait_for_tasks(list(ids.values()), "no answer in time", poll_s=0.05)  # gamma's deadline ends the wait
    with c.Session() as s:
        states = {bank: (s.get(store.Task, tid).state, s.get(store.Task, tid).detail) for bank, tid in ids.items()}
    assert states == {"alpha": ("done", None), "beta": ("failed", "BankDeclined: not today"),
                      "gamma": ("expired", "no answer in time")}
    c.start_federation("f2", request())
    c.stop()
    with pytest.raises(RoundFailed, match="stopped"):
        c.wait_for_tasks([c.next_task("alpha")["id"]], "never", poll_s=0.05)


def test_every_round_state_fits_the_state_column():
    """Postgres enforces the column's length (sqlite does not): a bank phase's state longer than it fails
    the round in the deployed stack only (``exchanging_acceptance_keys`` did)."""
    from aggregator.protocol.phases import BANK_PHASES

    states = {p.state for p in BANK_PHASES} | {"registered", "failed", "training", "planned"}
    limit = store.Round.__table__.c.state.type.length
    assert all(len(state) <= limit for state in states), sorted(s for s in states if len(s) > limit)
    assert len({p.state for p in BANK_PHASES}) == len(BANK_PHASES)  # the service maps a state to its phase


FIVE = ("alpha", "beta", "gamma", "delta", "epsilon")


def fail(c, key: str, round_id: int, reason: str) -> None:
    """Fail the round the way a phase does: its step raises; the coordinator records why."""
    from aggregator.protocol.errors import RoundFailed

    def step(federation, r):
        raise RoundFailed(reason)

    c._in_round(key, round_id, step)


def test_a_failed_round_opens_again_as_its_next_attempt_with_the_healthy_banks_at_most_three_times(tmp_path):
    from aggregator.service.attempts import MAX_ROUND_ATTEMPTS

    c = make_coordinator(tmp_path, banks=FIVE, liveness_seconds=0.5)
    c.start_federation("f1", request(banks=list(FIVE), crossval=False))
    for bank in FIVE:
        c.accept_result(bank, c.next_task(bank)["id"], summary(bank))
    c.plan_federation("f1")
    assert settle_counts(c, "f1", tmp_path, banks=FIVE)["state"] == "planned"
    first = c.open_round("f1", 1)
    assert (first["attempt"], first["banks"]) == (1, sorted(FIVE))
    old = {bank: c.next_task(bank)["id"] for bank in FIVE}
    c.accept_failure("delta", old["delta"], "BankDeclined: not today")
    for bank in FIVE:
        c.seen(bank)
    time.sleep(0.6)
    for bank in ("alpha", "beta", "delta", "epsilon"):  # gamma's agent fell silent
        c.seen(bank)
    fail(c, "f1", 1, "round 1: collective training failed (gamma's worker exited)")
    assert refused(c.open_round, "f1", 2)[1] == "previous_round"

    second = c.open_round("f1", 1)
    assert (second["state"], second["attempt"], second["banks"]) == ("training", 2, ["alpha", "beta", "epsilon"])
    assert c.open_round("f1", 1)["attempt"] == 2  # opening a running attempt again changes nothing
    earlier = second["earlier_attempts"][0]
    assert earlier["error"].startswith("round 1: collective training failed") and earlier["banks"] == sorted(FIVE)
    assert earlier["tasks"]["delta"] == {"train": "failed"} and earlier["tasks"]["alpha"] == {"train": "expired"}
    assert set(earlier["left_out"]) == {"gamma", "delta"} and "silent" in earlier["left_out"]["gamma"]
    assert {b: t["train"] for b, t in second["tasks"].items()} == dict.fromkeys(["alpha", "beta", "epsilon"],
                                                                                 "pending")
    new = {bank: (c.next_task(bank) or {}).get("id") for bank in FIVE}
    assert new["gamma"] is None and new["delta"] is None  # left out: nothing handed to them
    assert all(new[b] != old[b] for b in ("alpha", "beta", "epsilon"))
    assert refused(c.accept_result, "alpha", old["alpha"], b"{}") == (409, "late")
    workspace = tmp_path / "agg" / "runs" / "f1" / "federations" / "m"
    assert (workspace / "round-1.attempt-1" / "tasks" / "gamma.json").exists()  # attempt 1's files, kept aside
    assert sorted(p.stem for p in (workspace / "round-1" / "tasks").glob("*.json")) == ["alpha", "beta", "epsilon"]
    with c.Session() as s:
        assert s.get(store.Task, old["alpha"]).input_path.startswith(str(workspace / "round-1.attempt-1"))

    fail(c, "f1", 1, "round 1: attempt 2 failed")
    time.sleep(0.6)
    for bank in ("alpha", "beta"):  # epsilon silent: two left, the masked sums need three
        c.seen(bank)
    assert refused(c.open_round, "f1", 1) == (409, "below_quorum")
    assert c.round_status("f1", 1)["state"] == "failed"
    c.seen("epsilon")
    third = c.open_round("f1", 1)
    assert (third["attempt"], third["banks"]) == (3, ["alpha", "beta", "epsilon"])
    assert len({c.next_task("alpha")["id"], new["alpha"], old["alpha"]}) == 3
    fail(c, "f1", 1, "round 1: attempt 3 failed")
    assert MAX_ROUND_ATTEMPTS == 3 and refused(c.open_round, "f1", 1) == (409, "round_attempts_exhausted")
    status = c.round_status("f1", 1)
    assert (status["state"], status["attempt"], len(status["earlier_attempts"])) == ("failed", 3, 2)


def test_a_database_from_before_round_attempts_gets_their_columns(tmp_path):
    from sqlalchemy import text

    engine, _ = store.open_database(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as connection:
        for table, column in (("rounds", "attempt"), ("rounds", "earlier"), ("tasks", "attempt")):
            connection.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
    engine.dispose()
    engine, _ = store.open_database(f"sqlite:///{tmp_path / 'old.db'}")
    assert store.add_missing_columns(engine) == []  # added when opened
    with engine.begin() as connection:
        assert {row[1] for row in connection.execute(text("PRAGMA table_info(rounds)"))} >= {"attempt", "earlier"}


def test_of_a_histogram_rounds_tasks_a_silent_bank_is_named_else_only_the_first_failure_reported():
    """Every histogram worker fails once one does: the others' failure reports name no bank."""
    from aggregator.service.attempts import _named_by_collective

    def task(bank: str, kind: str, state: str, detail: str = "") -> store.Task:
        return store.Task(id=f"{bank}-{kind}", bank=bank, kind=kind, state=state, detail=detail)

    first, second = task("alpha", "histogram", "failed"), task("beta", "histogram", "failed")
    silent, declined = task("gamma", "histogram", "expired", "gamma silent for 12s"), task("delta", "train", "failed")
    assert _named_by_collective([first, second, silent, declined]) == [declined, silent]
    assert _named_by_collective([first, second]) == [first]
