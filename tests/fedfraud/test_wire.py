"""Wire messages: JSON round trip; truncated, oversized or incomplete bytes are refused by name."""

from __future__ import annotations

import pickle

import pytest

from fedfraud.wire import EvaluationReport, ModelUpdate, TrainTask, WireFormatError

UPDATE = ModelUpdate(bank="alpha", round_id=2, base_model_id="abc", contract_hash="h", seed=4,
                     counts={"train_rows": 10}, metrics={"auprc": 0.5}, model={"learner": {}})


def test_round_trip():
    assert ModelUpdate.from_bytes(UPDATE.to_bytes()) == UPDATE
    task = TrainTask(bank="a", round_id=1, base_model_id="none", contract_hash="h", num_trees=3, params={"eta": 0.1})
    assert TrainTask.from_bytes(task.to_bytes()) == task


@pytest.mark.parametrize(
    "data, message",
    [
        (UPDATE.to_bytes()[:-7], "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"bank": "alpha"}', "missing round_id"),
        (pickle.dumps({"bank": "alpha"}), "not valid JSON"),
    ],
)
def test_malformed_bytes_are_refused(data, message):
    with pytest.raises(WireFormatError, match=message):
        ModelUpdate.from_bytes(data)


def test_oversized_bytes_are_refused_before_parsing():
    with pytest.raises(WireFormatError, match="exceeds the 100-byte limit"):
        ModelUpdate.from_bytes(UPDATE.to_bytes(), max_bytes=100)
    with pytest.raises(WireFormatError, match="evaluation report"):
        EvaluationReport.from_bytes(b"x" * (EvaluationReport.MAX_BYTES + 1))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (b'{"bank": "alpha", "round_id": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (UPDATE.to_bytes().replace(b'"auprc":0.5', b'"auprc":NaN'), "constant NaN"),
        (UPDATE.to_bytes().replace(b'"auprc":0.5', b'"auprc":-Infinity'), "constant -Infinity"),
    ],
)
def test_hostile_json_is_a_wire_format_error(data, message):
    """Deep nesting (RecursionError), over-long integers (ValueError) and NaN/Infinity are refused."""
    for kind in (ModelUpdate, EvaluationReport, TrainTask):
        with pytest.raises(WireFormatError, match=message):
            kind.from_bytes(data)
