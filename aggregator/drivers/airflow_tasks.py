"""What each task of the Airflow DAGs calls: one object per run, for where the bank work runs.

``tasks_for(params, run_id)`` gives ``EmbeddedTasks`` (a bank's task runs that bank's node in the
Airflow worker, on its own data path and work folder) or ``NetworkedTasks`` (the aggregator
service and the banks' agents do the work; each task asks the service to act or waits, bounded,
for that bank's answer or the round's verdict). Both have the same methods, one per DAG task:
``prepare_bank``, ``open_federation``, ``open_round``, ``train_bank``, ``check_round``, ``accept_bank``,
``aggregate_round``,
``evaluate_bank``, ``finish_round``.
"""

from __future__ import annotations

from typing import Any

from aggregator.drivers.airflow_embedded import EmbeddedTasks
from aggregator.drivers.airflow_networked import NetworkedTasks
from aggregator.drivers.airflow_spec import RunSpec

__all__ = ["EmbeddedTasks", "NetworkedTasks", "RunSpec", "tasks_for"]


def tasks_for(params: dict[str, Any], run_id: str | None = None) -> EmbeddedTasks | NetworkedTasks:
    """The task bodies for this run: its params resolved, in its mode."""
    spec = RunSpec.from_params(dict(params), run_id)
    return NetworkedTasks(spec) if spec.mode == "networked" else EmbeddedTasks(spec)
