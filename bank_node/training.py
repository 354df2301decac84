"""Local training: K new XGBoost trees on the bank's rows, warm-started from the global model."""

from __future__ import annotations

import numpy as np
import xgboost as xgb

from fedfraud import model_json
from fedfraud.wire import CLEAR_COUNTS, ModelUpdate, TrainTask

BASE_PARAMS = {"objective": "binary:logistic", "tree_method": "hist", "eval_metric": "aucpr", "nthread": 2}


def dmatrix(X: np.ndarray, y: np.ndarray | None, feature_names: list[str]) -> xgb.DMatrix:
    return xgb.DMatrix(X, label=y, feature_names=feature_names, missing=np.nan)


def train_trees(task: TrainTask, X: np.ndarray, y: np.ndarray, feature_names: list[str], obj=None) -> xgb.Booster:
    """The global model (if any) plus ``task.num_trees`` trees fitted on (X, y); ``obj``: a custom objective."""
    base = model_json.to_booster(task.base_model) if task.base_model else None
    params = {**BASE_PARAMS, **task.params}
    if base is not None:
        params.pop("base_score", None)  # the global model fixes it for every bank
    return xgb.train(params, dmatrix(X, y, feature_names), num_boost_round=task.num_trees, xgb_model=base, obj=obj)


_SKLEARN_NAMES = {"eta": "learning_rate", "seed": "random_state"}


def train_trees_spark(
    task: TrainTask, train_rows, feature_names: list[str], label: str = "is_fraud", num_workers: int = 1
) -> xgb.Booster:
    """As ``train_trees``, on a Spark DataFrame, for banks whose rows do not fit one machine.

    Uses ``xgboost.spark.SparkXGBClassifier`` with the same parameters and warm start.
    """
    from xgboost.spark import SparkXGBClassifier

    params = {**BASE_PARAMS, **task.params}
    params.pop("objective")
    params.pop("nthread")  # Spark decides the threads per task
    if task.base_model:
        params.pop("base_score", None)
    params = {_SKLEARN_NAMES.get(k, k): v for k, v in params.items()}
    classifier = SparkXGBClassifier(
        features_col=list(feature_names),
        label_col=label,
        num_workers=num_workers,
        n_estimators=task.num_trees,
        missing=float("nan"),
        xgb_model=model_json.to_booster(task.base_model) if task.base_model else None,
        **params,
    )
    return classifier.fit(train_rows).get_booster()


def build_update(
    task: TrainTask, booster: xgb.Booster, counts: dict[str, int], metrics: dict[str, float],
    privacy_epsilon: float | None = None,
) -> ModelUpdate:
    """The update that leaves the bank: new trees only, training statistics scrubbed, metadata: its row
    counts (``CLEAR_COUNTS``; label counts never), and, when the bank trains privately, the ε it has spent."""
    base_rounds = model_json.to_booster(task.base_model).num_boosted_rounds() if task.base_model else 0
    trees = model_json.scrub_training_stats(model_json.new_trees_only(booster, base_rounds))
    return ModelUpdate(
        bank=task.bank,
        round_id=task.round_id,
        base_model_id=task.base_model_id,
        contract_hash=task.contract_hash,
        seed=int(task.params.get("seed", 0)),
        counts={key: counts[key] for key in CLEAR_COUNTS if key in counts},
        metrics=metrics,
        model=trees,
        privacy_epsilon=privacy_epsilon,
    )
