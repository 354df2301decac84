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


def _aliased(doc, where):
    """``doc`` with one of the values ``extend`` rewrites spelled another way (equal in Python, not in bytes)."""
    doc = json.loads(model_json.to_bytes(doc))
    model = doc["learner"]["gradient_booster"]["model"]
    if where == "id_true":
        model["trees"][1]["id"] = True
    elif where == "id_float":
        model["trees"][5]["id"] = 5.0
    elif where == "id_missing":
        del model["trees"][5]["id"]
    elif where == "tree_info_float":
        model["tree_info"][5] = 0.0
    elif where == "indptr":
        model["iteration_indptr"] = [0, 2, 3, 4, 5, 6]
    elif where == "num_trees_int":
        model["gbtree_model_param"]["num_trees"] = 6
    elif where == "num_trees_float":
        model["gbtree_model_param"]["num_trees"] = 6.0
    return doc


@pytest.mark.parametrize("where", ["as_built", "id_true", "id_float", "id_missing", "tree_info_float", "indptr",
                                   "num_trees_int", "num_trees_float"])
@pytest.mark.parametrize("k", [0, 2, 4, 6])
def test_extends_exactly_agrees_with_a_byte_for_byte_rebuild(grown, where, k):
    """The aggregator's linear check says yes exactly when the bank's rebuild gives back the model's bytes."""
    doc = _aliased(grown[0], where)
    raw_base = model_json.to_bytes(model_refs.prefix(doc, k))
    sent = task(doc).to_bytes()
    body = envelope(json.loads(sent), ("base_model",), model_refs.reference(doc, k, content_hash(raw_base)))
    try:
        rebuilt_same = model_refs.expand(body, {content_hash(raw_base): raw_base}.get, LIMIT) == sent
    except ModelReferenceRefused as refused:
        assert refused.check == "model_hash_mismatch"
        rebuilt_same = False
    assert model_refs.extends_exactly(doc, k) is rebuilt_same
    in_base = {"id_true": k > 1, "id_float": k == 6, "id_missing": k == 6, "tree_info_float": k == 6}  # kept
    assert rebuilt_same is (where in ("as_built", "num_trees_int") or in_base.get(where, False))
