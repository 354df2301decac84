"""``fedfraud features`` as one job: the gate's valid rows are written once, with their features."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F
from test_validation import AS_OF, BAD_PARQUET, GOOD

from pipelines.build import FEATURES_DIR, VALIDATION_DIR, build_bank_features
from pipelines.contract import COLUMN_NAMES
from pipelines.features import build_features, feature_names, feature_types
from pipelines.validation import Gate, GateError, validate

SAME = ("input_rows", "valid_rows", "quarantined_rows", "quarantine_reasons", "labelled_rows", "fraud_rows",
        "event_time_min", "event_time_max", "training_allowed", "expectations")


@pytest.fixture(scope="module")
def mixed_input(make_raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("build_mixed")
    rows = GOOD + [row for _, row in BAD_PARQUET.values()]
    make_raw(rows).withColumn("branch", F.lit("north")).write.parquet(str(root / "in"))
    return root / "in"


def test_one_job_gives_the_gates_rows_and_the_features_of_the_gate_then_features(
        spark, config, mixed_input, tmp_path):
    built = build_bank_features(spark, mixed_input, tmp_path / "bank", config, as_of=AS_OF)
    gated = validate(spark, mixed_input, tmp_path / "gate", config, as_of=AS_OF)
    assert {k: built[k] for k in SAME} == {k: gated[k] for k in SAME}
    assert built["valid_path"] == str(tmp_path / "bank" / FEATURES_DIR)
    assert not (tmp_path / "bank" / VALIDATION_DIR / "valid").exists()  # no second copy of the valid rows

    written = spark.read.parquet(str(tmp_path / "bank" / FEATURES_DIR))
    valid = spark.read.parquet(str(tmp_path / "gate" / "valid"))
    assert written.columns == [*dict.fromkeys(["transaction_id", "account_id", "event_time", "is_fraud",
                                                *valid.columns]), *feature_names(config.features)]
    assert written.select(*valid.columns).exceptAll(valid).count() == 0
    assert valid.exceptAll(written.select(*valid.columns)).count() == 0
    expected = build_features(valid, config.features)
    assert written.select(*expected.columns).exceptAll(expected).count() == 0
    assert expected.exceptAll(written.select(*expected.columns)).count() == 0
    quarantine = spark.read.parquet(str(tmp_path / "bank" / VALIDATION_DIR / "quarantine"))
    assert quarantine.count() == len(BAD_PARQUET)


def test_continuous_features_are_written_without_dictionary_pages(spark, config, mixed_input, tmp_path):
    build_bank_features(spark, mixed_input, tmp_path / "bank", config, as_of=AS_OF)
    part = next((tmp_path / "bank" / FEATURES_DIR).glob("*.parquet"))
    group = pq.ParquetFile(part).metadata.row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
    dictionary = {name for name, used in encodings.items() if any("DICTIONARY" in e for e in used)}
    continuous = {name for name, dtype in feature_types(config.features).items() if dtype == "float"}
    assert continuous and not continuous & dictionary
    assert {"hour", "mcc_other", "account_id"} <= dictionary  # the rest keep the writer's default


def test_rows_written_beside_the_gates_count_discard_every_output(spark, config, mixed_input, tmp_path):
    """A writer that adds a row: the footers disagree with what the gate observed; nothing is kept."""
    target = tmp_path / "bank" / FEATURES_DIR
    with Gate(spark, mixed_input, tmp_path / "bank" / VALIDATION_DIR, config, as_of=AS_OF) as gate:
        gate.valid.unionByName(gate.valid.limit(1)).write.parquet(str(target))
        with pytest.raises(GateError, match="rows lost"):
            gate.finish(target)
    assert not target.exists() and not (tmp_path / "bank" / VALIDATION_DIR / "quarantine").exists()
    assert not (tmp_path / "bank" / VALIDATION_DIR / "report.json").exists()


def test_written_valid_rows_that_break_the_suite_discard_every_output(spark, config, mixed_input, tmp_path):
    """The same row count but a row the gate would never pass: the GX suite on what was written fails."""
    target = tmp_path / "bank" / FEATURES_DIR
    with Gate(spark, mixed_input, tmp_path / "bank" / VALIDATION_DIR, config, as_of=AS_OF) as gate:
        broken = F.when(F.col("transaction_id") == "ok3", F.lit(-1.0)).otherwise(F.col("amount"))
        gate.valid.withColumn("amount", broken).select(*COLUMN_NAMES, "branch").write.parquet(str(target))
        with pytest.raises(GateError, match="break the contract suite"):
            gate.finish(target)
    assert not target.exists() and not (tmp_path / "bank" / VALIDATION_DIR / "report.json").exists()
