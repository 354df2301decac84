"""Shared global bins: a fixed grid, counts only, edges that keep raw and binned routing identical."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xgboost as xgb

from fedfraud.binning import (
    FLOAT32_MAX,
    BinCounts,
    GlobalBins,
    Grid,
    cell_keys,
    cell_lower_bounds,
    count_cells,
    derive_edges,
    merge_counts,
    unbin_model,
)
from fedfraud import model_json


def wide_matrix(rows=4000, seed=0):
    """Features of very different kinds: amounts, counts, signed, heavy-tailed, flags, constant."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([
        rng.exponential(80, rows), rng.integers(0, 6, rows), rng.normal(0, 3, rows),
        rng.lognormal(0, 3, rows), rng.random(rows) < 0.1, np.zeros(rows),
    ]).astype(np.float32)
    X[rng.random(X.shape) < 0.05] = np.nan
    return X


def test_grid_cells_follow_value_order_and_bound_their_values():
    rng = np.random.default_rng(1)
    values = np.sort(np.concatenate([rng.normal(0, 1, 5000), rng.lognormal(0, 5, 5000), -rng.lognormal(0, 5, 5000),
                                     [0.0, 1e-42, -1e-42, 1.0, 2.0, -2.0]]).astype(np.float32))
    for bits in (0, 3, 7, 12):
        cells = cell_keys(values, bits)
        assert np.all(np.diff(cells) >= 0)
        assert np.all(cell_lower_bounds(cells, bits) <= values)
        assert np.all(values < cell_lower_bounds(cells + 1, bits))
    assert cell_keys(np.float32([-0.0]))[0] == cell_keys(np.float32([0.0]))[0]
    # with 7 mantissa bits small integers and powers of two are exact cell bounds
    ints = np.arange(0, 256, dtype=np.float32)
    assert np.array_equal(cell_lower_bounds(cell_keys(ints)), ints)


def test_infinities_are_counted_but_never_become_edges():
    values = np.float32([-np.inf, -5, 1, 2, 3, np.inf])
    cells, counts = count_cells(values[:, None])[0]
    assert counts.sum() == 6
    edges = derive_edges(cells, counts, max_bin=256)
    assert np.all(np.isfinite(edges)) and list(edges[1:]) == [1, 2, 3]  # no edge at +inf's cell
    assert -5.1 < edges[0] <= -5  # -5's cell (negative cells start at their most negative value)


def test_bank_counts_are_integers_only_and_skip_missing_and_rare_cells():
    X = wide_matrix()
    report = BinCounts("a", 7, count_cells(X))
    payload = json.loads(report.to_bytes())
    assert set(payload) == {"bank", "mantissa_bits", "cells", "counts"}
    assert all(isinstance(v, int) for part in payload["cells"] + payload["counts"] for v in part)
    assert [int(n.sum()) for _, n in report.features] == list((~np.isnan(X)).sum(axis=0))
    sparse = count_cells(X, Grid(min_count=5))
    assert all((n >= 5).all() for _, n in sparse)
    assert sum(len(c) for c, _ in sparse) < sum(len(c) for c, _ in report.features)
    assert BinCounts.from_bytes(report.to_bytes()).features[3][0].tolist() == report.features[3][0].tolist()


def test_merged_counts_are_the_pooled_counts():
    X = wide_matrix()
    parts = [BinCounts(b, 7, count_cells(rows)) for b, rows in (("a", X[:1000]), ("b", X[1000:2500]), ("c", X[2500:]))]
    pooled = count_cells(X)
    for (cells, counts), (pc, pn) in zip(merge_counts(parts), pooled):
        assert cells.tolist() == pc.tolist() and counts.tolist() == pn.tolist()
    with pytest.raises(ValueError, match="different grids"):
        merge_counts([parts[0], BinCounts("d", 5, count_cells(X[:10], Grid(mantissa_bits=5)))])


@pytest.mark.parametrize("max_bin", [2, 16, 256])
def test_edges_give_at_most_max_bin_bins_all_occupied(max_bin):
    X = wide_matrix(rows=20000)
    report = BinCounts("a", 7, count_cells(X))
    bins = GlobalBins.from_counts([report], max_bin)
    for f, occupancy in enumerate(bins.occupancy([report])):
        assert len(bins.edges[f]) + 1 <= max_bin
        assert (occupancy > 0).all(), f"feature {f}: empty bin"
    few = bins.edges[1]  # six integer values: each its own bin when the budget allows
    assert list(few) == ([1, 2, 3, 4, 5] if max_bin >= 6 else list(few))
    assert len(bins.edges[5]) == 0  # a constant feature has one bin


def test_a_heavy_value_does_not_waste_the_remaining_bins():
    rng = np.random.default_rng(2)
    values = np.concatenate([np.zeros(9000), rng.lognormal(0, 2, 1000)]).astype(np.float32)
    cells, counts = count_cells(values[:, None])[0]
    edges = derive_edges(cells, counts, max_bin=32)
    assert len(edges) == 31  # zero takes one bin; the other 31 go to the spread-out values


def test_binning_keeps_every_threshold_decision_and_at_most_max_bin_values():
    X = wide_matrix(rows=20000)
    bins = GlobalBins.from_counts([BinCounts("a", 7, count_cells(X))], 64)
    binned = bins.apply(X)
    assert np.array_equal(np.isnan(binned), np.isnan(X))
    for f in range(X.shape[1]):
        present = ~np.isnan(X[:, f])
        assert len(np.unique(binned[present, f])) <= 64
        for edge in bins.edges[f]:  # the property the trees rely on
            assert np.array_equal(X[present, f] < edge, binned[present, f] < edge)
        reps = bins.representatives(f)
        assert set(np.unique(binned[present, f]).tolist()) <= set(reps.tolist())
    lookup = np.stack([bins.representatives(f)[np.searchsorted(bins.edges[f], X[:, f], side="right")]
                       for f in range(X.shape[1])], axis=1)
    lookup[np.isnan(X)] = np.nan
    assert np.array_equal(binned, lookup, equal_nan=True)  # the fast lookup equals a plain search


def test_bins_round_trip_and_reject_edges_off_the_grid():
    bins = GlobalBins.from_counts([BinCounts("a", 7, count_cells(wide_matrix()))], 32)
    again = GlobalBins.from_dict(json.loads(json.dumps(bins.to_dict())))
    assert again.digest == bins.digest and all(np.array_equal(a, b) for a, b in zip(again.edges, bins.edges))
    with pytest.raises(ValueError, match="grid cells"):
        GlobalBins((np.float32([1.001]),), 32)
    with pytest.raises(ValueError, match="exceed max_bin"):
        GlobalBins((np.float32([1, 2, 3]),), 3)
    with pytest.raises(ValueError, match="increasing"):
        GlobalBins((np.float32([2, 1]),), 32)
    reference = bins.reference_matrix()
    for f in range(bins.num_feature):
        column = reference[:, f]
        assert column[~np.isnan(column)].tolist() == bins.representatives(f).tolist()


def test_unbinned_model_scores_raw_rows_like_binned_rows():
    rng = np.random.default_rng(3)
    X = wide_matrix(rows=6000, seed=4)
    X[:, 5] = np.where(rng.random(len(X)) < 0.3, np.nan, 1.0)  # only missing-vs-present can split it
    logit = 0.01 * np.nan_to_num(X[:, 0]) + np.isnan(X[:, 5]) * 2.5 - 2 + 0.3 * np.nan_to_num(X[:, 2])
    y = (rng.random(len(X)) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    bins = GlobalBins.from_counts([BinCounts("a", 7, count_cells(X))], 32)
    binned = bins.apply(X)
    booster = xgb.train({"max_depth": 4, "max_bin": 32, "tree_method": "hist", "objective": "binary:logistic"},
                        xgb.DMatrix(binned, label=y, missing=np.nan), num_boost_round=15)
    doc = unbin_model(model_json.to_doc(booster), bins)
    conditions = [c for t in model_json.trees(doc) for n, c in enumerate(t["split_conditions"])
                  if not model_json.is_leaf(t, n)]
    assert any(abs(np.float32(c)) == np.float32(FLOAT32_MAX) for c in conditions), "no missing-vs-present split"
    fresh = wide_matrix(rows=3000, seed=9)  # raw rows the bins never saw, outside their range too
    fresh[:10, 0] = 1e9
    fresh[10:20, 2] = -1e9
    raw = model_json.to_booster(doc).predict(xgb.DMatrix(fresh, missing=np.nan))
    assert np.array_equal(raw, booster.predict(xgb.DMatrix(bins.apply(fresh), missing=np.nan)))


def test_unbin_refuses_a_threshold_that_is_not_a_shared_edge():
    X = wide_matrix(rows=3000)
    y = (np.nan_to_num(X[:, 0]) > 50).astype(np.float32)
    booster = xgb.train({"max_depth": 2}, xgb.DMatrix(X, label=y, missing=np.nan), num_boost_round=2)  # raw values
    bins = GlobalBins.from_counts([BinCounts("a", 7, count_cells(X))], 8)
    with pytest.raises(ValueError, match="not a shared bin edge"):
        unbin_model(model_json.to_doc(booster), bins)
