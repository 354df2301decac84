"""model_guard: every structural check refuses by name; a rebuilt model predicts exactly as before;
a seeded fuzz of mutated updates and models is refused by a named check or loads safely."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest
import xgboost as xgb
from conftest import TOY_FEATURES

from fedfraud import model_json
from fedfraud.model_guard import (CHECKS, ConsortiumHeader, ModelLimits, ModelRefused, consortium_header,
                                  header_from_model, parse_model_bytes, parse_update_bytes, rebuild_model,
                                  rebuild_trees, rebuild_update)
from fedfraud.wire import ModelUpdate

PARAMS = {"objective": "binary:logistic", "max_depth": 4, "base_score": 0.2, "scale_pos_weight": 2.0,
          "tree_method": "hist", "seed": 3, "nthread": 1}
HEADER = consortium_header(TOY_FEATURES, PARAMS)
LIMITS = ModelLimits.for_depth(4, max_trees=40, max_bytes=256 * 1024, max_abs_leaf=10.0)


@pytest.fixture(scope="module")
def real(toy_banks):
    """A real small model: 3 base trees, then an update of 3 more (as a bank sends it)."""
    X, y = toy_banks["alpha"]
    data = xgb.DMatrix(X, label=y, feature_names=TOY_FEATURES)
    base = xgb.train(PARAMS, data, 3)
    grown = xgb.train(PARAMS, data, 3, xgb_model=base)
    update = model_json.scrub_training_stats(model_json.new_trees_only(grown, 3))
    return {"X": X, "booster": grown, "model": model_json.to_doc(grown), "update": update}


def tree0(doc):
    return model_json.trees(doc)[0]


def inner(tree):
    return [n for n, child in enumerate(tree["left_children"]) if child != -1]


def leaves(tree):
    return [n for n, child in enumerate(tree["left_children"]) if child == -1]


def margin(booster, X):
    return booster.predict(xgb.DMatrix(X, feature_names=TOY_FEATURES), output_margin=True)


def test_rebuild_keeps_predictions_drops_statistics_and_is_idempotent(real):
    doc = copy.deepcopy(real["model"])
    doc["learner"]["attributes"] = {"planted": "by a bank"}
    rebuilt = rebuild_model(doc, LIMITS, HEADER)
    booster = model_json.to_booster(rebuilt)
    np.testing.assert_array_equal(margin(booster, real["X"]), margin(real["booster"], real["X"]))
    assert booster.get_score(importance_type="weight") == real["booster"].get_score(importance_type="weight")
    assert rebuilt["learner"]["attributes"] == {}
    assert all(set(t["sum_hessian"]) == {0.0} and set(t["loss_changes"]) == {0.0} for t in model_json.trees(rebuilt))
    assert rebuild_model(rebuilt, LIMITS, HEADER) == rebuilt
    # a bank rebuilding the aggregator's model gets the same document, hence the same model id
    assert rebuild_model(rebuilt, LIMITS, header_from_model(rebuilt, TOY_FEATURES)) == rebuilt


def test_renumbered_nodes_are_one_valid_tree(real):
    import random
    doc = copy.deepcopy(real["model"])
    for tree in model_json.trees(doc):
        relabel(random.Random(5), tree)
    assert model_json.trees(doc)[0]["left_children"] != model_json.trees(real["model"])[0]["left_children"]
    booster = model_json.to_booster(rebuild_model(doc, LIMITS, HEADER))
    np.testing.assert_array_equal(margin(booster, real["X"]), margin(real["booster"], real["X"]))


def test_update_bytes_round_trip(real):
    update = ModelUpdate(bank="alpha", round_id=1, base_model_id="none", contract_hash="h", seed=3,
                         counts={"train_rows": 10}, metrics={}, model=real["update"])
    parsed = parse_update_bytes(update.to_bytes(), LIMITS, HEADER)
    assert parsed.model == rebuild_update(update, LIMITS, HEADER).model == rebuild_model(real["update"], LIMITS, HEADER)
    assert len(model_json.trees(parsed.model)) == 3 and parsed.bank == "alpha"


def _set(path_value):
    """A mutation that sets ``tree 0``'s ``field[index]`` (index None: the whole field)."""
    field, index, value = path_value

    def apply(doc):
        target = tree0(doc)[field]
        if index is None:
            tree0(doc)[field] = value
        else:
            target[index(tree0(doc)) if callable(index) else index] = value
        return doc
    return apply


def _learner(key, value):
    def apply(doc):
        doc["learner"][key] = value
        return doc
    return apply


def _cycle(doc):
    tree = tree0(doc)
    node = tree["left_children"][0]  # an inner child of the root points back at itself
    assert node in inner(tree)
    tree["left_children"][node] = node
    return doc


def _shared(doc):
    tree = tree0(doc)
    node = tree["left_children"][0]
    tree["left_children"][node] = tree["right_children"][0]
    return doc


def _unreachable(doc):
    tree = tree0(doc)
    node = tree["left_children"][0]
    tree["left_children"][node] = tree["right_children"][node] = -1
    return doc


def _param(key, value):
    def apply(doc):
        doc["learner"]["learner_model_param"][key] = value
        return doc
    return apply


def _delete(key):
    def apply(doc):
        del tree0(doc)[key]
        return doc
    return apply


CASES = {
    "array_length": [_set(("split_conditions", None, [0.0])), _set(("sum_hessian", None, []))],
    "child_out_of_range": [_set(("left_children", 0, 10 ** 6)), _set(("right_children", 0, -1)),
                           _set(("left_children", 0, 0))],
    "cycle_or_shared_node": [_cycle, _shared],
    "unreachable_node": [_unreachable],
    "split_index_out_of_range": [_set(("split_indices", 0, 10 ** 6)), _set(("split_indices", 0, 6)),
                                 _set(("split_indices", 0, -1))],
    "categorical_split": [_set(("split_type", 0, 1)), _set(("categories", None, [1])),
                          _learner("feature_types", ["c"] * 6)],
    "leaf_out_of_range": [_set(("split_conditions", lambda t: leaves(t)[0], 1e30)),
                          _set(("split_conditions", lambda t: leaves(t)[0], -10.5))],
    "not_finite": [_set(("split_conditions", lambda t: leaves(t)[0], 1e39)),
                   _set(("split_conditions", 0, 3.5e38)), _set(("split_conditions", 0, math.nan)),
                   _set(("split_conditions", 0, 10 ** 400))],
    "wrong_type": [_set(("left_children", 0, "1")), _set(("left_children", 0, True)),
                   _set(("split_conditions", 0, None)), _set(("default_left", 0, 2)),
                   _set(("tree_param", None, {"num_nodes": "x"})), _learner("gradient_booster", [])],
    "header_mismatch": [_param("num_feature", "7"), _param("base_score", "[9.99E-1]"), _param("num_class", "2"),
                        _learner("objective", {"name": "binary:logitraw"}),
                        _learner("feature_names", list("abcdef"))],
    "malformed": [_delete("split_type"), _delete("tree_param"), _param("base_score", "[zero]")],
}


@pytest.mark.parametrize("check,index", [(c, i) for c, fs in CASES.items() for i in range(len(fs))])
def test_each_check_refuses_by_name(real, check, index):
    doc = CASES[check][index](copy.deepcopy(real["model"]))
    with pytest.raises(ModelRefused) as refused:
        rebuild_model(doc, LIMITS, HEADER)
    assert refused.value.check == check and refused.value.check in CHECKS
    assert refused.value.detail


@pytest.mark.parametrize("limits,check", [
    (ModelLimits(max_depth=2), "too_deep"), (ModelLimits(max_nodes_per_tree=5), "too_many_nodes"),
    (ModelLimits(max_trees=5), "too_many_trees"), (ModelLimits(max_bytes=2000), "too_large")])
def test_limits_refuse_by_name(real, limits, check):
    with pytest.raises(ModelRefused) as refused:
        rebuild_model(real["model"], limits, HEADER)
    assert refused.value.check == check


@pytest.mark.parametrize("data,check", [
    (b"\xff\xfe{}", "malformed"), (b'{"learner": ', "malformed"), (b"[" * 200_000 + b"]" * 200_000, "too_large"),
    (b"[" * 50_000 + b"]" * 50_000, "malformed"), (b"[]", "wrong_type"), (b'"model"', "wrong_type"),
    (b"1" * 5000, "malformed"), (b'{"learner": NaN}', "not_finite"), ("{}", "wrong_type")])
def test_bytes_refused_by_name(data, check):
    with pytest.raises(ModelRefused) as refused:
        parse_model_bytes(data, ModelLimits(max_bytes=256 * 1024), HEADER)
    assert refused.value.check == check


def test_update_refusals(real):
    empty = model_json.empty_like(real["update"])
    update = ModelUpdate(bank="a", round_id=1, base_model_id="x", contract_hash="h", seed=0, counts={}, metrics={},
                         model=empty)
    with pytest.raises(ModelRefused, match="no_trees"):
        rebuild_update(update, LIMITS, HEADER)
    for data in (b'{"bank": "a"}', b"[" * 100_000 + b"]" * 100_000, b"\x00garbage"):
        with pytest.raises(ModelRefused) as refused:
            parse_update_bytes(data, LIMITS, HEADER, max_bytes=1_000_000)
        assert refused.value.check == "malformed"
    with pytest.raises(ModelRefused) as refused:
        rebuild_trees([{"tree_param": {"num_nodes": "1"}}], LIMITS, 6)
    assert refused.value.check == "malformed"


def test_header_is_the_consortium_template():
    doc = HEADER.document([])
    assert doc["learner"]["objective"]["name"] == "binary:logistic"
    assert doc["learner"]["feature_names"] == TOY_FEATURES
    assert model_json.to_booster(doc).num_features() == 6
    for bad in ({"base_score": 0.0}, {"base_score": 1.5}, {"base_score": math.inf}, {"num_feature": 0},
                {"feature_types": ("c",) * 6}, {"feature_names": ("a",) * 6}):
        with pytest.raises(ModelRefused):
            ConsortiumHeader(**{"num_feature": 6, "base_score": 0.2, **bad})
    with pytest.raises(ModelRefused, match="header_mismatch"):
        header_from_model({**doc, "learner": {**doc["learner"], "objective": {"name": "reg:squarederror"}}},
                          TOY_FEATURES)


# ---------------------------------------------------------------------------- fuzz

JUNK = ["1", "", None, {}, [], True, 1.5, -1, [[1]], {"a": [1]}, 2 ** 31, "__DEEP__"]
NUMBERS = [1e39, -1e39, math.inf, -math.inf, math.nan, 1e30, 3.4028235e38, 3.5e38, 10 ** 400, 11.0, 9.99, -0.5, 0.0]
INDICES = [-1, -2, 0, 1, 5, 6, 7, 10 ** 6, 2 ** 31, -(10 ** 9), 10 ** 30]
ARRAYS = ["left_children", "right_children", "parents", "split_indices", "split_conditions", "split_type",
          "default_left", "base_weights", "loss_changes", "sum_hessian", "categories"]


def _walk(rng, value, depth=0):
    """A random (container, key) inside ``value``, for random edits anywhere."""
    keys = list(value) if isinstance(value, dict) else list(range(len(value)))
    key = rng.choice(keys)
    child = value[key]
    if isinstance(child, (dict, list)) and child and depth < 8 and rng.random() < 0.75:
        return _walk(rng, child, depth + 1)
    return value, key


def relabel(rng, tree):
    """The same tree with its non-root nodes renumbered at random (structurally valid)."""
    n = len(tree["left_children"])
    old_at = [0] + rng.sample(range(1, n), n - 1)
    new_of = {old: new for new, old in enumerate(old_at)}
    for field in ARRAYS[:-1]:
        tree[field] = [tree[field][old_at[i]] for i in range(n)]
    for field in ("left_children", "right_children"):
        tree[field] = [-1 if child == -1 else new_of[child] for child in tree[field]]
    return tree


def _tree_edit(rng, doc):
    tree = rng.choice(model_json.trees(doc))
    n = len(tree["left_children"])
    node, kind = rng.randrange(n), rng.randrange(10)
    inner_nodes = inner(tree) or [0]
    if kind == 0:
        tree[rng.choice(["left_children", "right_children"])][node] = rng.choice(INDICES + [rng.randrange(n)])
    elif kind == 1:  # cycle to itself / an ancestor, or a child shared with another node
        a, b = rng.choice(inner_nodes), rng.choice(inner_nodes + [0])
        tree[rng.choice(["left_children", "right_children"])][a] = rng.choice([a, b, tree["left_children"][b]])
    elif kind == 2:
        tree["split_indices"][node] = rng.choice(INDICES + [rng.randrange(6)])
    elif kind == 3:
        tree["split_conditions"][node] = rng.choice(NUMBERS + [rng.uniform(-20, 20)])
    elif kind == 4:
        array = tree[rng.choice(ARRAYS)]
        rng.choice([lambda: array.append(0), lambda: array.pop() if array else None,
                    lambda: array.extend([1] * rng.choice([10, 100_000]))])()
    elif kind == 5:
        tree[rng.choice(ARRAYS + ["tree_param", "id"])] = rng.choice(JUNK)
    elif kind == 6:
        tree["tree_param"]["num_nodes"] = rng.choice(["abc", "-1", str(n + 1), str(n - 1), "10000000", n, "", "٣"])
    elif kind == 7:
        tree[rng.choice(["split_type", "default_left"])][node] = rng.choice([1, 2, -1, "1", True])
    elif kind == 8:
        relabel(rng, tree)
    else:  # valid edits: swapped children, another feature, a nearby threshold
        tree["split_indices"][node] = rng.randrange(6)
        tree["split_conditions"][node] = float(tree["split_conditions"][node]) * rng.uniform(0.5, 1.5)
        if tree["left_children"][node] != -1:
            tree["left_children"][node], tree["right_children"][node] = (tree["right_children"][node],
                                                                         tree["left_children"][node])
    return doc


def _doc_edit(rng, doc):
    learner, model = doc["learner"], doc["learner"]["gradient_booster"]["model"]
    kind = rng.randrange(6)
    if kind == 0:  # anywhere in the document: junk, a deep nest, or a missing key
        container, key = _walk(rng, doc)
        if rng.random() < 0.3 and isinstance(container, dict):
            del container[key]
        else:
            container[key] = rng.choice(JUNK)
    elif kind == 1:
        learner["learner_model_param"][rng.choice(["num_feature", "base_score", "num_class", "boost_from_average"])] \
            = rng.choice(["7", "[9.99E-1]", "[2E-1]", "2", "0", 7, "[nan]", "[inf]"])
    elif kind == 2:
        rng.choice([lambda: learner["objective"].update(name=rng.choice(["binary:logitraw", "reg:squarederror"])),
                    lambda: learner["gradient_booster"].update(name="dart"),
                    lambda: learner.update(feature_names=rng.choice([list("abcdef"), [], TOY_FEATURES[:3]])),
                    lambda: learner.update(feature_types=rng.choice([["c"] * 6, ["float"] * 6, "q"])),
                    lambda: model.update(cats={"enc": [1], "feature_segments": [], "sorted_idx": []})])()
    elif kind == 3:  # tree count: a few more (accepted) or far too many
        model["trees"] = model["trees"] * rng.choice([2, 3, 20])
    elif kind == 4:  # bookkeeping a bank may not set: rebuilt, so harmless
        model.update(tree_info=[7], iteration_indptr=[5, 1], gbtree_model_param={"num_trees": "99"})
        learner["attributes"] = {"best_iteration": "99"}
    else:
        return _tree_edit(rng, _tree_edit(rng, doc))
    return doc


def _bytes_edit(rng, data: bytes) -> bytes:
    cut = rng.randrange(max(1, len(data)))
    return rng.choice([data[:cut], data[:cut] + b"\xff\xfe" + data[cut:], data[:cut] + bytes([rng.randrange(256)])
                       + data[cut + 1:], b"[" + data, b"[]", b"null", b'"x"', b"1e999", b"", b" " * 300_000])


def mutations(real, count, seed=20261127):
    """``count`` seeded mutations: (kind, bytes), alternating bank updates and whole models."""
    import random
    rng = random.Random(seed)
    for i in range(count):
        kind = "update" if i % 2 == 0 else "model"
        doc = copy.deepcopy(real[kind])
        for _ in range(rng.randint(1, 3)):
            try:
                (_tree_edit if rng.random() < 0.6 else _doc_edit)(rng, doc)
            except (KeyError, TypeError, IndexError, AttributeError, ValueError):
                pass  # an earlier edit broke the path this one follows: the document stays as it is
        if kind == "update":
            doc = {"bank": "alpha", "round_id": 1, "base_model_id": "m", "contract_hash": "h", "seed": 1,
                   "counts": {}, "metrics": {}, "model": doc}
        data = json.dumps(doc).encode()
        deep = rng.choice([60, 900, 5_000, 60_000])
        data = data.replace(b'"__DEEP__"', b"[" * deep + b"1" + b"]" * deep)
        yield kind, _bytes_edit(rng, data) if rng.random() < 0.12 else data


CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["sklearn"] = None  # only the booster is needed: skip xgboost's optional sklearn import
    import numpy as np, xgboost as xgb
    X, names = np.load(sys.argv[2]), json.loads(sys.argv[3])
    data = xgb.DMatrix(X, feature_names=names, nthread=1)
    bad, loaded = [], 0
    for line in open(sys.argv[1]):
        booster = xgb.Booster({"nthread": 1})
        booster.load_model(bytearray(line.encode()))
        out = [booster.predict(data), booster.predict(data, output_margin=True)]
        scores = [booster.get_score(importance_type=t) for t in ("weight", "gain", "cover", "total_gain")]
        if not all(o.dtype == np.float32 and np.isfinite(o).all() for o in out) or not (0 <= out[0]).all() \\
                or not (out[0] <= 1).all() or not all(np.isfinite(list(s.values())).all() for s in scores):
            bad.append(loaded)
        loaded += 1
    print(json.dumps({"loaded": loaded, "bad": bad}))
""")


@pytest.mark.slow
def test_fuzz_mutated_updates_and_models(real, tmp_path):
    started = time.monotonic()
    refused, accepted = Counter(), []
    for kind, data in mutations(real, 1200):
        try:
            if kind == "update":
                accepted.append(parse_update_bytes(data, LIMITS, HEADER).model)
            else:
                accepted.append(parse_model_bytes(data, LIMITS, HEADER))
        except ModelRefused as exc:
            assert exc.check in CHECKS, exc
            refused[exc.check] += 1
    assert sum(refused.values()) + len(accepted) == 1200
    assert {"array_length", "child_out_of_range", "cycle_or_shared_node", "unreachable_node", "split_index_out_of_range",
            "categorical_split", "too_many_trees", "too_large", "leaf_out_of_range", "not_finite", "wrong_type",
            "header_mismatch", "malformed"} <= set(refused)
    assert len(accepted) >= 100
    # every accepted document loads, predicts and scores in another process: a crash or hang fails here
    X = np.vstack([real["X"], np.full((1, 6), np.nan, np.float32), np.full((1, 6), 3e38, np.float32)])
    np.save(tmp_path / "X.npy", X)
    (tmp_path / "accepted.jsonl").write_text("".join(model_json.to_bytes(d).decode() + "\n" for d in accepted))
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "accepted.jsonl"), str(tmp_path / "X.npy"),
                            json.dumps(TOY_FEATURES)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result == {"loaded": len(accepted), "bad": []}
    print(f"\nfuzz: 1200 mutations, {len(accepted)} accepted and loaded, refused {dict(sorted(refused.items()))}, "
          f"{time.monotonic() - started:.1f}s")
