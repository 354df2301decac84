"""The histogram strategy's grid counts as one dense, public vector, so that they can be masked.

``fedfraud.binning`` counts a bank's rows per (feature, grid cell) sparsely: only occupied cells, a
layout that depends on the data. Pairwise masks need a vector whose length and meaning every bank
knows beforehand, so the counts travel as a **dense vector over a bounded, public layout**
(``GridLayout``): per feature, in value order,

* ``negative overflow``: every value below ``-2**(exponent_max + 1)`` (and -inf) — never an edge;
* every grid cell of ``-2**(exponent_max + 1) < x <= -2**exponent_min`` (``2**mantissa_bits`` per binade);
* ``negative tiny``: ``-2**exponent_min < x < 0``, as the grid cell just above the range (its lower
  bound is below every such value);
* ``zero``: the grid's cell of 0 (``0 <= x < 2**-(126 + mantissa_bits)``, exactly as in the sparse grid);
* ``positive tiny``: ``0 < x < 2**exponent_min`` beyond the zero cell, as the grid cell just after it;
* every grid cell of ``2**exponent_min <= x < 2**(exponent_max + 1)``;
* ``positive overflow``: every value from ``2**(exponent_max + 1)`` (and +inf), as that grid cell;
* ``missing``: NaN, so that every row is counted once per feature.

Each layout cell stands for a real grid cell (its ``keys``), so the pooled dense counts turn back into
the sparse ``(cell, count)`` pairs that ``binning.derive_edges`` takes. When no value lies in a clipped
zone (``|x| >= 2**(exponent_max + 1)``, or ``0 < |x| < 2**exponent_min`` beyond the zero cell) the pairs
are exactly the sparse pooled counts, hence the same edges. Otherwise a clipped zone is one cell: no
edge falls inside it, and the greedy cut after it may shift. The edges are shared either way, so the
model stays exact.

The default layout (7 mantissa bits, binades 2**-12 .. 2**25) has 9,734 words per feature: 428,296
for the feature contract's 44 features (3.4 MB of uint64 words).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedfraud.binning import DEFAULT_MANTISSA_BITS, cell_keys
from fedfraud.wire import WireFormatError, WireMessage

MAX_GRID_WORDS = 1 << 20  # a bank refuses a layout that needs more words (8 MiB) for its features
MAX_MANTISSA_BITS = 10


@dataclass(frozen=True)
class GridLayout:
    """The public dense layout: the grid's mantissa bits and the binades counted cell by cell."""

    mantissa_bits: int = DEFAULT_MANTISSA_BITS
    exponent_min: int = -12
    exponent_max: int = 25

    def __post_init__(self):
        for name in ("mantissa_bits", "exponent_min", "exponent_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"grid layout: {name} must be an integer, got {str(value)[:20]!r}")
        if not 0 <= self.mantissa_bits <= MAX_MANTISSA_BITS:
            raise ValueError(f"grid layout: mantissa_bits must be in 0..{MAX_MANTISSA_BITS}, got {self.mantissa_bits}")
        if not -126 < self.exponent_min <= self.exponent_max <= 126:
            raise ValueError(f"grid layout: need -126 < exponent_min <= exponent_max <= 126, got "
                             f"{self.exponent_min}, {self.exponent_max}")

    # ---- the cells

    def _positive_key(self, exponent: int, top: int) -> int:
        return (1 << (8 + self.mantissa_bits)) + ((exponent + 127) << self.mantissa_bits) + top

    def _negative_key(self, exponent: int, top: int) -> int:
        return (1 << (8 + self.mantissa_bits)) - 1 - ((exponent + 127) << self.mantissa_bits) - top

    @property
    def keys(self) -> np.ndarray:
        """The grid cell each layout cell stands for (increasing); the first, negative overflow, is key 0."""
        last = (1 << self.mantissa_bits) - 1
        zero = 1 << (8 + self.mantissa_bits)
        negative = np.arange(self._negative_key(self.exponent_max, last), self._negative_key(self.exponent_min, 0) + 1)
        positive = np.arange(self._positive_key(self.exponent_min, 0), self._positive_key(self.exponent_max, last) + 1)
        return np.concatenate([[0], negative, [negative[-1] + 1, zero, zero + 1], positive,
                               [positive[-1] + 1]]).astype(np.int64)

    @property
    def cells(self) -> int:
        """Layout cells per feature, without the missing cell."""
        return 2 * (self.exponent_max - self.exponent_min + 1) * (1 << self.mantissa_bits) + 5

    @property
    def words_per_feature(self) -> int:
        return self.cells + 1

    def words(self, features: int) -> int:
        return features * self.words_per_feature

    def check_size(self, features: int) -> None:
        if not 0 < features or self.words(features) > MAX_GRID_WORDS:
            raise ValueError(f"grid_too_large: {features} features x {self.words_per_feature} cells = "
                             f"{self.words(features)} words, at most {MAX_GRID_WORDS}")

    # ---- counting and pooling

    def dense_counts(self, X: np.ndarray) -> np.ndarray:
        """Bank side: rows per (feature, layout cell), the missing cell last; shape (features, words_per_feature)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"expected a matrix, got shape {X.shape}")
        starts, out = self.keys, np.zeros((X.shape[1], self.words_per_feature), dtype=np.int64)
        for f, column in enumerate(X.T):
            missing = np.isnan(column)
            index = np.searchsorted(starts, cell_keys(column[~missing], self.mantissa_bits), side="right") - 1
            out[f, :self.cells] = np.bincount(index, minlength=self.cells)
            out[f, self.cells] = int(missing.sum())
        return out

    def pooled_cells(self, counts: np.ndarray, min_count: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        """Aggregator side: the pooled dense counts as per-feature (cell, count) pairs, cells holding fewer than
        ``min_count`` pooled rows left out. Every feature must count the same rows (missing included)."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[1] != self.words_per_feature or counts.shape[0] < 1:
            raise ValueError(f"grid_sum_invalid: counts of shape {counts.shape}, expected (features, "
                             f"{self.words_per_feature})")
        totals = counts.sum(axis=1)
        if (counts < 0).any() or len(set(totals.tolist())) != 1 or int(totals[0]) <= 0:
            raise ValueError(f"grid_sum_invalid: features count {sorted(set(totals.tolist()))[:4]} rows; every "
                             "feature must count the same rows (a bank masked with other keys, or lied)")
        keys, result = self.keys, []
        for row in counts[:, :self.cells]:
            keep = row >= max(1, min_count)
            result.append((keys[keep], row[keep]))
        return result

    # ---- on the wire

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "GridLayout":
        if not isinstance(data, dict) or set(data) != {"mantissa_bits", "exponent_min", "exponent_max"}:
            raise ValueError("grid layout: expected exactly mantissa_bits, exponent_min, exponent_max")
        return cls(**data)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GridCountTask(WireMessage):
    """Count the training rows over ``layout`` and mask them for ``session``: its banks and their relayed offers."""

    KIND: ClassVar[str] = "grid count task"
    MAX_BYTES: ClassVar[int] = 2 * 1024 * 1024

    session: str
    banks: list[str]
    offers: dict[str, Any] = field(repr=False)
    layout: dict[str, int]


@dataclass(frozen=True)
class MaskedGridCounts(WireMessage):
    """A bank's grid counts as pairwise-masked uint64 words (base64, little-endian), uniformly random alone."""

    KIND: ClassVar[str] = "masked grid counts"
    MAX_BYTES: ClassVar[int] = 4 * (8 * MAX_GRID_WORDS) // 3 + 4096

    bank: str
    session: str
    words: str = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("bank", "session", "words"):
            if not isinstance(getattr(self, name), str):
                raise WireFormatError(f"masked grid counts: {name} must be a string")

    def word_array(self, words_per_feature: int) -> np.ndarray:
        """The words, whole features of ``words_per_feature`` each and at most ``MAX_GRID_WORDS``; else refused."""
        try:
            raw = base64.b64decode(self.words, validate=True)
        except ValueError:
            raise WireFormatError("masked grid counts: words are not base64") from None
        if not raw or len(raw) % (8 * words_per_feature) or len(raw) > 8 * MAX_GRID_WORDS:
            raise WireFormatError(f"masked grid counts: {len(raw)} bytes are not whole features of "
                                  f"{words_per_feature} words (at most {MAX_GRID_WORDS} words)")
        return np.frombuffer(raw, dtype="<u8").astype(np.uint64)
