"""Batch scoring of new transactions with the current ``champion``: validation gate, features
over the whole input, one score per input row (quarantined rows get a null score).

Only orchestration here: the task calls ``bank_node.scoring.score_transactions``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

RETRY_DELAY = timedelta(seconds=int(os.environ.get("FEDFRAUD_RETRY_DELAY_SECONDS", "60")))


@dag(
    dag_id="score_transactions",
    schedule=os.environ.get("FEDFRAUD_SCORING_SCHEDULE", "@hourly"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=2),
    tags=["fedfraud", "scoring"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": RETRY_DELAY, "execution_timeout": timedelta(hours=1)},
    params={
        "model": Param("models:/fedfraud@champion", type="string"),
        "input": Param("", type="string", description="raw transactions to score (Parquet or CSV)"),
        "output": Param("", type="string", description="Parquet file for transaction_id, score"),
        "work_dir": Param("", type="string", description="empty: $FEDFRAUD_WORK_DIR or work/airflow"),
    },
)
def score_transactions():
    @task(multiple_outputs=False)  # one XCom: the counts and where the scores went
    def score(params=None, run_id=None) -> dict:
        from pathlib import Path

        from aggregator.tracking import default_tracking_uri
        from bank_node.scoring import score_transactions as score_
        from pipelines.config import load_config
        from pipelines.spark import get_spark

        if not params["input"]:
            raise ValueError("set the 'input' param: the transactions to score")
        work_dir = Path(params["work_dir"] or os.environ.get("FEDFRAUD_WORK_DIR", "work/airflow"))
        output = params["output"] or str(work_dir / "scores" / f"{run_id.replace(':', '_')}.parquet")
        counts = score_(get_spark("fedfraud-score"), params["model"], params["input"], output, load_config(),
                        default_tracking_uri(work_dir))
        return {**counts, "output": output}

    score()


score_transactions()
