"""Validation gate: schema refusal, one test per quarantine rule, nothing lost, data-level checks."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from conftest import txn
from pyspark.sql import functions as F

from pipelines.config import ValidationConfig
from pipelines.conform import ContractError, conform
from pipelines.contract import COLUMN_NAMES
from pipelines.validation import shareable_reasons, training_decision, validate

AS_OF = datetime(2026, 6, 1)
GOOD = [txn(f"ok{i}", f"2026-01-05 10:{i:02d}:00", amount=5.0 + i) for i in range(6)]
# transaction_id -> the reason the gate must give it
BAD_PARQUET = {
    "n1": ("null_transaction_id", txn(None, "2026-01-05 11:00:00")),
    "n2": ("null_event_time", txn("n2", None)),
    "n3": ("null_account_id", txn("n3", "2026-01-05 11:00:00", account=None)),
    "n4": ("null_amount", txn("n4", "2026-01-05 11:00:00", amount=None)),
    "n5": ("null_merchant_id", txn("n5", "2026-01-05 11:00:00", merchant=None)),
    "a1": ("amount_not_positive", txn("a1", "2026-01-05 11:00:00", amount=0.0)),
    "a2": ("amount_not_positive", txn("a2", "2026-01-05 11:00:00", amount=-4.0)),
    "c1": ("currency_malformed", txn("c1", "2026-01-05 11:00:00", currency="eu")),
    "c2": ("currency_without_rate", txn("c2", "2026-01-05 11:00:00", currency="XYZ")),
    "k1": ("country_malformed", txn("k1", "2026-01-05 11:00:00", country="DEU")),
    "h1": ("channel_unknown", txn("h1", "2026-01-05 11:00:00", channel="telepathy")),
    "f1": ("event_time_in_future", txn("f1", "2026-07-01 00:00:00")),
    "l1": ("is_fraud_not_0_1", txn("l1", "2026-01-05 11:00:00", is_fraud=2)),
    "ok0": ("duplicate_transaction_id", txn("ok0", "2026-01-05 12:00:00", amount=99.0)),
}


@pytest.fixture(scope="module")
def parquet_gate(spark, make_raw, config, tmp_path_factory):
    root = tmp_path_factory.mktemp("gate_parquet")
    rows = GOOD + [row for _, row in BAD_PARQUET.values()]
    make_raw(rows).withColumn("branch", F.lit("north")).write.parquet(str(root / "in"))
    report = validate(spark, root / "in", root / "out", config, as_of=AS_OF)
    return root / "out", report


@pytest.fixture(scope="module")
def csv_gate(spark, config, tmp_path_factory):
    root = tmp_path_factory.mktemp("gate_csv")
    header = ",".join(COLUMN_NAMES)
    lines = [
        "g1,2026-01-05T10:00:00Z,a1,12.50,EUR,m1,grocery,card_present,DE,d1,0",
        "u1,yesterday,a1,12.50,EUR,m1,grocery,card_present,DE,d1,0",
        "u2,2026-01-05T10:00:00Z,a1,twelve,EUR,m1,grocery,card_present,DE,d1,0",
        "u3,2026-01-05T10:00:00Z,a1,12.50,EUR,m1,grocery,card_present,DE,d1,yes",
        "g2,2026-01-05T11:00:00+01:00,a1,3,EUR,m1,grocery,card_present,DE,,",
    ]
    (root / "in.csv").write_text("\n".join([header, *lines]) + "\n")
    report = validate(spark, root / "in.csv", root / "out", config, as_of=AS_OF)
    return root / "out", report


@pytest.mark.parametrize("tid", sorted(BAD_PARQUET))
def test_each_rule_quarantines_its_row(spark, parquet_gate, tid):
    out, _ = parquet_gate
    reason, row = BAD_PARQUET[tid]
    quarantine = spark.read.parquet(str(out / "quarantine"))
    match = quarantine.filter(F.col("reason") == reason)
    assert match.count() >= 1, f"no row quarantined as {reason}"
    if row[0] is not None:
        assert tid in {r.transaction_id for r in match.collect()}


def test_valid_rows_and_nothing_lost(spark, parquet_gate):
    out, report = parquet_gate
    valid = spark.read.parquet(str(out / "valid"))
    assert sorted(r.transaction_id for r in valid.collect()) == sorted(r[0] for r in GOOD)
    assert report["input_rows"] == len(GOOD) + len(BAD_PARQUET)
    assert report["valid_rows"] + report["quarantined_rows"] == report["input_rows"]
    assert sum(report["quarantine_reasons"].values()) == report["quarantined_rows"] == len(BAD_PARQUET)
    assert json.loads((out / "report.json").read_text())["valid_rows"] == len(GOOD)


def test_duplicate_keeps_the_first_copy(spark, parquet_gate):
    out, _ = parquet_gate
    kept = spark.read.parquet(str(out / "valid")).filter(F.col("transaction_id") == "ok0").first()
    assert kept.amount == 5.0  # the 10:00 copy stays, the later 12:00 copy is quarantined


def test_quarantine_keeps_every_original_column(spark, parquet_gate):
    out, _ = parquet_gate
    quarantine = spark.read.parquet(str(out / "quarantine"))
    assert quarantine.columns[-1] == "reason"
    assert "branch" in quarantine.columns and "device_id" in quarantine.columns
    assert spark.read.parquet(str(out / "valid")).schema["is_fraud"].dataType.simpleString() == "int"


def test_gx_suite_and_data_docs(parquet_gate):
    out, report = parquet_gate
    assert report["expectations"]["valid_passed"] is True
    failures = report["expectations"]["input_failures"]
    assert failures["expect_column_values_to_be_in_set(channel)"] == 1
    assert failures["expect_column_values_to_be_unique(transaction_id)"] >= 2
    assert (out / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").exists()


def test_too_few_rows_declines_to_train(parquet_gate):
    _, report = parquet_gate
    assert report["training_allowed"] is False
    assert any("too few labelled rows" in r for r in report["decline_reasons"])


def test_csv_unparseable_values_are_quarantined_verbatim(spark, csv_gate):
    out, report = csv_gate
    reasons = {r.transaction_id: (r.reason, r) for r in spark.read.parquet(str(out / "quarantine")).collect()}
    assert reasons["u1"][0] == "unparseable_event_time" and reasons["u1"][1].event_time == "yesterday"
    assert reasons["u2"][0] == "unparseable_amount" and reasons["u2"][1].amount == "twelve"
    assert reasons["u3"][0] == "unparseable_is_fraud"
    valid = {r.transaction_id: r for r in spark.read.parquet(str(out / "valid")).collect()}
    assert set(valid) == {"g1", "g2"}
    assert valid["g2"].event_time == datetime(2026, 1, 5, 10, 0) and valid["g2"].is_fraud is None
    assert report["labelled_rows"] == 1


@pytest.mark.parametrize(
    "labelled, fraud, expected",
    [(5000, 10, []), (500, 1, ["too few labelled rows"]), (5000, 0, ["outside"]), (5000, 400, ["outside"])],
)
def test_training_decision(labelled, fraud, expected):
    rules = ValidationConfig(fraud_rate_min=0.0002, fraud_rate_max=0.05, min_labelled_rows=1000)
    got = training_decision(labelled, fraud, rules)
    assert len(got) == len(expected) and all(e in g for e, g in zip(expected, got))


def test_a_summary_shares_the_failed_rule_never_the_banks_figures():
    rules = ValidationConfig(fraud_rate_min=0.0002, fraud_rate_max=0.05, min_labelled_rows=1000)
    reasons = training_decision(537, 61, rules)  # both rules fail: 537 rows, a rate of 0.11359
    assert any("537" in r for r in reasons) and any("0.11359" in r for r in reasons)  # the bank's own report
    shared = shareable_reasons(reasons)
    assert shared == ["too few labelled rows (fewer than 1000)", "labelled fraud rate outside [0.0002, 0.05]"]
    assert not any(figure in " ".join(shared) for figure in ("537", "61", "0.113"))
    assert shareable_reasons(["a reason the gate never writes: 42 rows"]) == ["declined by the validation gate"]


def test_missing_and_mistyped_columns_refuse_the_input(spark, make_raw):
    df = make_raw(GOOD).drop("merchant_id", "country").withColumn("amount", F.lit("12"))
    with pytest.raises(ContractError) as refused:
        conform(df, "parquet")
    message = str(refused.value)
    assert "missing column 'merchant_id'" in message and "missing column 'country'" in message
    assert "column 'amount' has type string, expected double" in message


def test_widened_types_are_accepted(spark, make_raw):
    df = (
        make_raw(GOOD)
        .withColumn("amount", F.col("amount").cast("int"))
        .withColumn("is_fraud", F.col("is_fraud").cast("double"))
    )
    conformed = conform(df, "parquet")
    assert dict(conformed.dtypes)["amount"] == "double"


def test_input_counts_equal_the_gx_suite_on_the_input(spark, parquet_gate, tmp_path, config):
    """The gate counts the input's problems in its one aggregation; GX itself agrees on the same rows."""
    from pipelines.expectations import contract_expectations, run_suite

    out, report = parquet_gate
    conformed = conform(spark.read.parquet(str(out.parent / "in")), "parquet").select(*COLUMN_NAMES)
    known = sorted(config.features.rates_to_base)
    gx = run_suite(conformed, contract_expectations(known, AS_OF), tmp_path, "input", result_format="BASIC")
    counted = report["expectations"]["input_failures"]
    assert set(counted) == set(gx.failures)
    for key, count in gx.failures.items():
        if count is not None:  # the max-event-time expectation has no row count in GX
            assert counted[key] == count, key
    assert counted["expect_column_max_to_be_between(event_time)"] == 1


def test_clean_input_writes_an_empty_quarantine_with_its_schema(spark, make_raw, config, tmp_path):
    """Every row valid: quarantine/ is still written (empty, input columns + reason) and the counts add up."""
    make_raw(GOOD).withColumn("branch", F.lit("north")).write.parquet(str(tmp_path / "in"))
    report = validate(spark, tmp_path / "in", tmp_path / "out", config, as_of=AS_OF)
    quarantine = spark.read.parquet(str(tmp_path / "out" / "quarantine"))
    assert quarantine.count() == 0 and quarantine.columns == [*COLUMN_NAMES, "branch", "reason"]
    assert report["input_rows"] == report["valid_rows"] == len(GOOD) and report["quarantined_rows"] == 0
    assert set(report["quarantine_reasons"].values()) == {0}
    assert report["labelled_rows"] == len(GOOD) and report["expectations"]["input_failures"] == {}


def test_a_repeated_id_keeps_its_only_valid_copy(spark, make_raw, config, tmp_path):
    """An id whose earlier copy breaks a rule: that copy is quarantined for the rule, the valid one stays."""
    rows = [*GOOD, txn("ok1", "2026-01-05 09:00:00", amount=-1.0), txn("ok1", "2026-01-05 09:00:00", currency="XYZ")]
    make_raw(rows).write.parquet(str(tmp_path / "in"))
    report = validate(spark, tmp_path / "in", tmp_path / "out", config, as_of=AS_OF)
    valid = spark.read.parquet(str(tmp_path / "out" / "valid")).filter(F.col("transaction_id") == "ok1")
    assert [r.amount for r in valid.collect()] == [6.0]
    quarantine = spark.read.parquet(str(tmp_path / "out" / "quarantine"))
    assert sorted(r.reason for r in quarantine.collect()) == ["amount_not_positive", "currency_without_rate"]
    assert report["quarantine_reasons"]["duplicate_transaction_id"] == 0
    assert report["expectations"]["input_failures"]["expect_column_values_to_be_unique(transaction_id)"] == 3
