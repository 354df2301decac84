"""Wire messages: JSON round trip; truncated, oversized or incomplete bytes are refused by name."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from fedfraud.crosscheck import ScoreAnswer, ScoreQuestion
from fedfraud.wire import EvaluationReport, ModelUpdate, TrainTask, WireFormatError

UPDATE = ModelUpdate(bank="alpha", round_id=2, base_model_id="abc", contract_hash="h", seed=4,
                     counts={"train_rows": 10}, metrics={"auprc": 0.5}, model={"learner": {}})


def test_round_trip():
    assert ModelUpdate.from_bytes(UPDATE.to_bytes()) == UPDATE
    task = TrainTask(bank="a", round_id=1, base_model_id="none", contract_hash="h", num_trees=3, params={"eta": 0.1})
    assert TrainTask.from_bytes(task.to_bytes()) == task


def asdict_bytes(message, drop_none=()) -> bytes:
    """What ``to_bytes`` encoded before it stopped deep-copying messages (``dataclasses.asdict``)."""
    body = {k: v for k, v in dataclasses.asdict(message).items() if not (k in drop_none and v is None)}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


@pytest.fixture(scope="module")
def toy_booster_doc():
    import numpy as np
    import xgboost as xgb

    from fedfraud import model_json

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    y = (X[:, 0] + rng.normal(size=200) > 0).astype(int)
    booster = xgb.train({"max_depth": 3, "objective": "binary:logistic", "seed": 1}, xgb.DMatrix(X, y), 3)
    return model_json.to_doc(booster)


def test_messages_encode_to_the_same_bytes_as_their_asdict_without_copying_the_model(toy_booster_doc):
    report = EvaluationReport(bank="b", model_id="m", positives=3, negatives=7, metrics={"auprc": 0.25},
                              hist_pos=[1, 2], hist_neg=[3, 4])
    task = TrainTask(bank="a", round_id=1, base_model_id="x", contract_hash="h", num_trees=3,
                     params={"eta": 0.1, "b": [1, 2.5, None]}, base_model=toy_booster_doc)
    question = ScoreQuestion(2, "accept", {"with_all": {"model": "m", "drop": [0, 1]}}, {"m": toy_booster_doc})
    answer = ScoreAnswer(bank="b", round_id=2, purpose="accept", reports={"with_all": report})  # nested dataclass
    for message in (task, question, answer, report):
        assert message.to_bytes() == asdict_bytes(message)
    optional = ("privacy_epsilon", "collective_bytes")
    for update in (UPDATE, dataclasses.replace(UPDATE, model=toy_booster_doc, privacy_epsilon=1.5,
                                               collective_bytes={"sent": 1, "received": 2})):
        assert update.to_bytes() == asdict_bytes(update, optional)
    before = json.dumps(toy_booster_doc, sort_keys=True)
    task.to_bytes()
    assert task.base_model is toy_booster_doc and json.dumps(toy_booster_doc, sort_keys=True) == before


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
