"""Compaction: which trees are proposed for dropping, and which verdict the banks' reports allow."""

from __future__ import annotations

import numpy as np
import pytest
import xgboost as xgb
from conftest import TOY_FEATURES

from aggregator import compaction
from aggregator.strategies import Bagging
from bank_node.evaluation import evaluation_report
from bank_node.training import build_update, train_trees
from fedfraud import model_json
from fedfraud.crosscheck import drop_trees
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import ModelUpdate

SETTINGS = FederationSettings(trees_per_round=4, max_depth=3)
PARAMS = consortium_params(SETTINGS, positives=100, negatives=1000)


def bagged(toy_banks, rounds: int):
    """A real bagged model: ``rounds`` rounds of every toy bank's trees, appended and weighted."""
    rows = {b: len(y) for b, (_, y) in toy_banks.items()}
    strategy = Bagging(SETTINGS, seed=3, consortium_params=PARAMS, train_rows=rows)
    doc = None
    for round_id in range(1, rounds + 1):
        updates = []
        for index, bank in enumerate(sorted(toy_banks)):
            task = strategy.configure(round_id, bank, index, doc, "h")
            X, y = toy_banks[bank]
            booster = train_trees(task, X, y, TOY_FEATURES)
            updates.append(ModelUpdate.from_bytes(build_update(task, booster, {"train_rows": len(y)}, {}).to_bytes()))
        doc = strategy.aggregate(doc, updates)
    return doc


def reports(doc, labels_drops, toy_banks):
    """Each toy bank's reports (real scores, histograms) for every variant: {bank: {label: report}}."""
    out = {}
    for bank, (X, y) in toy_banks.items():
        out[bank] = {}
        for label, drop in labels_drops.items():
            scores = model_json.to_booster(drop_trees(doc, drop)).predict(xgb.DMatrix(X, feature_names=TOY_FEATURES))
            out[bank][label] = evaluation_report(bank, label, scores, y)
    return out


def test_ladder_is_distinct_sizes_within_the_allowed_share():
    assert compaction.ladder(100, 8, 0.9) == sorted(set(compaction.ladder(100, 8, 0.9)))
    assert max(compaction.ladder(100, 8, 0.9)) == 90 and min(compaction.ladder(100, 8, 0.9)) >= 1
    assert len(compaction.ladder(100, 8, 0.9)) == 8
    assert compaction.ladder(1, 8, 0.5) == []  # nothing to drop within half of one tree
    assert compaction.ladder(3, 8, 1.0) == [1, 2, 3]


def origins_of(toy_banks, rounds: int):
    """The provenance ``bagged`` leaves: per round, each bank's trees in bank order with its weight."""
    rows = {b: len(y) for b, (_, y) in toy_banks.items()}
    return [[n, b, rows[b] / sum(rows.values())] for n in range(1, rounds + 1) for b in sorted(rows)
            for _ in range(SETTINGS.trees_per_round)]


def test_rank_puts_the_weakest_earlier_trees_first_and_never_the_new_ones(toy_banks):
    doc = bagged(toy_banks, 2)
    count = len(model_json.trees(doc))
    droppable = count // 2  # round 1's trees
    weak = model_json.scale_leaves(drop_trees(doc, list(range(1, count))), 1e-3)  # tree 0, leaves scaled down
    rebuilt = model_json.append_trees(model_json.empty_like(doc), weak, drop_trees(doc, [0]))
    order = compaction.rank(rebuilt, droppable)
    assert order[0] == 0
    assert sorted(order) == list(range(droppable))
    expanded, labels, thins = compaction.variants(rebuilt, None, droppable, 4, 0.9)
    assert thins == [] and expanded == rebuilt and labels[compaction.FULL] == []
    assert all(max(drop) < droppable for label, drop in labels.items() if drop)


def test_thinning_keeps_one_block_per_earlier_round_scaled_to_the_whole_step(toy_banks):
    doc = bagged(toy_banks, 3)
    origins = origins_of(toy_banks, 3)
    droppable = 2 * len(toy_banks) * SETTINGS.trees_per_round
    expanded, labels, thins = compaction.variants(doc, origins, droppable, 8, 0.9)
    assert [t.round_id for t in thins] == [1, 2] and {t.bank for t in thins} == {"gamma"}  # the most rows
    assert thins[0].factor == pytest.approx(1 / origins[2 * SETTINGS.trees_per_round][2])
    X = np.concatenate([x for x, _ in toy_banks.values()])
    dm = xgb.DMatrix(X, feature_names=TOY_FEATURES)
    margin = lambda d: model_json.to_booster(d).predict(dm, output_margin=True)  # noqa: E731
    np.testing.assert_allclose(margin(drop_trees(expanded, labels[compaction.FULL])), margin(doc), atol=1e-5)
    thinned = drop_trees(expanded, labels["thin:2"])
    sizes = compaction.sizes_of(expanded, labels)
    assert sizes["thin:2"] == len(model_json.trees(thinned)) == (2 + len(toy_banks)) * SETTINGS.trees_per_round
    kept = [i for i, o in enumerate(origins) if o[1] == "gamma" and o[0] < 3]  # round 1 and 2 by gamma, scaled
    base = margin(model_json.empty_like(doc))
    step = margin(drop_trees(doc, [i for i in range(len(origins)) if i not in kept])) - base
    last = margin(drop_trees(doc, list(range(droppable)))) - base
    np.testing.assert_allclose(margin(thinned) - base, step * thins[0].factor + last, rtol=1e-3, atol=1e-3)
    after = compaction.origins_after(origins, thins, labels["thin:2"])
    assert len(after) == sizes["thin:2"] and {o[1] for o in after if o[0] < 3} == {"gamma"}
    assert all(o[2] == pytest.approx(1.0) for o in after if o[0] < 3)  # a kept copy carries its round's weight
    assert [t.round_id for t in compaction.thinnings(after, len(after))] == [3]  # rounds 1 and 2 are one block


def test_choose_keeps_the_smallest_model_the_banks_do_not_miss(toy_banks):
    doc = bagged(toy_banks, 3)
    count = len(model_json.trees(doc))
    expanded, drops, _ = compaction.variants(doc, None, count, 6, 1.0)
    sizes = compaction.sizes_of(expanded, drops)
    answers = reports(expanded, drops, toy_banks)
    losses = {label: compaction.worst_loss(answers, label) for label in drops if label != compaction.FULL}
    assert losses[f"drop:{count}"] > 0.05  # no trees left: no skill, clearly missed
    verdict = compaction.choose(answers, sizes, tolerance=0.01)
    assert verdict.label != f"drop:{count}"
    assert all(loss > 0.01 for label, loss in losses.items() if sizes[label] < sizes[verdict.label])
    assert verdict.label == compaction.FULL or losses[verdict.label] <= 0.01
    assert compaction.choose(answers, sizes, tolerance=1.0).label == f"drop:{count}"


def test_one_bank_cannot_push_a_drop_the_others_miss(toy_banks):
    doc = bagged(toy_banks, 2)
    count = len(model_json.trees(doc))
    everything = f"drop:{count}"
    drops = {compaction.FULL: [], everything: list(range(count))}
    answers = reports(doc, drops, toy_banks)
    liar = sorted(answers)[0]
    answers[liar][everything] = answers[liar][compaction.FULL]  # claims the empty model loses nothing
    assert compaction.choose(answers, compaction.sizes_of(doc, drops), tolerance=0.01).label == compaction.FULL


@pytest.mark.parametrize("field, value", [("compaction", "yes"), ("compaction_tolerance", -0.1),
                                          ("compaction_steps", 0), ("compaction_max_fraction", 1.5),
                                          ("compaction_new_trees", 1), ("compaction_budget", "on")])
def test_bad_compaction_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        FederationSettings(**{field: value})


def test_dropping_trees_changes_scores_only_by_their_margins(toy_banks):
    doc = bagged(toy_banks, 2)
    X = np.concatenate([x for x, _ in toy_banks.values()])
    dm = xgb.DMatrix(X, feature_names=TOY_FEATURES)
    full = model_json.to_booster(doc).predict(dm, output_margin=True)
    kept = model_json.to_booster(drop_trees(doc, [1, 2])).predict(dm, output_margin=True)
    only = model_json.to_booster(drop_trees(doc, [i for i in range(len(model_json.trees(doc))) if i not in (1, 2)]))
    base = model_json.to_booster(model_json.empty_like(doc)).predict(dm, output_margin=True)
    np.testing.assert_allclose(full - kept, only.predict(dm, output_margin=True) - base, atol=1e-4)


def test_the_budget_spends_only_positive_losses_and_a_spent_budget_still_allows_free_drops(toy_banks):
    doc = bagged(toy_banks, 3)
    count = len(model_json.trees(doc))
    expanded, drops, _ = compaction.variants(doc, None, count, 6, 1.0)
    answers, sizes = reports(expanded, drops, toy_banks), compaction.sizes_of(expanded, drops)
    assert compaction.allowance(0.01, 0.004) == pytest.approx(0.006) and compaction.allowance(0.01, 0.02) == 0.0
    verdict = compaction.choose(answers, sizes, compaction.allowance(1.0, 0.0))
    assert verdict.label == f"drop:{count}" and verdict.worst_loss[verdict.label] > 0.05
    assert compaction.spend(0.001, verdict) == pytest.approx(0.001 + verdict.worst_loss[verdict.label])
    spent = compaction.choose(answers, sizes, compaction.allowance(0.01, 0.01))  # nothing left: only free drops
    assert spent.label == compaction.FULL or spent.worst_loss[spent.label] <= 0
    assert compaction.spend(0.01, spent) == pytest.approx(0.01)  # a gain is not credited back
