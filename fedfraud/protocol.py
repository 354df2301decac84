"""Names both sides of a federation agree on: task kinds, strategy names, MLflow tag keys.

Banks, the aggregator service, the Airflow drivers and the registry all spell these the same
way; they are defined here once (``aggregator.protocol`` holds the round's phases).
"""

from __future__ import annotations


class TaskKind:
    """What the aggregator may ask of a bank; each is one call of the bank's node."""

    SUMMARY = "summary"
    TRAIN = "train"
    EVALUATE = "evaluate"
    EVALUATE_CHAMPION = "evaluate_champion"
    BIN_COUNTS = "bin_counts"
    HISTOGRAM = "histogram"
    ALL = (SUMMARY, TRAIN, EVALUATE, EVALUATE_CHAMPION, BIN_COUNTS, HISTOGRAM)
    UPDATES = (TRAIN, HISTOGRAM)  # answered with a model update
    EVALUATIONS = (EVALUATE, EVALUATE_CHAMPION)  # answered with an evaluation report


class StrategyName:
    BAGGING = "bagging"
    CYCLIC = "cyclic"
    HISTOGRAM = "histogram"
    FEDERATED = (BAGGING, CYCLIC, HISTOGRAM)
    LOCAL = "local"  # baseline: each bank alone
    CENTRALIZED = "centralized"  # benchmark only: pools raw rows
    CHOICES = (*FEDERATED, LOCAL, CENTRALIZED)


class Tag:
    """MLflow tag keys on runs and model versions."""

    FEDERATION_ID = "fedfraud.federation_id"
    RUN_KIND = "fedfraud.run_kind"  # "federation" | "round"
    ROUND = "fedfraud.round"
    ROUND_KEY = "fedfraud.round_key"
    RUN_ID = "fedfraud.run_id"
    STRATEGY = "fedfraud.strategy"
    EXCLUDED_BANKS = "fedfraud.excluded_banks"
    PARTICIPATING_BANKS = "fedfraud.participating_banks"
    REJECTED_BANKS = "fedfraud.rejected_banks"
    FEATURE_CONTRACT_HASH = "fedfraud.feature_contract_hash"
    DATA_WINDOWS = "fedfraud.data_windows"
    PARAMS = "fedfraud.params"
    POOLED_AUPRC = "fedfraud.pooled_auprc"
    PROMOTION = "fedfraud.promotion"
    PROMOTION_DETAIL = "fedfraud.promotion_detail"
    BENCHMARK_ONLY = "fedfraud.benchmark_only"
