"""Drivers, named for where they run; each moves messages and calls ``aggregator.protocol``.

* ``embedded`` — in process: the CLI, the demo and the benches, banks as ``BankNode`` objects;
* ``airflow_tasks`` — what the DAGs call: ``airflow_embedded`` (bank work in the Airflow worker)
  or ``airflow_networked`` (the tasks ask the aggregator service and watch it);
* the service's coordinator (``aggregator.service``) drives rounds over SQL for networked banks.

Only drivers may hold a bank's node and the aggregator in one process.
"""
