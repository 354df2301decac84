"""A bank's scheduled feature build: validation gate + point-in-time features for each bank,
then an update of the ``fedfraud_bank_features`` Asset that the round DAG can be scheduled on.

Only orchestration here: each task calls ``aggregator.drivers.airflow_embedded`` (embedded mode).
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, task

BANK_FEATURES = Asset("fedfraud_bank_features")
RETRY_DELAY = timedelta(seconds=int(os.environ.get("FEDFRAUD_RETRY_DELAY_SECONDS", "60")))


@dag(
    dag_id="bank_features",
    schedule=os.environ.get("FEDFRAUD_FEATURES_SCHEDULE", "@daily"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=6),
    tags=["fedfraud", "bank"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": RETRY_DELAY, "execution_timeout": timedelta(hours=2)},
    params={
        "banks": Param({}, type="object", description="{bank: raw data path}; empty: $FEDFRAUD_BANKS"),
        "model_name": Param("fedfraud", type="string"),
        "work_dir": Param("", type="string", description="empty: $FEDFRAUD_WORK_DIR or work/airflow"),
    },
)
def bank_features():
    @task
    def banks(params=None) -> list[str]:
        from aggregator.drivers.airflow_spec import RunSpec

        return sorted(RunSpec.from_params(dict(params)).banks)

    @task(map_index_template="{{ bank }}", outlets=[BANK_FEATURES])
    def build(bank: str, params=None) -> str:
        from aggregator.drivers.airflow_embedded import EmbeddedTasks
        from aggregator.drivers.airflow_spec import RunSpec

        return EmbeddedTasks(RunSpec.from_params(dict(params))).prepare_bank(bank)

    build.expand(bank=banks())


bank_features()
