"""model_refs: a model by reference rebuilds to the full model byte for byte; every bad reference is refused by name."""

from __future__ import annotations

import json

import pytest
import xgboost as xgb
from conftest import TOY_FEATURES

from fedfraud import model_json, model_refs
from fedfraud.model_guard import consortium_header, rebuild_model, ModelLimits
from fedfraud.model_refs import ModelReferenceRefused, canonical, content_hash
from fedfraud.wire import TrainTask

PARAMS = {"objective": "binary:logistic", "max_depth": 3, "base_score": 0.2, "tree_method": "hist", "seed": 3,
          "nthread": 1}
HEADER = consortium_header(TOY_FEATURES, PARAMS)
LIMITS = ModelLimits.for_depth(3, max_trees=40)
LIMIT = 1 << 20


@pytest.fixture(scope="module")
def grown(toy_banks):
    """A model of 6 trees as the aggregator holds it (rebuilt), and its first 4 trees (what a bank holds)."""
    X, y = toy_banks["alpha"]
    booster = xgb.train(PARAMS, xgb.DMatrix(X, label=y, feature_names=TOY_FEATURES), 6)
    full = rebuild_model(model_json.to_doc(booster), LIMITS, HEADER)
    return full, model_refs.prefix(full, 4)


def envelope(message: dict, slot: tuple, ref: dict) -> bytes:
    holder = message
    for key in slot[:-1]:
        holder = holder[key]
    holder[slot[-1]] = ref
    return canonical({"by_reference": 1, "message": message})


def task(doc) -> TrainTask:
    return TrainTask(bank="alpha", round_id=2, base_model_id="x", contract_hash="h", num_trees=3, params={},
                     base_model=doc)


def test_prefix_and_extend_are_inverse_and_the_envelope_rebuilds_the_message_byte_for_byte(grown):
    full, base = grown
    assert len(model_json.trees(base)) == 4
    assert model_json.to_bytes(model_refs.extend(base, model_json.trees(full)[4:])) == model_json.to_bytes(full)
    assert base == rebuild_model(base, LIMITS, HEADER)  # a prefix of a rebuilt model is one as the guard writes it
    raw_base = model_json.to_bytes(base)
    sent = task(full).to_bytes()
    body = envelope(json.loads(sent), ("base_model",), model_refs.reference(full, 4, content_hash(raw_base)))
    assert len(body) < len(sent) and model_refs.is_envelope(body)
    assert model_refs.expand(body, {content_hash(raw_base): raw_base}.get, LIMIT) == sent
    assert model_refs.expand(sent, {}.get, LIMIT) is sent  # a full message passes as it is


def test_a_score_question_by_reference_rebuilds_every_model_slot(grown):
    full, base = grown
    raw_base = model_json.to_bytes(base)
    question = {"masking": None, "models": {"candidate": full, "other": base}, "purpose": "accept", "round_id": 1,
                "variants": {"with_all": {"drop": [], "model": "candidate"}}}
    sent = canonical(question)
    message = json.loads(sent)
    message["models"]["candidate"] = model_refs.reference(full, 4, content_hash(raw_base))
    message["models"]["other"] = model_refs.reference(base, 4, content_hash(raw_base))  # nothing appended
    body = canonical({"by_reference": 1, "message": message})
    assert model_refs.expand(body, {content_hash(raw_base): raw_base}.get, LIMIT) == sent


@pytest.mark.parametrize("change, check", [
    (lambda ref: {**ref, "base": "0" * 64}, "model_base_unknown"),
    (lambda ref: {**ref, "model_sha256": "f" * 64}, "model_hash_mismatch"),
    (lambda ref: {**ref, "append": ref["append"][:1]}, "model_hash_mismatch"),  # trees left out
    (lambda ref: {**ref, "base_trees": 3}, "model_base_trees_mismatch"),
    (lambda ref: {**ref, "base_trees": True}, "model_ref_malformed"),
    (lambda ref: {**ref, "base": "A" * 64}, "model_ref_malformed"),
    (lambda ref: {**ref, "append": [1, 2]}, "model_ref_malformed"),
    (lambda ref: {**ref, "extra": 1}, "model_ref_malformed"),
    (lambda ref: {k: v for k, v in ref.items() if k != "append"}, "model_ref_malformed"),
])
def test_a_bad_reference_is_refused_by_name(grown, change, check):
    full, base = grown
    raw_base = model_json.to_bytes(base)
    ref = model_refs.reference(full, 4, content_hash(raw_base))
    body = envelope(json.loads(task(full).to_bytes()), ("base_model",), change(ref))
    with pytest.raises(ModelReferenceRefused) as refused:
        model_refs.expand(body, {content_hash(raw_base): raw_base}.get, LIMIT)
    assert refused.value.check == check and str(refused.value).startswith(check)


def test_a_malformed_or_oversized_envelope_is_refused_by_name(grown):
    full, base = grown
    raw_base = model_json.to_bytes(base)
    held = {content_hash(raw_base): raw_base}.get
    ref = model_refs.reference(full, 4, content_hash(raw_base))
    for body in (b'{"by_reference":1,"message":[]}', b'{"by_reference":2,"message":{}}', b'{"by_reference":1',
                 b'{"by_reference":1,"message":{"base_model":null}}',  # no model by reference in it
                 b'{"by_reference":1,"message":{},"more":0}', b'{"by_reference":1,"message":{"x":NaN}}'):
        with pytest.raises(ModelReferenceRefused, match="^model_ref_malformed"):
            model_refs.expand(body, held, LIMIT)
    body = envelope(json.loads(task(full).to_bytes()), ("base_model",), ref)
    with pytest.raises(ModelReferenceRefused, match="^model_ref_too_large"):
        model_refs.expand(body, held, len(body) - 1)  # the envelope itself
    with pytest.raises(ModelReferenceRefused, match="^model_ref_too_large"):
        model_refs.expand(body, held, len(body) + len(raw_base) - 1)  # the message it would rebuild
