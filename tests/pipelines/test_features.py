"""Feature pipeline: hand-computed values, point-in-time correctness, deterministic order."""

from __future__ import annotations

import pytest
from conftest import txn
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from pipelines.features import build_features, feature_names, feature_types

CHECKED = [
    "transaction_id",
    "amount_base",
    "prior_txn_count",
    "seconds_since_prev_txn",
    "amount_to_prior_mean",
    "txn_count_1h",
    "amount_sum_1h",
    "first_device",
    "first_merchant",
    "first_country",
    "away_from_first_country",
    "is_small_amount",
    "small_count_burst",
    "small_burst",
    "new_merchants_24h",
    "device_missing",
]


@pytest.fixture(scope="module")
def tiny(make_raw):
    return make_raw(
        [
            txn("t1", "2026-01-05 10:00:00", amount=10.0, merchant="m1", device="d1"),
            txn("t2", "2026-01-05 10:30:00", amount=30.0, merchant="m2", channel="ecommerce", device="d1"),
            # Same instant as t2: ordered after it by transaction_id, so it may see t2 but not vice versa.
            txn("t3", "2026-01-05 10:30:00", amount=2.0, merchant="m3", channel="ecommerce", device="d2"),
            txn("t4", "2026-01-05 12:00:00", amount=1.0, merchant="m4", country="FR", device="d2"),
            txn("t5", "2026-01-05 10:00:00", account="a2", amount=100.0, currency="SEK", country="SE", device=None),
            txn("b1", "2026-01-05 09:00:00", account="a3", amount=1.0, merchant="m9"),
            txn("b2", "2026-01-05 09:02:00", account="a3", amount=1.5, merchant="m9"),
            txn("b3", "2026-01-05 09:04:00", account="a3", amount=0.5, merchant="m9"),
        ]
    )


def test_hand_computed_values(spark, config, tiny):
    got = build_features(tiny, config.features).select(*CHECKED)
    rows = [
        # id, base, prior, secs, ratio, cnt1h, sum1h, f_dev, f_mer, f_cty, away, small, burst_n, burst,
        # new_m24h, dev_missing
        ("t1", 10.0, 0.0, None, None, 1.0, 10.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        ("t2", 30.0, 1.0, 1800.0, 3.0, 2.0, 40.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0),
        ("t3", 2.0, 2.0, 0.0, 0.1, 3.0, 42.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 3.0, 0.0),
        ("t4", 1.0, 3.0, 5400.0, 1.0 / 14.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 4.0, 0.0),
        ("t5", 8.8, 0.0, None, None, 1.0, 8.8, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0),
        ("b1", 1.0, 0.0, None, None, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0),
        ("b2", 1.5, 1.0, 120.0, 1.5, 2.0, 2.5, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 1.0, 0.0),
        ("b3", 0.5, 2.0, 120.0, 0.4, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 1.0, 3.0, 1.0, 1.0, 0.0),
    ]
    integral = [f.dataType.typeName() in ("byte", "integer") for f in got.schema.fields]
    typed = [tuple(int(v) if whole and v is not None else v for v, whole in zip(row, integral)) for row in rows]
    expected = spark.createDataFrame(typed, got.schema)
    assertDataFrameEqual(got, expected, checkRowOrder=False, rtol=1e-9)


def test_output_columns_follow_the_contract(config, tiny):
    featured = build_features(tiny, config.features)
    assert featured.columns == [
        "transaction_id",
        "account_id",
        "event_time",
        "is_fraud",
        *feature_names(config.features),
    ]
    types = feature_types(config.features)
    assert {name: dict(featured.dtypes)[name] for name in types} == types
    assert set(types.values()) == {"tinyint", "int", "float"}


def test_time_of_day_and_categoricals(config, tiny):
    row = build_features(tiny, config.features).filter(F.col("transaction_id") == "t4").first()
    assert (row.hour, row.weekday, row.is_night) == (12.0, 0.0, 0.0)  # 2026-01-05 is a Monday
    assert (row.channel_card_present, row.channel_ecommerce, row.mcc_grocery, row.mcc_other) == (1.0, 0.0, 1.0, 0.0)


def test_unknown_category_maps_to_other(make_raw, config):
    df = make_raw([txn("x1", "2026-01-05 10:00:00", category="pet_shop")])
    row = build_features(df, config.features).first()
    assert row.mcc_other == 1.0 and row.mcc_grocery == 0.0


def test_no_leakage_when_later_rows_are_appended(make_raw, config, tiny):
    """Appending later events (and same-instant events ordered later) changes no earlier row."""
    later = make_raw(
        [
            txn("t9", "2026-01-05 12:00:00", amount=5000.0, merchant="m1", device="d1"),  # ties t4, sorts after it
            txn("t10", "2026-01-05 12:20:00", amount=0.2, merchant="m7", country="US", device="d7"),
            txn("b4", "2026-01-05 09:05:00", account="a3", amount=0.1, merchant="zz"),
            txn("t6", "2026-01-08 10:00:00", account="a2", amount=9e5, currency="SEK", country="NO", device="dx"),
        ]
    )
    before = build_features(tiny, config.features)
    after = build_features(tiny.unionByName(later), config.features).join(
        tiny.select("transaction_id"), "transaction_id", "left_semi"
    )
    assertDataFrameEqual(after, before, checkRowOrder=False, rtol=0.0, atol=0.0)


def test_same_input_gives_same_features(config, tiny):
    first = build_features(tiny, config.features)
    second = build_features(tiny.orderBy(F.rand(3)), config.features)
    assertDataFrameEqual(first, second, checkRowOrder=False, rtol=0.0, atol=0.0)


@pytest.fixture(scope="module")
def crowded(make_raw):
    """Seeded events on few instants (many ties, many exactly 24 h apart) and few values per column."""
    import random
    from datetime import datetime, timedelta

    rng = random.Random(5)
    start = datetime(2026, 1, 5)
    rows = []
    for i in range(160):
        when = start + timedelta(hours=6 * rng.randrange(14), seconds=rng.choice([0, 0, 0, 1]))
        rows.append(txn(f"x{i:03d}", when, account=rng.choice(["a1", "a2", "a3"]), merchant=rng.choice("mnop"),
                        device=rng.choice(["d1", "d2", "d3", None]), country=rng.choice(["DE", "FR"]),
                        channel=rng.choice(["card_present", "ecommerce"])))
    return make_raw(rows)


def test_first_uses_match_a_per_value_ordering_and_a_self_join(spark, config, crowded):
    """First-use flags equal "first row of (account, value) in (time, id) order"; new merchants and
    devices in 24 h equal the count of those first rows in ``[t - 24h, t]`` up to this row."""
    from pyspark.sql import Window

    got = build_features(crowded, config.features)
    ref = crowded
    for name, column in {"device": "device_id", "merchant": "merchant_id", "country": "country",
                         "channel": "channel"}.items():
        order = Window.partitionBy("account_id", column).orderBy("event_time", "transaction_id")
        first = F.col(column).isNotNull() & (F.row_number().over(order) == 1)
        ref = ref.withColumn(f"first_{name}", first.cast("int"))
    a, b = ref.alias("a"), ref.alias("b")
    upto = (F.col("b.event_time") < F.col("a.event_time")) | (
        (F.col("b.event_time") == F.col("a.event_time")) & (F.col("b.transaction_id") <= F.col("a.transaction_id"))
    )
    day = (F.col("b.event_time") >= F.col("a.event_time") - F.expr("INTERVAL 24 HOURS")) & upto
    counted = a.join(b, (F.col("a.account_id") == F.col("b.account_id")) & day).groupBy("a.transaction_id").agg(
        F.sum("b.first_merchant").alias("new_merchants_24h"), F.sum("b.first_device").alias("new_devices_24h")
    )
    flags = ["first_device", "first_merchant", "first_country", "first_channel"]
    expected = ref.select("transaction_id", *flags).join(counted, "transaction_id")
    actual = got.select("transaction_id", *flags, "new_merchants_24h", "new_devices_24h")
    assert expected.count() == crowded.count()
    assert actual.filter(F.col("new_merchants_24h") > 1).count() > 0  # the fixture exercises the windows
    expected = expected.select(*[F.col(n).cast(t).alias(n) for n, t in actual.dtypes])
    assertDataFrameEqual(actual, expected, checkRowOrder=False)


def test_one_shuffle_one_sort_and_one_arrow_pass_per_account(config, tiny):
    """The history features read the one sort of each account's rows in one Arrow pass: no second
    exchange or sort of whole rows, and no window operator."""
    plan = build_features(tiny, config.features)._jdf.queryExecution().executedPlan().toString()
    operators = [line.strip(" +-:").split(" ")[0] for line in plan.splitlines()]
    assert operators.count("Exchange") == 1 and operators.count("Sort") == 1, plan
    assert operators.count("MapInArrow") == 1 and operators.count("Window") == 0, plan
