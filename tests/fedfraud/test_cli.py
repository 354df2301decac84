"""The fedfraud command line: exit codes, messages, and data this project did not generate."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fedfraud.cli import app
from pipelines.feature_contract import feature_contract

FIXTURES = Path(__file__).parent.parent / "fixtures"
runner = CliRunner()


def test_features_on_another_banks_csv(spark, config, tmp_path):
    result = runner.invoke(app, ["features", "--input", str(FIXTURES / "other_bank.csv"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "validation" / "report.json").read_text())
    assert report["input_rows"] == 13 and report["valid_rows"] == 7
    assert {k: v for k, v in report["quarantine_reasons"].items() if v} == {
        "amount_not_positive": 1,
        "currency_malformed": 1,
        "channel_unknown": 1,
        "country_malformed": 1,
        "null_account_id": 1,
        "duplicate_transaction_id": 1,
    }
    features = pq.read_table(tmp_path / "features").to_pandas().set_index("transaction_id")
    assert len(features) == 7 and features.loc["ob-0005", "small_count_burst"] == 3.0
    assert features.loc["ob-0002", "seconds_since_prev_txn"] == pytest.approx(
        5 * 3600 + 45 * 60
    )  # 09:00-05:00 is 14:00 UTC
    assert features.loc["ob-0012", "amount_base"] == pytest.approx(19.99 * 0.68)
    contract = json.loads((tmp_path / "feature_contract.json").read_text())
    assert contract["hash"] == feature_contract(config.features)["hash"]


def test_schema_refusal_exits_non_zero_and_names_columns(spark, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("transaction_id,event_time,amount\nx,2026-01-01 00:00:00,3\n")
    result = runner.invoke(app, ["validate", "--input", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "missing column 'account_id'" in result.output and "missing column 'is_fraud'" in result.output
    assert not (tmp_path / "out" / "valid").exists()


def test_missing_input_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["validate", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "input not found" in result.output


def test_generate_is_deterministic(tmp_path):
    for run in ("a", "b"):
        result = runner.invoke(
            app, ["generate", "--banks", "2", "--rows", "3000", "--seed", "4", "--out", str(tmp_path / run)]
        )
        assert result.exit_code == 0, result.output
    for bank in ("alpine", "baltic"):
        first = (tmp_path / "a" / bank / "transactions.parquet").read_bytes()
        assert first == (tmp_path / "b" / bank / "transactions.parquet").read_bytes()


def test_federate_rejects_bad_arguments(tmp_path):
    result = runner.invoke(app, ["federate", "--bank", "nobank", "--model-name", "m"])
    assert result.exit_code == 2 and "NAME=PATH" in result.output
    result = runner.invoke(app, ["federate", "--bank", f"a={tmp_path}", "--model-name", "m", "--strategy", "magic"])
    assert result.exit_code == 2 and "--strategy must be one of" in result.output


@pytest.mark.slow
def test_federate_then_score(consortium, uri, tmp_path):
    banks = [f"--bank={b}={n.raw_path}" for b, n in sorted(consortium.nodes.items())]
    result = runner.invoke(
        app,
        [
            "federate",
            *banks,
            "--rounds",
            "1",
            "--strategy",
            "cyclic",
            "--model-name",
            "cli",
            "--tracking-uri",
            uri,
            "--work-dir",
            str(consortium.work_dir),
            "--trees-per-round",
            "5",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    model_uri = result.stdout.strip().splitlines()[-1]
    assert model_uri == "models:/cli/1"

    node = consortium.nodes[sorted(consortium.nodes)[-1]]
    raw = pq.read_table(node.raw_path).to_pandas()
    sample = raw.tail(500).copy()
    sample.loc[sample.index[-1], "is_fraud"] = None  # unlabelled: scored all the same
    sample.loc[sample.index[0], "amount"] = -1.0  # quarantined: listed with a null score
    sample.to_parquet(tmp_path / "batch.parquet", index=False)
    scored = runner.invoke(
        app,
        [
            "score",
            "--model",
            "models:/cli@champion",
            "--input",
            str(tmp_path / "batch.parquet"),
            "--output",
            str(tmp_path / "scores.parquet"),
            "--tracking-uri",
            uri,
        ],
    )
    assert scored.exit_code == 0, scored.output
    scores = pq.read_table(tmp_path / "scores.parquet").to_pandas().set_index("transaction_id")
    assert len(scores) == 500 and list(scores.columns) == ["score"]
    assert scores["score"].isna().sum() == 1 and pd_isna(scores.loc[sample["transaction_id"].iloc[0], "score"])
    assert scores["score"].dropna().between(0, 1).all()
    assert not pd_isna(scores.loc[sample["transaction_id"].iloc[-1], "score"])


def pd_isna(value) -> bool:
    return value != value
