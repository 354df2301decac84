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
    LOCAL_MODEL = "local_model"  # cross-evaluation: the bank's model from its rows alone (a bank may refuse)
    CROSSVAL = "crossval"  # cross-evaluation: score every bank's local model on this bank's holdout
    ACCEPT = "accept"  # acceptance: score a stage's candidate with and without each bank's update
    KEYS = "keys"  # secure aggregation: a signed ephemeral key offer for one session (``fedfraud.secagg.keys``)
    COUNTS = "counts"  # planning: the bank's label counts as pairwise-masked words (``wire.MaskedCounts``)
    REFIT = "refit"  # compaction's leaf refit: per-leaf loss sums as pairwise-masked words (``wire.MaskedRefitSums``)
    ALL = (SUMMARY, TRAIN, EVALUATE, EVALUATE_CHAMPION, BIN_COUNTS, HISTOGRAM, LOCAL_MODEL, CROSSVAL, ACCEPT, KEYS,
           COUNTS, REFIT)
    UPDATES = (TRAIN, HISTOGRAM, LOCAL_MODEL)  # answered with a model update
    EVALUATIONS = (EVALUATE, EVALUATE_CHAMPION)  # answered with a masked evaluation (``wire.MaskedEvaluation``)
    SCORES = (CROSSVAL, ACCEPT)  # answered with a score answer (``fedfraud.crosscheck``)


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
    PROMOTION_REASON = "fedfraud.promotion_reason"  # why a version stayed challenger (or became champion)
    BEST_LOCAL_AUPRC = "fedfraud.best_local_auprc"  # the champion gate: best single-bank model, pooled
    BENCHMARK_ONLY = "fedfraud.benchmark_only"
    EVALUATED_BY = "fedfraud.evaluated_by"  # the banks whose masked histograms make the pooled figures
    METRICS_SHARED_BY = "fedfraud.metrics_shared_by"  # the banks that chose to share per-bank metrics
