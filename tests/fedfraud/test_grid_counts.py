"""The grid counts' dense public layout: every row counted once per feature, the pooled dense counts equal the
sparse pooled counts (so the edges are unchanged) unless a value lies in a clipped zone, and masked sums of
three banks decode to exactly the pooled counts."""

from __future__ import annotations

import numpy as np
import pytest

from fedfraud.binning import BinCounts, GlobalBins, cell_keys, cell_lower_bounds, count_cells, derive_edges, \
    merge_counts
from fedfraud.grid_counts import MAX_GRID_WORDS, GridLayout, MaskedGridCounts
from fedfraud.secagg.masking import PairwiseMasker, decode_counts, encode_counts, unmasked_sum, words_to_text
from fedfraud.wire import WireFormatError


def in_range_matrix(rows=3000, seed=0):
    """Amounts, counts, signed values, heavy tails, flags, zeros and missing values, all inside the default
    layout's binades (|x| in [2**-12, 2**26) or exactly 0)."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([
        rng.exponential(80, rows), rng.integers(0, 6, rows), rng.normal(0, 3, rows), rng.lognormal(0, 3, rows),
        rng.random(rows) < 0.1, np.zeros(rows), -rng.exponential(5e5, rows),
    ]).astype(np.float32)
    small = (np.abs(X) < 2.0**-12) & (X != 0)
    X[small] = np.float32(0.5)
    X = np.clip(X, -2.0**25, 2.0**25)
    X[rng.random(X.shape) < 0.05] = np.nan
    return X


def edges_of(cells_counts, max_bin, bits=7):
    return [derive_edges(c, n, max_bin, bits) for c, n in cells_counts]


def test_the_default_layout_has_a_stated_size():
    layout = GridLayout()
    assert (layout.mantissa_bits, layout.exponent_min, layout.exponent_max) == (7, -12, 25)
    assert layout.words_per_feature == 9734 and layout.words(44) == 428_296 <= MAX_GRID_WORDS
    keys = layout.keys
    assert len(keys) == layout.cells and np.all(np.diff(keys) > 0)
    layout.check_size(44)
    with pytest.raises(ValueError, match="grid_too_large"):
        layout.check_size(108)
    with pytest.raises(ValueError, match="exponent_min"):
        GridLayout(exponent_min=-126)
    with pytest.raises(ValueError, match="mantissa_bits"):
        GridLayout(mantissa_bits=11)
    with pytest.raises(ValueError, match="exactly"):
        GridLayout.from_dict({"mantissa_bits": 7, "exponent_min": -12, "exponent_max": 25, "rows": 1})
    with pytest.raises(ValueError, match="integer"):
        GridLayout.from_dict({"mantissa_bits": 7.0, "exponent_min": -12, "exponent_max": 25})
    assert GridLayout.from_dict(layout.to_dict()) == layout


def test_every_row_is_counted_once_per_feature_in_a_cell_whose_lower_bound_it_reaches():
    layout = GridLayout(exponent_min=-4, exponent_max=6)
    values = np.float32([-np.inf, -1e9, -128.0, -127.9, -1.0, -2.0**-4, -0.06, -1e-30, -0.0, 0.0, 1e-45, 1e-30,
                         0.06, 2.0**-4, 1.0, 127.9, 128.0, 1e9, np.inf, np.nan])
    dense = layout.dense_counts(values[:, None])
    assert dense.shape == (1, layout.words_per_feature) and dense.sum() == len(values) and dense[0, -1] == 1
    index = np.searchsorted(layout.keys, cell_keys(values[:-1], 7), side="right") - 1
    lower = cell_lower_bounds(layout.keys[index], 7)
    finite = np.isfinite(lower)  # only the negative overflow cell has none (it is never an edge: lowest)
    assert np.all(lower[finite] <= values[:-1][finite]) and list(index[~finite]) == [0, 0, 0]
    assert np.all(values[:-1][index < layout.cells - 1] < cell_lower_bounds(layout.keys[np.minimum(
        index + 1, layout.cells - 1)], 7)[index < layout.cells - 1])
    # -0.0 and 0.0 and a denormal share the zero cell, as in the sparse grid
    zero = list(layout.keys).index(cell_keys(np.float32([0.0]))[0])
    assert dense[0, zero] == 3


def test_pooled_dense_counts_are_the_sparse_pooled_counts_and_give_the_same_edges():
    X = in_range_matrix()
    parts = [X[:700], X[700:1900], X[1900:]]
    layout = GridLayout()
    dense = sum(layout.dense_counts(p) for p in parts)
    assert (dense.sum(axis=1) == len(X)).all()
    pooled = layout.pooled_cells(dense)
    sparse = merge_counts([BinCounts(str(i), 7, count_cells(p)) for i, p in enumerate(parts)])
    for (c1, n1), (c2, n2) in zip(pooled, sparse):
        assert np.array_equal(c1, c2) and np.array_equal(n1, n2)
    for max_bin in (4, 32, 256):
        reference = GlobalBins.from_counts([BinCounts("all", 7, count_cells(X))], max_bin)
        assert GlobalBins(tuple(edges_of(pooled, max_bin)), max_bin).digest == reference.digest


def test_clipped_values_move_no_edge_inside_a_clipped_zone():
    """Values beyond the layout's binades are counted in one cell per zone: the edges may differ from the sparse
    grid's, but no edge lies strictly inside a clipped zone, and every edge is still a grid cell's lower bound."""
    rng = np.random.default_rng(3)
    layout = GridLayout(exponent_min=-2, exponent_max=4)
    column = np.concatenate([rng.uniform(-100, 100, 3000), rng.uniform(-0.2, 0.2, 3000)]).astype(np.float32)
    edges = edges_of(layout.pooled_cells(layout.dense_counts(column[:, None])), 64)[0]
    sparse = edges_of(merge_counts([BinCounts("a", 7, count_cells(column[:, None]))]), 64)[0]
    assert not np.array_equal(edges, sparse)
    inside = (np.abs(edges) > 2.0**5) | ((edges != 0) & (np.abs(edges) < 2.0**-2))
    zero = layout.cells // 2  # the layout is symmetric around the zero cell: negative tiny, zero, positive tiny
    assert cell_lower_bounds(layout.keys[[zero]], 7)[0] == 0.0
    zone_cells = cell_lower_bounds(layout.keys[[zero - 1, zero + 1, layout.cells - 1]], 7).tolist()
    assert zone_cells[2] == 2.0**5 and -2.0**-2 < zone_cells[0] < -2.0**-3 and 0 < zone_cells[1] < 1e-39
    assert set(edges[inside].tolist()) <= set(zone_cells), edges[inside]  # a zone's own cell, never within it
    GlobalBins((edges,), 64)  # valid shared edges


def test_the_pooled_sum_must_count_every_row_of_every_feature():
    layout = GridLayout(exponent_min=0, exponent_max=1)
    dense = layout.dense_counts(np.float32([[1.0, 2.0], [3.0, np.nan]]))
    assert [n.tolist() for _, n in layout.pooled_cells(dense)] == [[1, 1], [1]]
    assert [n.tolist() for _, n in layout.pooled_cells(dense * 3, min_count=4)] == [[], []]
    broken = dense.copy()
    broken[1, 0] += 1
    with pytest.raises(ValueError, match="grid_sum_invalid: features count"):
        layout.pooled_cells(broken)
    with pytest.raises(ValueError, match="grid_sum_invalid: counts of shape"):
        layout.pooled_cells(dense[:, :-1])


def test_three_masked_uploads_sum_to_the_pooled_counts_and_each_looks_random():
    X = in_range_matrix(rows=1500, seed=4)
    layout, banks = GridLayout(), ["a", "b", "c"]
    keys = {frozenset(p): bytes([i]) * 32 for i, p in enumerate([("a", "b"), ("a", "c"), ("b", "c")])}
    parts = dict(zip(banks, (X[:400], X[400:900], X[900:])))
    uploads = {}
    for bank in banks:
        masker = PairwiseMasker(bank, {p: keys[frozenset((bank, p))] for p in banks if p != bank})
        uploads[bank] = masker.mask(encode_counts(layout.dense_counts(parts[bank]).reshape(-1)), 2)
    pooled = decode_counts(unmasked_sum(list(uploads.values()))).reshape(-1, layout.words_per_feature)
    assert np.array_equal(pooled, layout.dense_counts(X))
    for bank, words in uploads.items():
        plain = encode_counts(layout.dense_counts(parts[bank]).reshape(-1))
        bytes_ = np.frombuffer(words.astype("<u8").tobytes(), dtype=np.uint8)
        assert abs(float(np.unpackbits(bytes_).mean()) - 0.5) < 0.002  # balanced bits: random words
        assert float(np.unpackbits(np.frombuffer(plain.astype("<u8").tobytes(), np.uint8)).mean()) < 0.01
    answer = MaskedGridCounts("a", "s", words_to_text(uploads["a"]))
    assert np.array_equal(MaskedGridCounts.from_bytes(answer.to_bytes()).word_array(layout.words_per_feature),
                          uploads["a"])
    with pytest.raises(WireFormatError, match="not whole features"):
        answer.word_array(layout.words_per_feature + 1)
    with pytest.raises(WireFormatError, match="must be a string"):
        MaskedGridCounts.from_bytes(b'{"bank": "a", "session": "s", "words": [1, 2]}')
