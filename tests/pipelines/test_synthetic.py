"""Tests for the synthetic consortium generator (small data, no Spark)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.contract import CHANNELS, COLUMN_NAMES, COUNTRY_PATTERN, CURRENCY_PATTERN
from pipelines.synthetic import (
    CONFIG_PATH,
    DEFAULT_START,
    LATE_ARRIVAL,
    RARE_TYPOLOGY_WEIGHT,
    TYPOLOGIES,
    bank_profiles,
    generate_bank,
    write_banks,
)

SEED, N_BANKS, TOTAL_ROWS, DAYS = 11, 5, 200_000, 30
FEATURES = yaml.safe_load(CONFIG_PATH.read_text())["features"]
TYPOLOGY_CHANNEL = {"card_testing": "ecommerce", "mule_transfer": "transfer", "atm_cashout": "atm"}
CHANNEL_TYPOLOGIES = {"atm": {"atm_cashout"}, "transfer": {"mule_transfer", "account_takeover"},
                      "ecommerce": {"card_testing", "account_takeover"}}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("banks")
    return out, write_banks(out, N_BANKS, TOTAL_ROWS, SEED, days=DAYS)


@pytest.fixture(scope="module")
def tables(written):
    return {bank: pq.read_table(path) for bank, path in written[1].items()}


def test_same_seed_gives_identical_data_and_files(written, tmp_path):
    profile = bank_profiles(2, SEED)[1]
    assert generate_bank(profile, 3000, SEED, DEFAULT_START, DAYS).equals(
        generate_bank(profile, 3000, SEED, DEFAULT_START, DAYS))
    again = write_banks(tmp_path, N_BANKS, TOTAL_ROWS, SEED, days=DAYS)
    for bank, path in written[1].items():
        assert path.read_bytes() == again[bank].read_bytes()


def test_different_seed_gives_different_data():
    profile = bank_profiles(1, SEED)[0]
    one = generate_bank(profile, 3000, SEED, DEFAULT_START, DAYS)
    other = generate_bank(profile, 3000, SEED + 1, DEFAULT_START, DAYS)
    assert not one.equals(other)
    assert one["amount"].to_pylist() != other["amount"].to_pylist()


def test_schema_matches_contract_in_order(tables):
    expected = pa.schema([
        ("transaction_id", pa.string()), ("event_time", pa.timestamp("us", tz="UTC")),
        ("account_id", pa.string()), ("amount", pa.float64()), ("currency", pa.string()),
        ("merchant_id", pa.string()), ("merchant_category", pa.string()),
        ("channel", pa.string()), ("country", pa.string()), ("device_id", pa.string()),
        ("is_fraud", pa.int32()),
    ])
    for table in tables.values():
        assert tuple(table.column_names) == COLUMN_NAMES
        assert table.schema.equals(expected)


def test_banks_written_in_order_with_nonuniform_sizes(written, tables):
    out, paths = written
    assert list(paths) == ["alpine", "baltic", "celtic", "danube", "elbe"]
    assert all(p == out / bank / "transactions.parquet" for bank, p in paths.items())
    assert not [f for f in out.rglob("*") if f.is_file() and f.name != "transactions.parquet"]
    sizes = [t.num_rows for t in tables.values()]
    assert abs(sum(sizes) - TOTAL_ROWS) <= 0.02 * TOTAL_ROWS
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.4 * sizes[0]


def test_more_than_eight_banks_are_numbered():
    names = [p.name for p in bank_profiles(10, SEED)]
    assert names[:3] == ["alpine", "baltic", "celtic"] and names[8:] == ["bank_09", "bank_10"]


def test_ids_unique_across_banks_and_rows_sorted(tables):
    ids = pa.chunked_array([t["transaction_id"] for t in tables.values()])
    assert pc.count_distinct(ids).as_py() == len(ids)
    for bank, table in tables.items():
        assert all(i.startswith(f"{bank}-") for i in table["transaction_id"].to_pylist()[:100])
        keys = list(zip(table["event_time"].to_pylist(), table["transaction_id"].to_pylist()))
        assert keys == sorted(keys)


def test_event_times_inside_window_and_in_past(tables):
    end = DEFAULT_START + timedelta(days=DAYS)
    assert end < datetime.now(UTC)
    for table in tables.values():
        times = table["event_time"]
        assert pc.min(times).as_py() >= DEFAULT_START and pc.max(times).as_py() < end


def test_values_respect_contract_and_config(tables):
    profiles = {p.name: p for p in bank_profiles(N_BANKS, SEED)}
    for bank, table in tables.items():
        for name in COLUMN_NAMES[:-2]:
            assert table[name].null_count == 0, name
        assert pc.min(table["amount"]).as_py() > 0
        assert pc.unique(table["currency"]).to_pylist() == [profiles[bank].currency]
        assert profiles[bank].currency in FEATURES["rates_to_base"]
        assert re.match(CURRENCY_PATTERN, profiles[bank].currency)
        assert all(re.match(COUNTRY_PATTERN, c) for c in pc.unique(table["country"]).to_pylist())
        assert set(pc.unique(table["channel"]).to_pylist()) == set(CHANNELS)
        categories = set(pc.unique(table["merchant_category"]).to_pylist())
        assert categories <= set(FEATURES["merchant_categories"])
        df = table.select(["channel", "merchant_category", "device_id", "country"]).to_pandas()
        assert set(df.loc[df.channel == "atm", "merchant_category"]) == {"cash"}
        assert set(df.loc[df.channel == "transfer", "merchant_category"]) == {"p2p"}
        digital = df.channel.isin(["ecommerce", "transfer"])
        assert df.device_id[digital].notna().all() and df.device_id[~digital].isna().all()
        assert (df.country == profiles[bank].home_country).mean() > 0.8


def test_spend_is_comparable_in_eur_across_currencies(tables):
    medians = [pc.approximate_median(t["amount"]).as_py() * FEATURES["rates_to_base"][
        t["currency"][0].as_py()] for t in tables.values()]
    assert max(medians) / min(medians) < 1.5


def test_fraud_rate_per_bank_within_band(tables):
    for p in bank_profiles(N_BANKS, SEED):
        table = tables[p.name]
        rate = pc.mean(table["is_fraud"]).as_py()
        assert 0.0005 <= rate <= 0.01
        # unreported fraud is labelled 0 on top: the labelled count is the profile's exactly
        assert pc.sum(table["is_fraud"]).as_py() == round(p.fraud_rate * table.num_rows)


def test_profiles_have_distinct_dominant_typologies():
    profiles = bank_profiles(N_BANKS, SEED)
    for p in profiles:
        assert set(p.typology_weights) == set(TYPOLOGIES)
        assert sum(p.typology_weights.values()) == pytest.approx(1.0)
        assert 1 <= len(p.dominant_typologies) <= 2
        assert min(p.typology_weights.values()) == pytest.approx(RARE_TYPOLOGY_WEIGHT)
        assert 0.001 <= p.fraud_rate <= 0.005
    assert len({p.dominant_typologies for p in profiles}) == len(profiles)
    assert {t for p in profiles for t in p.dominant_typologies} == set(TYPOLOGIES)


def test_realised_fraud_reflects_each_banks_typologies(tables):
    for p in bank_profiles(N_BANKS, SEED):
        fraud = tables[p.name].filter(pc.equal(tables[p.name]["is_fraud"], 1)).to_pandas()
        channel_share = fraud.channel.value_counts(normalize=True)
        expected = {TYPOLOGY_CHANNEL[t] for t in p.dominant_typologies if t in TYPOLOGY_CHANNEL}
        if len(p.dominant_typologies) == 1 and expected:
            assert channel_share.idxmax() == expected.pop(), p.name
        if "atm_cashout" not in p.dominant_typologies:  # a rarely seen typology stays rare
            assert channel_share.get("atm", 0.0) < 0.15, p.name


def test_rare_typologies_arrive_late(tables):
    """Fraud on a channel that only a bank's rare typologies use starts late in its window."""
    late, checked = DEFAULT_START + timedelta(days=(1 - LATE_ARRIVAL) * DAYS), 0
    for p in bank_profiles(N_BANKS, SEED):
        fraud = tables[p.name].filter(pc.equal(tables[p.name]["is_fraud"], 1)).to_pandas()
        for channel, typologies in CHANNEL_TYPOLOGIES.items():
            if not typologies & set(p.dominant_typologies):
                times = fraud.event_time[fraud.channel == channel]
                assert (times >= late).all(), (p.name, channel)
                checked += len(times)
    assert checked >= 20


def test_fraud_overlaps_legitimate_behaviour(tables):
    """Legitimate look-alikes for each fraud signal; some fraud uses the customer's own device."""
    known = []
    for p in bank_profiles(N_BANKS, SEED):
        df = tables[p.name].to_pandas().sort_values("event_time")
        legit, fraud = df[df.is_fraud == 0], df[df.is_fraud == 1]
        assert (legit.event_time.dt.hour < 6).mean() > 0.04  # night owls, not only fraudsters
        atm_abroad = legit[(legit.channel == "atm") & (legit.country != p.home_country)]
        tourist_bursts = atm_abroad.groupby("account_id").event_time.diff() < pd.Timedelta(hours=4)
        assert tourist_bursts.sum() > 20, p.name
        eur = legit.amount * FEATURES["rates_to_base"][p.currency]
        assert ((legit.channel == "transfer") & (eur >= 1000)).sum() > 20, p.name  # rent, car
        first_legit = legit.groupby(["account_id", "device_id"]).event_time.min().rename("first")
        digital = fraud.dropna(subset=["device_id"]).join(first_legit, on=["account_id", "device_id"])
        known += (digital["first"] < digital.event_time).tolist()
    assert 0.1 < np.mean(known) < 0.7  # remote access and mules vs a fraudster's new device


def _id_shapes(ids) -> set[str]:
    return set(ids.dropna().str.replace(r"\d", "9", regex=True))


def test_fraud_is_not_separable_by_id_format_or_category(tables):
    for table in tables.values():
        df = table.to_pandas()
        fraud, legit = df[df.is_fraud == 1], df[df.is_fraud == 0]
        assert _id_shapes(fraud.merchant_id) <= _id_shapes(legit.merchant_id)
        assert _id_shapes(fraud.device_id) <= _id_shapes(legit.device_id)
        assert set(fraud.merchant_category) <= set(legit.merchant_category)
        assert fraud.account_id.isin(set(legit.account_id)).all()


def test_card_testing_shows_tiny_bursts_and_legit_tiny_payments_exist(tables):
    baltic = tables["baltic"].to_pandas()  # card testing dominates
    eur = baltic.amount * FEATURES["rates_to_base"]["SEK"]
    fraud = baltic[(baltic.is_fraud == 1) & (eur < 2)]
    assert len(fraud) >= 10
    gaps = fraud.sort_values("event_time").groupby("account_id").event_time.diff().dropna()
    assert (gaps < np.timedelta64(10, "m")).mean() > 0.8
    assert ((baltic.is_fraud == 0) & (eur < 2)).sum() > len(fraud)  # legit look-alikes


def test_unlabelled_days_null_only_in_last_days(tmp_path):
    paths = write_banks(tmp_path, 2, 20_000, SEED, days=DAYS, unlabelled_days=5)
    cutoff = DEFAULT_START + timedelta(days=DAYS - 5)
    for path in paths.values():
        df = pq.read_table(path).to_pandas()
        recent = df.event_time >= cutoff
        assert recent.any() and (~recent).any()
        assert df.is_fraud[recent].isna().all() and df.is_fraud[~recent].notna().all()


def test_window_reaching_into_future_is_rejected():
    profile = bank_profiles(1, SEED)[0]
    with pytest.raises(ValueError, match="past"):
        generate_bank(profile, 1000, SEED, datetime.now(UTC) - timedelta(days=1), 30)
