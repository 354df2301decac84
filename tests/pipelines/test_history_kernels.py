"""The numpy history kernels: against plain loops, and the Arrow pass against the Spark windows."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from conftest import txn
from pyspark.testing import assertDataFrameEqual
from window_reference import reference_features

from pipelines import history_kernels as hk
from pipelines.features import FIRST_USE_COLUMNS, build_features
from pipelines.history_pass import history_batches, history_names


def sorted_rows(seed: int, n: int = 400, accounts: int = 12, instants: int = 40):
    """Account codes and micros sorted by (account, time), with many same-instant ties."""
    rng = np.random.default_rng(seed)
    acc = rng.integers(0, accounts, n)
    micros = rng.integers(0, instants, n) * 1_800_000_000 + rng.choice([0, 0, 1], n)
    order = np.lexsort((micros, acc))
    return acc[order], micros[order], rng


def test_range_sum_adds_each_frame_from_its_first_row():
    rng = np.random.default_rng(1)
    x = rng.choice([1e16, 1.0, -1e16, 0.1, 3.3, np.nan], 300, p=[0.2, 0.3, 0.2, 0.15, 0.149, 0.001])
    lo = rng.integers(0, 300, 300)
    hi = np.minimum(lo + rng.integers(0, 40, 300), 300)
    got = hk.range_sum(x, lo, hi)
    for i in range(300):
        acc = 0.0
        for v in x[lo[i]:hi[i]]:
            acc += v
        assert got[i] == acc or (np.isnan(got[i]) and np.isnan(acc)), i


def test_running_sum_and_prior_stats_follow_row_order():
    acc, _, rng = sorted_rows(2)
    x = rng.choice([1e16, 1.0, -1e16, 0.25, 7.0], len(acc))
    ok = rng.random(len(acc)) > 0.1
    groups = hk.Segments.of(hk.run_starts(acc))
    running = hk.running_sum(np.where(ok, x, 0.0), groups)
    prior = hk.prior_stats(x, ok, groups)
    state: dict = {}
    for i, a in enumerate(acc):
        s, c, mx, n, avg, m2, run = state.get(a, (0.0, 0, -np.inf, 0.0, 0.0, 0.0, 0.0))
        assert (prior["sum"][i], prior["count"][i], prior["max"][i]) == (s, c, mx)
        assert (prior["n"][i], prior["avg"][i], prior["m2"][i]) == (n, avg, m2)
        if ok[i]:
            delta = x[i] - avg
            new_n = n + 1.0
            delta_n = delta / new_n
            s, c, mx, n, avg, m2 = s + x[i], c + 1, max(mx, x[i]), new_n, avg + delta_n, m2 + delta * (delta - delta_n)
        run = run + (x[i] if ok[i] else 0.0)
        assert running[i] == run
        state[a] = (s, c, mx, n, avg, m2, run)


def test_window_starts_and_first_uses_match_brute_force(monkeypatch):
    acc, micros, rng = sorted_rows(3)
    groups = hk.Segments.of(hk.run_starts(acc))
    seconds = [1800, 3600, 86_400]
    got = hk.window_starts(micros, groups, seconds)
    for s in [*seconds, 0]:
        for i in range(len(acc)):
            expected = min(j for j in range(len(acc)) if acc[j] == acc[i] and micros[j] >= micros[i] - s * 1_000_000)
            assert got[s][i] == expected, (s, i)
    monkeypatch.setattr(hk, "_KEY_LIMIT", 0)  # the one-account-at-a-time path gives the same answer
    assert all((hk.window_starts(micros, groups, seconds)[s] == got[s]).all() for s in got)

    codes = rng.integers(0, 5, len(acc))
    ok = rng.random(len(acc)) > 0.2
    flags = hk.first_uses(codes, ok, groups)
    seen = set()
    for i in range(len(acc)):
        first = bool(ok[i]) and (acc[i], codes[i]) not in seen
        seen |= {(acc[i], codes[i])} if ok[i] else set()
        assert flags[i] == first, i


def test_spark_nan_ordering():
    assert hk.spark_positive(np.array([np.nan, 0.0, -1.0, 2.0])).tolist() == [True, False, False, True]


@pytest.fixture(scope="module")
def edge_cases(make_raw):
    """Ties (ids out of numeric order), window boundaries, NaN/inf/null amounts, null values and accounts,
    single rows."""
    t = datetime(2026, 1, 5, 10)
    rows = [
        txn("x10", t, amount=3.0), txn("x9", t, amount=1e16, device="d2"), txn("x2", t, amount=-1e16 + 1),
        txn("x11", t + timedelta(hours=1), amount=2.0, merchant="m2"),  # exactly 1 h later: in the 1 h window
        txn("x12", t + timedelta(days=1), amount=1.0, merchant="m3"),
        txn("x13", t + timedelta(days=7), amount=4.0, country="FR"),
        txn("x14", t + timedelta(days=7, seconds=1), amount=0.5, device=None),
        txn("solo", t, account="a2", amount=7.0),
        txn("n1", t, account="a3", amount=float("nan")), txn("n2", t + timedelta(minutes=1), account="a3", amount=2.0),
        txn("n3", t + timedelta(minutes=2), account="a3", amount=float("inf")),
        txn("n4", t + timedelta(minutes=3), account="a3", amount=None),
        txn("n5", t + timedelta(minutes=3), account="a3", amount=1.0),
        txn("c1", t, account="a4", country=None, device=None), txn("c2", t, account="a4", country="DE"),
        txn("c3", t + timedelta(seconds=5), account="a4", country="DE", merchant="m9"),
        txn("z1", t, account=None), txn("z2", t + timedelta(minutes=5), account=None, amount=2.0),  # a null account
    ]
    rows += [txn(f"s{i}", t + timedelta(minutes=i // 2), account="a5", amount=1.0) for i in range(7)]
    return make_raw(rows)


@pytest.fixture(scope="module")
def seeded(make_raw):
    """Seeded rows on few instants and few values, with nulls: ties and repeats everywhere."""
    rng = random.Random(11)
    start = datetime(2026, 1, 5)
    rows = []
    for i in range(1500):
        when = start + timedelta(minutes=10 * rng.randrange(300), seconds=rng.choice([0, 0, 0, 1]))
        rows.append(txn(f"r{i}", when, account=f"a{rng.randrange(25)}", amount=rng.choice([0.5, 2.0, 40.0, 1e3, 0.1]),
                        currency=rng.choice(["EUR", "SEK", "USD"]), merchant=rng.choice("mnopq"),
                        device=rng.choice(["d1", "d2", None]), country=rng.choice(["DE", "FR", None]),
                        channel=rng.choice(["atm", "ecommerce"])))
    return make_raw(rows)


@pytest.mark.parametrize("data", ["edge_cases", "seeded"])
def test_arrow_pass_equals_the_spark_windows(request, spark, config, data):
    df = request.getfixturevalue(data)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "7")  # many batches per partition
    try:
        got = build_features(df, config.features)
        expected = reference_features(df, config.features)
        assert got.dtypes == expected.dtypes  # (nullability may differ: the Arrow pass declares every feature nullable)
        assert got.exceptAll(expected).count() == 0 and expected.exceptAll(got).count() == 0
        assertDataFrameEqual(got, expected, checkRowOrder=False, rtol=0.0, atol=0.0)
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")


def test_chunks_of_whole_accounts_give_the_same_features():
    """Batches are regrouped into chunks of whole accounts; any chunk size gives the same rows."""
    acc, micros, rng = sorted_rows(4, n=300, accounts=6)
    table = pa.table({
        "account_id": pa.array([f"a{a}" for a in acc]), "_m": pa.array(micros),
        "amount_base": pa.array(rng.choice([1.0, 4.5, 9e3], len(acc))),
        "is_small_amount": pa.array(np.ones(len(acc), "i4")),
        **{c: pa.array([f"v{v}" for v in rng.integers(0, 3, len(acc))]) for c in FIRST_USE_COLUMNS.values()},
    })
    names = history_names({"1h": 3600}, FIRST_USE_COLUMNS)
    spec = dict(carried=("account_id",), micros="_m", value_columns=FIRST_USE_COLUMNS, windows={"1h": 3600},
                burst_seconds=600, types={n: "float" for n in names})
    whole = pa.Table.from_batches(list(history_batches(table.to_batches(), chunk_rows=10**9, **spec)))
    for chunk_rows in (1, 17, 60):
        parts = list(history_batches(table.to_batches(max_chunksize=13), chunk_rows=chunk_rows, **spec))
        assert len(parts) > 1
        assert pa.Table.from_batches(parts).equals(whole)
