"""The round protocol in one place: the typed plan, the workspace the phases meet in, and the
phases of a federation and of a round, declared once in order (``phases.ROUND``).

Drivers (``aggregator.drivers`` in-process and for Airflow, ``aggregator.service`` over SQL)
move messages and call these phases; none re-implements a step. This ``__init__`` imports
nothing, so a strategy can import ``aggregator.protocol.errors`` without a cycle.
"""
