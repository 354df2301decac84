"""Shared global bins for histogram federation: fixed grid -> pooled counts -> edges -> binning.

XGBoost's federated (row-split) training equals pooled training only if every bank buckets
every feature with the *same* edges. Each bank sketches its own quantiles otherwise. So,
before the first round:

1. Every bank counts its training rows per feature over a **fixed, data-independent grid**.
   A grid cell is a float32 value with all but its top ``mantissa_bits`` mantissa bits cut
   off: 2**mantissa_bits cells per power of two, on both sides of zero. The cell of a value
   follows from the value alone, so banks need no shared data to agree on the grid. Only
   counts leave a bank, never a value, and only masked (``fedfraud.grid_counts``: a dense
   public layout of the grid; the sparse ``BinCounts`` here only with unmasked sessions).
2. The aggregator sums the counts and draws at most ``max_bin`` bins per feature, each
   starting at a cell's lower bound (``derive_edges``): a cell is never split, and each bin
   holds about the same share of the pooled rows.
3. Every bank replaces each value by the **lower edge of its bin** (``GlobalBins.apply``). So
   a feature has at most ``max_bin`` distinct values, and XGBoost's sketch keeps every one
   of them as a cut point. Its split thresholds are then exactly the shared edges: on
   binned data ``x_binned < edge_k`` holds exactly when ``x_raw < edge_k``. That is why the
   trees score raw features unchanged. ``unbin_model`` rewrites the only two thresholds
   that are not edges: XGBoost's sentinels below the lowest and above the highest value.
   They only separate missing from present values.

Everything here is pure numpy and deterministic. Banks and the aggregator use the same code.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfraud import model_json
from fedfraud.model_json import Doc

DEFAULT_MANTISSA_BITS = 7  # 128 cells per power of two: <0.8% relative width
FLOAT32_MAX = float(np.finfo(np.float32).max)
_SIGN = np.uint32(0x80000000)


@dataclass(frozen=True)
class Grid:
    """The fixed counting grid the aggregator asks for (the same for every bank).

    ``min_count``: cells holding fewer rows are left out of the edge candidates, so no edge
    locates a single rare value. Masked grid counts (``fedfraud.grid_counts``) apply it to the
    pooled counts, at the aggregator; ``count_cells`` (the clear path, benches only) at the bank.
    Edges stay shared, so exactness is kept; only bin placement gets coarser in the tails.
    """

    mantissa_bits: int = DEFAULT_MANTISSA_BITS
    min_count: int = 1

    def __post_init__(self):
        if not 0 <= self.mantissa_bits <= 23:
            raise ValueError(f"mantissa_bits must be in 0..23, got {self.mantissa_bits}")
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")

    def to_bytes(self) -> bytes:
        return json.dumps({"mantissa_bits": self.mantissa_bits, "min_count": self.min_count}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Grid":
        parsed = json.loads(data)
        return cls(int(parsed["mantissa_bits"]), int(parsed["min_count"]))


# ---------------------------------------------------------------------------- the fixed grid

def _sortable_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys whose order is the float order (-0 counts as +0; NaN must be removed first)."""
    bits = (np.asarray(values, dtype=np.float32) + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 = +0.0
    flip = (bits.view(np.int32) >> 31).view(np.uint32) | _SIGN  # negatives: all bits; positives: the sign
    return bits ^ flip


def cell_keys(values: np.ndarray, mantissa_bits: int = DEFAULT_MANTISSA_BITS) -> np.ndarray:
    """The grid cell of each (non-NaN) float32 value (cells are numbered in value order)."""
    return (_sortable_keys(values) >> np.uint32(23 - mantissa_bits)).astype(np.int64)


_LOOKUP_MAX_BITS = 10  # bin lookup tables of 2**(9 + bits) entries per feature; finer grids search instead


def cell_lower_bounds(cells: np.ndarray, mantissa_bits: int = DEFAULT_MANTISSA_BITS) -> np.ndarray:
    """The smallest float32 value in each cell (NaN or inf for the cells of infinities)."""
    keys = (np.asarray(cells, dtype=np.int64) << (23 - mantissa_bits)).astype(np.uint32)
    bits = np.where(keys & _SIGN, keys & ~_SIGN, ~keys).astype(np.uint32)
    return bits.view(np.float32)


def count_cells(X: np.ndarray, grid: Grid = Grid()) -> list[tuple[np.ndarray, np.ndarray]]:
    """Bank side: per feature, the occupied grid cells and how many rows fall in each (NaN skipped)."""
    result = []
    for column in np.asarray(X, dtype=np.float32).T:
        present = column[~np.isnan(column)]
        cells, counts = np.unique(cell_keys(present, grid.mantissa_bits), return_counts=True)
        keep = counts >= grid.min_count
        result.append((cells[keep], counts[keep]))
    return result


@dataclass(frozen=True)
class BinCounts:
    """What a bank sends before training: per-feature (cell, count) pairs on the fixed grid."""

    bank: str
    mantissa_bits: int
    features: list[tuple[np.ndarray, np.ndarray]]

    MAX_BYTES = 64 * 1024 * 1024

    def to_bytes(self) -> bytes:
        return json.dumps({"bank": self.bank, "mantissa_bits": self.mantissa_bits,
                           "cells": [c.tolist() for c, _ in self.features],
                           "counts": [n.tolist() for _, n in self.features]}, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "BinCounts":
        if len(data) > cls.MAX_BYTES:
            raise ValueError(f"bin counts of {len(data)} bytes exceed {cls.MAX_BYTES}")
        parsed = json.loads(data)
        cells, counts = parsed["cells"], parsed["counts"]
        if len(cells) != len(counts):
            raise ValueError("bin counts: cells and counts differ in length")
        features = []
        for c, n in zip(cells, counts):
            c, n = np.asarray(c, dtype=np.int64), np.asarray(n, dtype=np.int64)
            if c.shape != n.shape or c.ndim != 1 or (n < 0).any():
                raise ValueError("bin counts: malformed feature entry")
            features.append((c, n))
        return cls(str(parsed["bank"]), int(parsed["mantissa_bits"]), features)


def merge_counts(reports: list[BinCounts]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Aggregator side: the consortium's counts per feature and cell (sum over banks)."""
    if not reports:
        raise ValueError("no bin counts to merge")
    widths = {len(r.features) for r in reports}
    bits = {r.mantissa_bits for r in reports}
    if len(widths) != 1 or len(bits) != 1:
        raise ValueError(f"banks counted different grids: features {widths}, mantissa bits {bits}")
    merged = []
    for parts in zip(*(r.features for r in reports)):
        cells = np.concatenate([c for c, _ in parts])
        counts = np.concatenate([n for _, n in parts])
        unique, inverse = np.unique(cells, return_inverse=True)
        merged.append((unique, np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int64)))
    return merged


# ---------------------------------------------------------------------------- edges

def derive_edges(cells: np.ndarray, counts: np.ndarray, max_bin: int,
                 mantissa_bits: int = DEFAULT_MANTISSA_BITS) -> np.ndarray:
    """At most ``max_bin - 1`` increasing float32 edges (so at most ``max_bin`` bins) at cell bounds.

    Every occupied cell becomes its own bin when there are few enough of them. Otherwise bins are
    cut greedily at about equal pooled counts. The target is recomputed after each bin, so a
    cell heavy with one value (zeros) does not waste the bins after it. Every bin is occupied.
    """
    if max_bin < 2:
        raise ValueError(f"max_bin must be >= 2, got {max_bin}")
    order = np.argsort(cells, kind="stable")
    cells, counts = np.asarray(cells)[order], np.asarray(counts)[order]
    if len(cells) <= 1:
        starts = np.empty(0, dtype=np.int64)
    elif len(cells) <= max_bin:
        starts = np.arange(1, len(cells))
    else:
        chosen, rest, bins_left, acc = [], float(counts.sum()), max_bin, 0.0
        target = rest / bins_left
        for index, count in enumerate(counts.tolist()):
            if acc >= target and bins_left > 1:
                chosen.append(index)
                rest -= acc
                bins_left -= 1
                acc = 0.0
                target = rest / bins_left
            acc += count
        starts = np.asarray(chosen, dtype=np.int64)
    edges = cell_lower_bounds(cells[starts], mantissa_bits)
    return edges[np.isfinite(edges)].astype(np.float32)


@dataclass(frozen=True)
class GlobalBins:
    """The consortium's bin edges per feature (float32, increasing). Every bank bins with these."""

    edges: tuple[np.ndarray, ...]
    max_bin: int
    mantissa_bits: int = DEFAULT_MANTISSA_BITS

    def __post_init__(self):
        for index, e in enumerate(self.edges):
            if e.dtype != np.float32 or e.ndim != 1 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
                raise ValueError(f"feature {index}: edges must be finite, increasing float32")
            if len(e) + 1 > self.max_bin:
                raise ValueError(f"feature {index}: {len(e) + 1} bins exceed max_bin {self.max_bin}")
            if not np.array_equal(cell_lower_bounds(cell_keys(e, self.mantissa_bits), self.mantissa_bits), e):
                raise ValueError(f"feature {index}: edges must be lower bounds of grid cells")

    @classmethod
    def from_counts(cls, reports: list[BinCounts], max_bin: int) -> "GlobalBins":
        bits = reports[0].mantissa_bits if reports else DEFAULT_MANTISSA_BITS
        edges = tuple(derive_edges(c, n, max_bin, bits) for c, n in merge_counts(reports))
        return cls(edges, max_bin, bits)

    @property
    def num_feature(self) -> int:
        return len(self.edges)

    def representatives(self, feature: int) -> np.ndarray:
        """The value each bin's rows take: just below the first edge for bin 0, else its lower edge."""
        e = self.edges[feature]
        if len(e) == 0:
            return np.zeros(1, dtype=np.float32)
        first = np.nextafter(e[0], np.float32(-np.inf), dtype=np.float32)
        return np.concatenate([[first], e]).astype(np.float32)

    def apply(self, X: np.ndarray) -> np.ndarray:
        """Bank side: every value replaced by its bin's representative; NaN (missing) stays NaN."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.num_feature:
            raise ValueError(f"expected a matrix with {self.num_feature} features, got shape {X.shape}")
        columns = np.ascontiguousarray(X.T)
        out = np.empty_like(columns)
        for f, column in enumerate(columns):
            out[f] = self.representatives(f)[self.bin_index(f, column)]
            out[f][np.isnan(column)] = np.nan
        return np.ascontiguousarray(out.T)

    def bin_index(self, feature: int, values: np.ndarray) -> np.ndarray:
        """Bin of each value: how many edges are <= it (NaN gets an arbitrary bin).

        Edges are lower bounds of grid cells, so comparing cells is comparing values. A lookup
        table over all cells is then ~20x faster than a binary search per value.
        """
        edges = self.edges[feature]
        if self.mantissa_bits > _LOOKUP_MAX_BITS:
            return np.searchsorted(edges, values, side="right")
        table = np.zeros(1 << (32 - (23 - self.mantissa_bits)), dtype=np.int32)
        np.add.at(table, cell_keys(edges, self.mantissa_bits), 1)
        return np.cumsum(table, dtype=np.int32)[cell_keys(values, self.mantissa_bits)]

    def reference_matrix(self) -> np.ndarray:
        """A public matrix holding every representative once per feature (NaN pads).

        Built from the edges alone. Each bank derives XGBoost's cut points from it instead of
        sketching its own rows, which the federated communicator would share with every peer.
        """
        reps = [self.representatives(f) for f in range(self.num_feature)]
        out = np.full((max(len(r) for r in reps), self.num_feature), np.nan, dtype=np.float32)
        for f, r in enumerate(reps):
            out[:len(r), f] = r
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"max_bin": self.max_bin, "mantissa_bits": self.mantissa_bits,
                "edges": [[float(v) for v in e] for e in self.edges]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GlobalBins":
        edges = tuple(np.asarray(e, dtype=np.float64).astype(np.float32) for e in data["edges"])
        for e, raw in zip(edges, data["edges"]):
            if not np.array_equal(e.astype(np.float64), np.asarray(raw, dtype=np.float64)):
                raise ValueError("bin edges must be float32 values")
        return cls(edges, int(data["max_bin"]), int(data["mantissa_bits"]))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def occupancy(self, reports: list[BinCounts]) -> list[np.ndarray]:
        """Pooled rows per bin and feature (for the design notes and tests)."""
        result = []
        for f, (cells, counts) in enumerate(merge_counts(reports)):
            lows = cell_lower_bounds(cells, self.mantissa_bits)
            index = np.searchsorted(self.edges[f], lows, side="right")
            result.append(np.bincount(index, weights=counts, minlength=len(self.edges[f]) + 1).astype(np.int64))
        return result


# ---------------------------------------------------------------------------- the model

def unbin_model(doc: Doc, bins: GlobalBins) -> Doc:
    """The model in raw feature units: it routes a raw row exactly as its binned row.

    Split thresholds on binned data are bin edges already (each bin's value is its lower
    edge), except XGBoost's two sentinels per feature: one below the lowest value and one
    above the highest. They only separate missing from present values. They become
    -FLT_MAX / +FLT_MAX, which routes every finite raw value like every binned one. Any
    other threshold means the binning was not shared, and raises.
    """
    out = copy.deepcopy(doc)
    edge_sets = [set(e.tolist()) for e in bins.edges]
    reps = [bins.representatives(f) for f in range(bins.num_feature)]
    for tree in model_json.trees(out):
        conditions = tree["split_conditions"]
        for node, feature in enumerate(tree["split_indices"]):
            if model_json.is_leaf(tree, node):
                continue
            value = float(np.float32(conditions[node]))
            if value in edge_sets[feature]:
                continue
            if value > float(reps[feature][-1]):
                conditions[node] = FLOAT32_MAX
            elif value < float(reps[feature][0]):
                conditions[node] = -FLOAT32_MAX
            else:
                raise ValueError(f"tree {tree['id']} node {node}: threshold {value!r} on feature {feature} "
                                 "is not a shared bin edge")
    return out
