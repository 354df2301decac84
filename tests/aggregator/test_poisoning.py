"""End to end: a bagging federation with one label-swapped bank, defended, against the clean one.

The swapped bank's labels are inverted in its training rows and its holdout (an honest summary of
swapped data). Cross-evaluation must exclude it by name before round 1, and the defended model's
pooled AUPRC on every bank's true holdout must stay within 0.02 of the clean federation's.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property

import numpy as np
import pytest
from mlflow import MlflowClient

from aggregator.drivers.embedded import run_federation
from aggregator.tracking import FederationTracker
from bank_node.node import BankNode
from fedfraud import model_json
from fedfraud.scores import average_precision, score_histograms
from conftest import E2E_SETTINGS as SETTINGS

pytestmark = pytest.mark.slow
ROUNDS = 2


class LabelSwapped(BankNode):
    """A bank whose every label is inverted (training rows and holdout)."""

    @cached_property
    def data(self):
        honest = BankNode.data.func(self)
        return dataclasses.replace(honest, y_train=1 - honest.y_train, y_holdout=1 - honest.y_holdout)


def swapped(node: BankNode) -> LabelSwapped:
    """The same bank (its consortium certificate too: it takes part in the masked cross-evaluation), labels swapped."""
    return LabelSwapped(node.bank, node.raw_path, node.work_dir, node.config, node.holdout_fraction, node.alert_budget,
                        secagg=node.secagg, share_metrics=node.share_metrics)


def true_pooled_auprc(nodes: dict[str, BankNode], work_dir, model_name: str) -> float:
    """The last round's model (as registered) on every bank's true holdout, pooled as the federation pools."""
    from bank_node.training import dmatrix

    doc = json.loads((work_dir / "federations" / model_name / f"round-{ROUNDS}" / "model.json").read_bytes())
    booster = model_json.to_booster(doc)
    pos, neg = np.zeros(1000, np.int64), np.zeros(1000, np.int64)
    for node in nodes.values():
        data = node.data
        p, n = score_histograms(booster.predict(dmatrix(data.X_holdout, None, data.feature_names)), data.y_holdout)
        pos, neg = pos + p, neg + n
    return average_precision(pos, neg)


def test_label_swapped_bank_is_excluded_and_the_model_stays_within_0_02(consortium, uri, tmp_path):
    nodes = consortium.nodes
    victim = min(nodes, key=lambda b: nodes[b].data.counts()["train_rows"])
    clean_tracker, poisoned_tracker = FederationTracker(uri, "poison-clean"), FederationTracker(uri, "poison-swapped")
    clean = run_federation(nodes, "bagging", ROUNDS, clean_tracker, consortium.contract, SETTINGS, 3,
                           work_dir=tmp_path / "clean")
    hostile = {**nodes, victim: swapped(nodes[victim])}
    defended = run_federation(hostile, "bagging", ROUNDS, poisoned_tracker, consortium.contract, SETTINGS, 3,
                              work_dir=tmp_path / "defended")

    assert defended.excluded[victim].startswith(("crossval_contradicts", "crossval_no_skill")), defended.excluded
    assert not clean.excluded and not clean.rejections, (clean.excluded, clean.rejections)
    tags = MlflowClient(uri, registry_uri=uri).get_model_version("poison-swapped", str(defended.version)).tags
    assert victim not in tags["fedfraud.participating_banks"].split(",")
    clean_auprc = true_pooled_auprc(nodes, tmp_path / "clean", "poison-clean")
    defended_auprc = true_pooled_auprc(nodes, tmp_path / "defended", "poison-swapped")
    assert abs(defended_auprc - clean_auprc) <= 0.02, (clean_auprc, defended_auprc)
