"""Local training: K new XGBoost trees on the bank's rows, warm-started from the global model.

The rows reach XGBoost in batches (``RowBatches``, from ``dataset.row_batches``) as a ``QuantileDMatrix``:
quantized, no float copy of the matrix; the model is the one a ``DMatrix`` of the same rows gives
(same cuts, same trees: tests/bank_node/test_training_batches.py). A warm start passes the global
model's margin on the raw rows as ``base_margin`` (predicting it on the quantized matrix would not).
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import xgboost as xgb

from bank_node.dataset import BATCH_ROWS, row_batches
from bank_node.free_memory import release_free_memory
from fedfraud import model_json
from fedfraud.wire import CLEAR_COUNTS, ModelUpdate, TrainTask

# Above this many training rows a bank's node trains from pages on disk (``ExtMemQuantileDMatrix``): the
# in-memory QuantileDMatrix of rows with missing values keeps 4 bytes a value (~1.4 GB at 8M rows x 44).
EXTERNAL_MEMORY_ROWS = 2_000_000
BASE_PARAMS = {"objective": "binary:logistic", "tree_method": "hist", "eval_metric": "aucpr", "nthread": 2}


def dmatrix(X: np.ndarray, y: np.ndarray | None, feature_names: list[str]) -> xgb.DMatrix:
    return xgb.DMatrix(X, label=y, feature_names=feature_names, missing=np.nan)


class RowBatches(xgb.DataIter):
    """(X, y, margin) for XGBoost in consecutive row batches (``row_batches``): every row once, in order."""

    def __init__(self, X: np.ndarray, y: np.ndarray, feature_names: list[str], margin: np.ndarray | None = None,
                 batch_rows: int = BATCH_ROWS, cache_prefix: str | None = None):
        if len(y) != len(X) or (margin is not None and len(margin) != len(X)):
            raise ValueError(f"{len(X)} rows but {len(y)} labels and {None if margin is None else len(margin)} margins")
        self._X, self._y, self._names, self._margin, self._batch_rows = X, y, feature_names, margin, batch_rows
        self.reset()
        super().__init__(cache_prefix=cache_prefix)

    def reset(self) -> None:
        self._batches, self._start = row_batches(self._X, self._batch_rows), 0

    def next(self, input_data) -> bool:
        batch = next(self._batches, None)
        if batch is None:
            return False
        rows = slice(self._start, self._start + len(batch))
        input_data(data=batch, label=self._y[rows], feature_names=self._names,
                   base_margin=None if self._margin is None else self._margin[rows])
        self._start = rows.stop
        return True


def training_matrix(X: np.ndarray, y: np.ndarray, feature_names: list[str], max_bin: int,
                    margin: np.ndarray | None = None, cache_dir: str | Path | None = None,
                    page_rows: int = BATCH_ROWS) -> xgb.DMatrix:
    """(X, y) quantized for ``hist`` from row batches, ``margin`` as ``base_margin``. In memory
    (``QuantileDMatrix``), or with ``cache_dir`` in pages of ``page_rows`` rows on disk there
    (``ExtMemQuantileDMatrix``)."""
    if cache_dir is None:
        return xgb.QuantileDMatrix(RowBatches(X, y, feature_names, margin), max_bin=max_bin, missing=np.nan)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    batches = RowBatches(X, y, feature_names, margin, page_rows, cache_prefix=str(Path(cache_dir) / "train"))
    return xgb.ExtMemQuantileDMatrix(batches, max_bin=max_bin, missing=np.nan)


def predict_rows(booster: xgb.Booster, X: np.ndarray, feature_names: list[str], output_margin: bool = False
                 ) -> np.ndarray:
    """``booster.predict`` over ``X`` a batch at a time (the same float32 scores, never a copy of all rows)."""
    scores = np.empty(len(X), dtype=np.float32)
    start = 0
    for batch in row_batches(X):
        scores[start:start + len(batch)] = booster.predict(dmatrix(batch, None, feature_names),
                                                           output_margin=output_margin)
        start += len(batch)
    return scores


def train_trees(task: TrainTask, X: np.ndarray, y: np.ndarray, feature_names: list[str], obj=None,
                cache_dir: str | Path | None = None) -> xgb.Booster:
    """The global model (if any) plus ``task.num_trees`` trees fitted on (X, y); ``obj``: a custom objective;
    ``cache_dir``: the quantized rows in pages on disk there (``training_matrix``).

    A warm start trains from the global model's empty copy (its base score, objective; XGBoost then
    draws the same subsamples as continuing the model itself) on the global model's margin, then
    appends the new trees to it: the same model as ``xgb.train(..., xgb_model=global)`` on a ``DMatrix``.
    """
    params = {**BASE_PARAMS, **task.params}
    max_bin = int(params.get("max_bin", 256))
    if not task.base_model:
        matrix = _quantized(training_matrix(X, y, feature_names, max_bin, cache_dir=cache_dir))
        return _model_only(xgb.train(params, matrix, num_boost_round=task.num_trees, obj=obj))
    params.pop("base_score", None)  # the global model fixes it for every bank
    margin = predict_rows(model_json.to_booster(task.base_model), X, feature_names, output_margin=True)
    release_free_memory()  # the batches scored
    matrix = training_matrix(X, y, feature_names, max_bin, margin, cache_dir)
    del margin  # XGBoost holds its copy (base_margin)
    matrix = _quantized(matrix)
    start = model_json.to_booster(model_json.empty_like(task.base_model))
    new = xgb.train(params, matrix, num_boost_round=task.num_trees, xgb_model=start, obj=obj)
    return model_json.to_booster(model_json.append_trees(task.base_model, model_json.to_doc(new)))


def _model_only(booster: xgb.Booster) -> xgb.Booster:
    """The trained model without what training left in ``booster``: XGBoost's learner keeps the gradients of
    the last round and the training rows' cached predictions (~12 bytes a training row: ~96 MB at 8M rows)
    for as long as the booster lives, and a bank keeps its models (the warm start's path below already
    returns a booster rebuilt from the model)."""
    return model_json.to_booster(model_json.to_doc(booster))


def _quantized(matrix: xgb.DMatrix) -> xgb.DMatrix:
    """``matrix`` once what built it is gone: ``RowBatches`` (its labels and margin) is freed only by a
    collection (its XGBoost callbacks refer back to it), and the batches and sketches by a release."""
    gc.collect()
    release_free_memory()
    return matrix


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
