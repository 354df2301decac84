"""History features of sorted accounts as numpy kernels: arrays in, arrays out (no Spark, no I/O).

Rows arrive sorted by (account, event time, transaction id), each account's rows contiguous.
The kernels reproduce the Spark window definitions of ``pipelines.features`` value for value:

* growing frames (prior mean, max, sample std) add one row at a time in row order, as Spark's
  running aggregates do (the sum, then ``sum / count``; Welford's update for the std);
* a trailing range ``[t - w, t)`` is summed from its first row on, as Spark re-sums a sliding
  frame; the same-instant rows up to this one are a separate running sum added to it;
* counts are exact integer differences of running totals;
* comparisons follow Spark's ordering of NaN (greater than every number), nulls propagate.

A nullable result is ``(values, valid)``; ``valid`` is a boolean mask (False = null).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_KEY_LIMIT = 2**62  # compressed time keys stay below this, so int64 arithmetic never overflows


@dataclass(frozen=True)
class Segments:
    """Contiguous runs of rows (accounts, or instants of an account) laid out for sequential scans."""

    starts: np.ndarray  # bool: the run's first row
    ids: np.ndarray  # run number of each row
    first: np.ndarray  # first row of each run
    position: np.ndarray  # row's place in its run (0 = first)
    by_position: np.ndarray  # rows ordered by (position, run)
    bounds: np.ndarray  # by_position[bounds[p]:bounds[p + 1]] are the rows at position p

    @classmethod
    def of(cls, starts: np.ndarray) -> Segments:
        n = len(starts)
        ids = np.cumsum(starts) - 1
        first = np.flatnonzero(starts)
        position = np.arange(n) - first[ids] if n else np.zeros(0, np.int64)
        by_position = np.argsort(position, kind="stable")
        longest = int(position.max()) + 1 if n else 0
        bounds = np.searchsorted(position[by_position], np.arange(longest + 1))
        return cls(starts, ids, first, position, by_position, bounds)

    def rows_at(self):
        """(rows, run ids) at each position in turn: one vectorized step per position."""
        for p in range(len(self.bounds) - 1):
            rows = self.by_position[self.bounds[p]:self.bounds[p + 1]]
            yield rows, self.ids[rows]


def run_starts(codes: np.ndarray) -> np.ndarray:
    """True where a run of equal values begins (the array is grouped, not necessarily sorted)."""
    starts = np.ones(len(codes), bool)
    if len(codes):
        starts[1:] = codes[1:] != codes[:-1]
    return starts


def spark_positive(x: np.ndarray) -> np.ndarray:
    """``x > 0`` as Spark compares doubles: NaN is greater than every number."""
    return (x > 0) | np.isnan(x)


def prior_stats(x: np.ndarray, ok: np.ndarray, accounts: Segments) -> dict[str, np.ndarray]:
    """Each row's aggregates over the account's earlier rows (nulls skipped), added in row order:
    ``sum``/``count`` (Spark's avg), ``max`` (``-inf`` when none) and Welford's ``n``/``m2``."""
    g = len(accounts.first)
    state = {"sum": np.zeros(g), "count": np.zeros(g, np.int64), "max": np.full(g, -np.inf),
             "n": np.zeros(g), "avg": np.zeros(g), "m2": np.zeros(g)}
    out = {k: np.empty(len(x), v.dtype) for k, v in state.items()}
    xz = np.where(ok, x, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        for rows, ids in accounts.rows_at():
            for k, v in state.items():
                out[k][rows] = v[ids]
            value, take = xz[rows], ok[rows]
            state["sum"][ids] = state["sum"][ids] + value
            state["count"][ids] += take
            state["max"][ids] = np.where(take, np.maximum(state["max"][ids], value), state["max"][ids])
            n, avg, m2 = state["n"][ids], state["avg"][ids], state["m2"][ids]
            new_n = n + 1.0
            delta = value - avg
            delta_n = delta / new_n
            state["n"][ids] = np.where(take, new_n, n)
            state["avg"][ids] = np.where(take, avg + delta_n, avg)
            state["m2"][ids] = np.where(take, m2 + delta * (delta - delta_n), m2)
    return out


def running_sum(x: np.ndarray, runs: Segments) -> np.ndarray:
    """Inclusive sum within each run, added in row order (``x`` holds 0.0 for nulls)."""
    out, acc = np.empty(len(x)), np.zeros(len(runs.first))
    with np.errstate(invalid="ignore", over="ignore"):
        for rows, ids in runs.rows_at():
            acc[ids] = acc[ids] + x[rows]
            out[rows] = acc[ids]
    return out


def range_sum(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``x[lo:hi]`` summed from ``lo`` on for each row, starting at 0.0 (Spark re-sums a sliding frame)."""
    length = hi - lo
    order = np.argsort(-length, kind="stable")
    starts, lengths = lo[order], length[order]
    acc = np.zeros(len(x))
    active_by_step = np.searchsorted(-lengths, -np.arange(int(lengths.max(initial=0))), side="left")
    with np.errstate(invalid="ignore", over="ignore"):
        for step, active in enumerate(active_by_step):
            acc[:active] += x[starts[:active] + step]
    out = np.empty(len(x))
    out[order] = acc
    return out


def time_keys(micros: np.ndarray, accounts: Segments, widest: int) -> np.ndarray | None:
    """A strictly grouped, int64 time key with ``key_i - key_j == t_i - t_j`` whenever that is at most
    ``widest`` within an account: gaps wider than ``widest`` shrink to ``widest + 1`` (no window of
    at most ``widest`` can tell) and accounts are ``widest + 1`` apart. None if it would overflow."""
    steps = np.empty(len(micros), np.int64)
    if len(micros):
        steps[0] = 0
        steps[1:] = np.minimum(np.diff(micros), widest + 1)
        steps[accounts.first[1:]] = widest + 1
    if float(steps.sum(dtype=np.float64)) >= _KEY_LIMIT:
        return None
    return np.cumsum(steps)


def window_starts(micros: np.ndarray, accounts: Segments, seconds: list[int]) -> dict[int, np.ndarray]:
    """For each window ``w`` (s) and row: the account's first row at or after ``t - w``; for 0, the
    first row of this instant."""
    lags = {s: s * 1_000_000 for s in seconds} | {0: 0}
    keys = time_keys(micros, accounts, max(lags.values()))
    if keys is not None:
        return {s: np.searchsorted(keys, keys - lag, side="left") for s, lag in lags.items()}
    out = {s: np.empty(len(micros), np.int64) for s in lags}  # huge spans: one account at a time
    ends = np.append(accounts.first[1:], len(micros))
    for start, end in zip(accounts.first, ends):
        times = micros[start:end]
        for s, lag in lags.items():
            out[s][start:end] = start + np.searchsorted(times, times - lag, side="left")
    return out


def first_uses(codes: np.ndarray, ok: np.ndarray, accounts: Segments) -> np.ndarray:
    """1 on the first row of each (account, non-null value) in row order, else 0."""
    flags = np.zeros(len(codes), np.int8)
    rows = np.flatnonzero(ok)
    key = accounts.ids[rows].astype(np.int64) * (int(codes.max(initial=0)) + 1) + codes[rows]
    _, first = np.unique(key, return_index=True)
    flags[rows[first]] = 1
    return flags


def counts_since(totals: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``totals`` is an inclusive running total over the whole array: the part from ``starts`` on."""
    before = np.concatenate([[0], totals])[starts]
    return totals - before


Column = tuple[np.ndarray, np.ndarray | None]  # (values, valid mask or None when never null)


def history(
    accounts: np.ndarray,
    micros: np.ndarray,
    amount: Column,
    small: Column,
    values: dict[str, Column],
    windows: dict[str, int],
    burst_seconds: int,
) -> dict[str, Column]:
    """Every history feature of sorted rows, as doubles / integers before the contract's casts.

    ``accounts`` are account codes (grouped), ``amount`` the base amount, ``small`` the 0/1
    small-amount flag, ``values`` the codes of device, merchant, country and channel.
    """
    n = len(micros)
    groups = Segments.of(run_starts(accounts))
    x, x_ok = amount[0].astype(np.float64), _mask(amount, n)
    starts = window_starts(micros, groups, [*windows.values(), burst_seconds, 86_400])
    instant = starts[0]
    upto_count = np.cumsum(x_ok, dtype=np.int64)
    out: dict[str, Column] = {"prior_txn_count": (groups.position, None)}
    since_prev = np.diff(micros, prepend=micros[:1]) / 1e6
    out["seconds_since_prev_txn"] = (since_prev, ~groups.starts)

    prior = prior_stats(x, x_ok, groups)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean_ok = prior["count"] > 0
        mean = prior["sum"] / np.maximum(prior["count"], 1)
        std_ok = prior["n"] >= 2.0
        std = np.sqrt(prior["m2"] / np.where(std_ok, prior["n"] - 1.0, 1.0))
        max_ok = prior["count"] > 0
        out["amount_to_prior_mean"] = (x / mean, x_ok & mean_ok & spark_positive(mean))
        out["amount_to_prior_max"] = (x / prior["max"], x_ok & max_ok & spark_positive(prior["max"]))
        out["amount_zscore"] = ((x - mean) / std, x_ok & mean_ok & std_ok & spark_positive(std))

    xz = np.where(x_ok, x, 0.0)
    same_instant = Segments.of(_starts_at(instant, n))
    same_sum = running_sum(xz, same_instant)
    same_ok = counts_since(upto_count, instant) > 0
    with np.errstate(invalid="ignore", over="ignore"):
        for name, seconds in windows.items():
            out[f"txn_count_{name}"] = (counts_since(upto_count, starts[seconds]), None)
            earlier = range_sum(xz, starts[seconds], instant)
            out[f"amount_sum_{name}"] = (earlier + same_sum, same_ok)

    s, s_ok = small[0].astype(np.int64), _mask(small, n)
    small_total = np.cumsum(np.where(s_ok, s, 0))
    small_seen = counts_since(np.cumsum(s_ok, dtype=np.int64), groups.first[groups.ids]) > 0
    out["small_count_burst"] = (counts_since(small_total, starts[burst_seconds]), small_seen)

    for name, (codes, _) in values.items():
        out[f"first_{name}"] = (first_uses(codes, _mask(values[name], n), groups), None)
    for name, feature in (("merchant", "new_merchants_24h"), ("device", "new_devices_24h")):
        out[feature] = (counts_since(np.cumsum(out[f"first_{name}"][0], dtype=np.int64), starts[86_400]), None)

    country, country_ok = values["country"][0], _mask(values["country"], n)
    home = groups.first[groups.ids]
    out["away_from_first_country"] = (country != country[home], country_ok & country_ok[home])
    return out


def _mask(column: Column, n: int) -> np.ndarray:
    return np.ones(n, bool) if column[1] is None else column[1]


def _starts_at(first_rows: np.ndarray, n: int) -> np.ndarray:
    starts = np.zeros(n, bool)
    starts[first_rows] = True
    return starts
