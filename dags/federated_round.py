"""Federated rounds on a schedule: prepare banks, then per round train, check, accept (every bank
scores the candidate with and without each update), aggregate, evaluate at every bank, register
and promote.

One mapped task per bank (labelled with the bank). A failed or timed-out bank does not sink a
round while the quorum (``min_banks``) holds; below it the run fails, nothing is registered and
``champion`` stays. Retries and re-runs register no second version. ``mode`` picks where the
work runs: ``embedded`` (in the worker, on the bank's data path) or ``networked`` (the tasks ask
the aggregator service to start, plan and open rounds, and wait, bounded, for each bank's
answer through its agent; default from ``$FEDFRAUD_MODE``). Cyclic and histogram
rounds train inside ``check`` (in turn / all banks together; acceptance runs there per turn). This file only
orchestrates: every task calls ``aggregator.drivers.airflow_tasks``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, TaskGroup, dag, task

MAX_ROUNDS = int(os.environ.get("FEDFRAUD_MAX_ROUNDS", "5"))  # round task groups unrolled per run
RETRY_DELAY = timedelta(seconds=int(os.environ.get("FEDFRAUD_RETRY_DELAY_SECONDS", "60")))
TASK_TIMEOUT = timedelta(minutes=int(os.environ.get("FEDFRAUD_TASK_TIMEOUT_MINUTES", "60")))


def _tasks(params, run_id=None):
    from aggregator.drivers.airflow_tasks import tasks_for

    return tasks_for(params, run_id)


def _fail_cleanly(call):
    """Below quorum is a verdict, not a glitch: fail at once, without retries."""
    from airflow.exceptions import AirflowFailException

    from aggregator.protocol.errors import RoundFailed

    try:
        return call()
    except RoundFailed as exc:
        raise AirflowFailException(str(exc)) from exc


@dag(
    dag_id="federated_round",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=12),
    tags=["fedfraud", "federation"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": RETRY_DELAY, "execution_timeout": TASK_TIMEOUT},
    params={
        "banks": Param({}, type="object", description="{bank: raw data path}; empty: Variable/env FEDFRAUD_BANKS"),
        "model_name": Param("fedfraud", type="string"),
        "strategy": Param("bagging", enum=["bagging", "cyclic", "histogram"]),
        "rounds": Param(3, type="integer", minimum=1, maximum=MAX_ROUNDS),
        "min_banks": Param(2, type="integer", minimum=1, description="quorum of accepted updates per round"),
        "trees_per_round": Param(20, type="integer", minimum=1),
        "seed": Param(0, type="integer"),
        "mode": Param(os.environ.get("FEDFRAUD_MODE", "embedded"), enum=["embedded", "networked"],
                      description="networked: the aggregator service and the banks' agents do the work"),
        "wait_seconds": Param(1800, type="integer", minimum=1, description="networked: how long to wait per bank"),
        "crossval": Param(True, type="boolean", description="cross-evaluate the banks' local models before round 1"),
        "champion_gate": Param(True, type="boolean",
                               description="a first champion must beat the best single-bank local model"),
        "acceptance_delta": Param("auto", type=["string", "number", "null"],
                                  description="the acceptance gate's allowed drop: auto, a number in [0, 1), "
                                              "or null (measure contributions only)"),
        "compaction": Param(False, type="boolean", description="bagging: drop trees the banks' holdouts do not need"),
        "options": Param({}, type="object",
                         description="any other federation option by name (README 'Federation options'), e.g. "
                                     "{\"acceptance_masked\": false, \"compaction_tolerance\": 0.004}"),
        "work_dir": Param("", type="string", description="empty: $FEDFRAUD_WORK_DIR or work/airflow"),
    },
)
def federated_round():
    @task
    def banks(params=None) -> list[str]:
        from airflow.sdk import Variable

        if not params.get("banks"):
            params = {**params, "banks": Variable.get("fedfraud_banks", default=None, deserialize_json=True) or {}}
        from aggregator.drivers.airflow_spec import RunSpec

        return sorted(RunSpec.from_params(dict(params)).banks)

    @task(map_index_template="{{ bank }}")
    def prepare(bank: str, params=None, run_id=None) -> str:
        return _tasks(params, run_id).prepare_bank(bank)

    @task(trigger_rule="all_done")
    def open_federation(prepared, params=None, run_id=None) -> list[str]:
        list(prepared)  # the banks whose preparation succeeded left their summaries
        return _fail_cleanly(lambda: _tasks(params, run_id).open_federation())

    @task(map_index_template="{{ bank }}")
    def train(round_id: int, bank: str, params=None, run_id=None) -> str:
        return _tasks(params, run_id).train_bank(round_id, bank)

    @task(map_index_template="{{ bank }}")
    def accept(round_id: int, bank: str, params=None, run_id=None) -> str:
        return _tasks(params, run_id).accept_bank(round_id, bank)

    @task(map_index_template="{{ bank }}")
    def evaluate(round_id: int, bank: str, params=None, run_id=None) -> str:
        return _tasks(params, run_id).evaluate_bank(round_id, bank)

    previous = open_federation(prepare.expand(bank=banks()))
    for round_id in range(1, MAX_ROUNDS + 1):
        with TaskGroup(group_id=f"round_{round_id}"):

            @task.short_circuit(task_id="wanted")
            def wanted(r: int = round_id, params=None) -> bool:
                return r <= int(params["rounds"])

            @task(task_id="open")
            def open_round(r: int = round_id, params=None, run_id=None) -> list[str]:
                return _fail_cleanly(lambda: _tasks(params, run_id).open_round(r))

            @task(task_id="check", trigger_rule="all_done")
            def check(trained, r: int = round_id, params=None, run_id=None) -> list[str]:
                list(trained)
                return _fail_cleanly(lambda: _tasks(params, run_id).check_round(r))

            @task(task_id="aggregate", trigger_rule="all_done")
            def aggregate(accepted, r: int = round_id, params=None, run_id=None) -> list[str]:
                list(accepted)
                return _fail_cleanly(lambda: _tasks(params, run_id).aggregate_round(r))

            @task(task_id="register_and_promote", trigger_rule="all_done")
            def finish(evaluated, r: int = round_id, params=None, run_id=None) -> str:
                list(evaluated)
                return _fail_cleanly(lambda: _tasks(params, run_id).finish_round(r))

            gate = wanted()
            previous >> gate
            opened = open_round()
            gate >> opened
            checked = check(train.partial(round_id=round_id).expand(bank=opened))
            aggregated = aggregate(accept.partial(round_id=round_id).expand(bank=checked))
            previous = finish(evaluate.partial(round_id=round_id).expand(bank=aggregated))


federated_round()
