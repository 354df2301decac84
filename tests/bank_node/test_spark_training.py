"""The SparkXGBClassifier path: same training rows, warm start, a valid update."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedfraud.settings import consortium_params
from bank_node.dataset import spark_training_rows
from bank_node.training import build_update, dmatrix, train_trees, train_trees_spark
from conftest import E2E_SETTINGS
from fedfraud import model_json
from fedfraud.wire import ModelUpdate, TrainTask
from pipelines.build import FEATURES_DIR

pytestmark = pytest.mark.slow


def test_spark_engine_warm_starts_and_builds_an_update(spark, consortium):
    node = consortium.nodes[sorted(consortium.nodes)[-1]]
    data = node.data
    rows = spark_training_rows(spark, node.work_dir / FEATURES_DIR, data)
    assert rows.count() == len(data.y_train)
    params = {**consortium_params(E2E_SETTINGS, 100, 20_000), "seed": 3}
    task = TrainTask(bank=node.bank, round_id=1, base_model_id="none", contract_hash="h", num_trees=2, params=params)
    base = model_json.to_doc(train_trees(task, data.X_train, data.y_train, data.feature_names))
    grown_task = dataclasses.replace(
        task, round_id=2, base_model=base, base_model_id=model_json.model_id(base), num_trees=3
    )
    booster = train_trees_spark(grown_task, rows, data.feature_names)
    assert booster.num_boosted_rounds() == 5
    d = dmatrix(data.X_holdout, None, data.feature_names)
    np.testing.assert_array_equal(
        booster.predict(d, iteration_range=(0, 2), output_margin=True),
        model_json.to_booster(base).predict(d, output_margin=True),
    )
    update = ModelUpdate.from_bytes(build_update(grown_task, booster, data.counts(), {}).to_bytes())
    assert len(model_json.trees(update.model)) == 3


def test_node_trains_with_the_spark_engine(consortium):
    node = consortium.nodes[sorted(consortium.nodes)[-1]]
    node.engine = "spark"
    try:
        params = {**consortium_params(E2E_SETTINGS, 100, 20_000), "seed": 4}
        task = TrainTask(
            bank=node.bank,
            round_id=1,
            base_model_id="none",
            contract_hash=node.contract["hash"],
            num_trees=2,
            params=params,
        )
        update = ModelUpdate.from_bytes(node.train(task.to_bytes()))
        assert len(model_json.trees(update.model)) == 2 and update.bank == node.bank
    finally:
        node.engine = "local"
