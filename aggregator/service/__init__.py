"""The aggregator as a networked service: HTTPS with mutual TLS, state in a SQL database.

``config`` (what the operator sets), ``store`` (the tables), ``coordinator`` (federations and
rounds as state machines over ``aggregator.protocol``), ``app`` (the HTTP API and who may call
what) and ``client`` (the callers: bank agents and Airflow).
"""
