"""Training from row batches (QuantileDMatrix, spilled matrices) gives the model the in-memory DMatrix gave."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xgboost as xgb

from bank_node.dataset import load_dataset, row_batches, spilled
from bank_node.training import BASE_PARAMS, RowBatches, dmatrix, predict_rows, train_trees, training_matrix
from fedfraud import model_json
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import TrainTask

NAMES = [f"f{j}" for j in range(5)]


def rows(n: int = 6000, seed: int = 5):
    """Rows with NaNs, a feature of few values and ~3% positives (enough rows for an approximate sketch)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(NAMES))).astype(np.float32)
    X[rng.random(X.shape) < 0.05] = np.nan
    X[:, 2] = np.round(X[:, 2] * 2)
    logit = 1.5 * np.nan_to_num(X[:, 0]) + X[:, 1] - 4.0
    return X, (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int32)


def task(base=None, trees=5, **params):
    merged = {**consortium_params(FederationSettings(max_depth=4, max_bin=64), 200, 5800), "seed": 3, **params}
    return TrainTask(bank="alpha", round_id=2 if base else 1, base_model_id=model_json.model_id(base),
                     contract_hash="h", num_trees=trees, params=merged, base_model=base)


def dmatrix_model(t: TrainTask, X, y) -> xgb.Booster:
    """What ``train_trees`` did before batches: a DMatrix of all rows, warm start with ``xgb_model``."""
    params = {**BASE_PARAMS, **t.params}
    base = model_json.to_booster(t.base_model) if t.base_model else None
    if base is not None:
        params.pop("base_score")
    return xgb.train(params, dmatrix(X, y, NAMES), num_boost_round=t.num_trees, xgb_model=base)


def foreign_model(X, y) -> dict:
    """A global model grown on other rows (its thresholds are not this bank's cuts)."""
    return model_json.to_doc(dmatrix_model(task(trees=3), X * 1.7 + 0.3, y[::-1].copy()))


def test_batches_cover_every_row_once_in_order():
    X, _ = rows(1000)
    batches = list(row_batches(X, batch_rows=300))
    assert [len(b) for b in batches] == [300, 300, 300, 100]
    assert all(b.flags.c_contiguous and b.dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), X)


@pytest.mark.parametrize("params", [{}, {"subsample": 1.0, "colsample_bytree": 1.0}])
def test_same_model_as_the_dmatrix_path(params):
    X, y = rows()
    first = task(**params)
    assert model_json.to_doc(train_trees(first, X, y, NAMES)) == model_json.to_doc(dmatrix_model(first, X, y))
    warm = task(base=foreign_model(X, y), **params)  # subsampling on by default: same draws as a continued model
    assert model_json.to_doc(train_trees(warm, X, y, NAMES)) == model_json.to_doc(dmatrix_model(warm, X, y))


def test_warm_start_without_base_margin_would_differ():
    """Why the margin is passed: XGBoost predicts a continued model on the quantized rows, not the raw ones."""
    X, y = rows()
    warm = task(base=foreign_model(X, y))
    params = {k: v for k, v in {**BASE_PARAMS, **warm.params}.items() if k != "base_score"}
    quantized = xgb.train(params, training_matrix(X, y, NAMES, 64), num_boost_round=warm.num_trees,
                          xgb_model=model_json.to_booster(warm.base_model))
    assert model_json.to_doc(quantized) != model_json.to_doc(dmatrix_model(warm, X, y))


def test_batch_size_and_external_memory_do_not_change_the_model(tmp_path):
    X, y = rows()
    t = task(base=foreign_model(X, y))
    params = {k: v for k, v in {**BASE_PARAMS, **t.params}.items() if k != "base_score"}
    margin = predict_rows(model_json.to_booster(t.base_model), X, NAMES, output_margin=True)
    start = model_json.to_booster(model_json.empty_like(t.base_model))
    models = []
    for batch_rows in (len(X), 1000, 777):
        matrix = xgb.QuantileDMatrix(RowBatches(X, y, NAMES, margin, batch_rows=batch_rows), max_bin=64)
        models.append(model_json.to_doc(xgb.train(params, matrix, num_boost_round=5, xgb_model=start)))
    assert models[0] == models[1] == models[2]
    external = train_trees(t, X, y, NAMES, cache_dir=tmp_path / "cache")
    assert model_json.to_doc(external) == model_json.to_doc(train_trees(t, X, y, NAMES))
    for page_rows in (1000, 777):  # several pages on disk: the same model
        paged = training_matrix(X, y, NAMES, 64, margin, tmp_path / f"pages-{page_rows}", page_rows)
        assert model_json.to_doc(xgb.train(params, paged, num_boost_round=5, xgb_model=start)) == models[0]


def test_same_inputs_same_model():
    X, y = rows()
    t = task(base=foreign_model(X, y))
    assert model_json.model_id(model_json.to_doc(train_trees(t, X, y, NAMES))) == model_json.model_id(
        model_json.to_doc(train_trees(t, X.copy(), y.copy(), NAMES)))


def test_predict_rows_equals_one_prediction():
    X, y = rows()
    booster = train_trees(task(), X, y, NAMES)
    np.testing.assert_array_equal(predict_rows(booster, X, NAMES), booster.predict(dmatrix(X, None, NAMES)))


def test_spilled_dataset_trains_the_same_model(tmp_path):
    X, y = rows(3000)
    table = pa.table({"transaction_id": [f"t{i:05d}" for i in range(len(X))],
                      "event_time": pa.array(np.arange(len(X)) * 1_000_000, pa.timestamp("us", tz="UTC")),
                      "is_fraud": y, **{name: X[:, j] for j, name in enumerate(NAMES)}})
    (tmp_path / "features").mkdir()
    pq.write_table(table, tmp_path / "features" / "part-0.parquet")
    in_memory = load_dataset(tmp_path / "features", NAMES, 0.2)
    on_disk = load_dataset(tmp_path / "features", NAMES, 0.2, spill_dir=tmp_path / "spill")
    assert spilled(on_disk.X_train) and not spilled(in_memory.X_train)
    assert list((tmp_path / "spill").iterdir()) == []  # unnamed files: nothing left behind
    np.testing.assert_array_equal(np.concatenate(list(row_batches(on_disk.X_train, 700))), in_memory.X_train)
    np.testing.assert_array_equal(on_disk.X_holdout, in_memory.X_holdout)  # the mapping reads the same values
    t = task(base=foreign_model(X, y))
    assert model_json.to_doc(train_trees(t, on_disk.X_train, on_disk.y_train, NAMES)) == model_json.to_doc(
        dmatrix_model(t, in_memory.X_train, in_memory.y_train))


def test_node_pages_large_banks_on_disk_with_the_same_model(tmp_path, toy_banks):
    from conftest import with_toy_data

    from bank_node.node import XGB_CACHE_DIR, BankNode
    from pipelines.config import load_config

    X, y = toy_banks["alpha"]
    models = {}
    for threshold in (None, 299, 300):  # 300 training rows: in memory, on disk, in memory
        node = with_toy_data(BankNode("alpha", tmp_path / "raw", tmp_path / "node", load_config(),
                                      external_memory_rows=threshold), X, y)
        on_disk = node.training_cache(node.data) is not None
        assert on_disk == (threshold == 299)
        models[threshold] = model_json.to_doc(node.fit_local(task().params, 4))
        if on_disk:
            assert (tmp_path / "node" / XGB_CACHE_DIR).is_dir()
            assert list((tmp_path / "node" / XGB_CACHE_DIR).iterdir()) == []  # XGBoost removed its pages
    assert models[None] == models[299] == models[300]
