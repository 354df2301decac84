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
                                  header_from_model, parse_model_bytes, parse_received_model,
                                  parse_update_bytes, rebuild_model,
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
    assert parse_received_model(model_json.to_bytes(rebuilt), LIMITS, TOY_FEATURES) == rebuilt


def test_aggregating_rebuilt_documents_keeps_them_canonical(real):
    update = rebuild_model(real["update"], LIMITS, HEADER)
    merged = model_json.append_trees(model_json.empty_like(update), model_json.scale_leaves(update, 0.25),
                                     model_json.scale_leaves(update, 0.75))
    assert rebuild_model(merged, LIMITS, HEADER) == merged  # the global model's id survives a rebuild


def test_renumbered_nodes_are_one_valid_tree(real):
    import random
    doc = copy.deepcopy(real["model"])
    for tree in model_json.trees(doc):
        relabel(random.Random(5), tree)
    assert model_json.trees(doc)[0]["left_children"] != model_json.trees(real["model"])[0]["left_children"]
    booster = model_json.to_booster(rebuild_model(doc, LIMITS, HEADER))
    np.testing.assert_array_equal(margin(booster, real["X"]), margin(real["booster"], real["X"]))


def test_update_bytes_round_trip(real):
    update = _update(real["update"])
    parsed = parse_update_bytes(update.to_bytes(), LIMITS, HEADER)
    assert parsed.model == rebuild_update(update, LIMITS, HEADER).model == rebuild_model(real["update"], LIMITS, HEADER)
    assert len(model_json.trees(parsed.model)) == 3 and parsed.bank == "a"


DELETE = object()


def apply(doc, *edits):
    """Each edit is ``(root, *keys, value)``; root ``tree`` (tree 0), ``learner`` or ``param``;
    key ``leaf`` is tree 0's first leaf, ``child`` the root's left child; a callable value gets tree 0."""
    for root, *keys, value in edits:
        tree = tree0(doc)
        target = {"tree": tree, "learner": doc["learner"], "param": doc["learner"]["learner_model_param"]}[root]
        keys = [{"leaf": leaves(tree)[0], "child": tree["left_children"][0]}.get(k, k) for k in keys]
        for key in keys[:-1]:
            target = target[key]
        if value is DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value(tree) if callable(value) else value
    return doc


CASES = [  # (check, edit, ...): tree 0 unless said
    ("array_length", ("tree", "split_conditions", [0.0])), ("array_length", ("tree", "sum_hessian", [])),
    ("child_out_of_range", ("tree", "left_children", 0, 10 ** 6)),
    ("child_out_of_range", ("tree", "left_children", 0, 0)), ("child_out_of_range", ("tree", "right_children", 0, -1)),
    ("cycle_or_shared_node", ("tree", "left_children", "child", lambda t: t["left_children"][0])),
    ("cycle_or_shared_node", ("tree", "left_children", "child", lambda t: t["right_children"][0])),
    ("unreachable_node", ("tree", "left_children", "child", -1), ("tree", "right_children", "child", -1)),
    ("split_index_out_of_range", ("tree", "split_indices", 0, 10 ** 6)),
    ("split_index_out_of_range", ("tree", "split_indices", 0, 6)),
    ("split_index_out_of_range", ("tree", "split_indices", 0, -1)),
    ("categorical_split", ("tree", "split_type", 0, 1)), ("categorical_split", ("tree", "categories", [1])),
    ("categorical_split", ("learner", "feature_types", ["c"] * 6)),
    ("leaf_out_of_range", ("tree", "split_conditions", "leaf", 1e30)),
    ("leaf_out_of_range", ("tree", "split_conditions", "leaf", -10.5)),
    ("not_finite", ("tree", "split_conditions", "leaf", 1e39)), ("not_finite", ("tree", "split_conditions", 0, 4e38)),
    ("not_finite", ("tree", "split_conditions", 0, math.nan)), ("not_finite", ("tree", "split_conditions", 0, 10**400)),
    ("wrong_type", ("tree", "left_children", 0, "1")), ("wrong_type", ("tree", "left_children", 0, True)),
    ("wrong_type", ("tree", "split_conditions", 0, None)), ("wrong_type", ("tree", "default_left", 0, 2)),
    ("wrong_type", ("tree", "tree_param", "num_nodes", "x")), ("wrong_type", ("learner", "gradient_booster", [])),
    ("header_mismatch", ("param", "num_feature", "7")), ("header_mismatch", ("param", "base_score", "[9.99E-1]")),
    ("header_mismatch", ("param", "num_class", "2")),
    ("header_mismatch", ("learner", "objective", "name", "binary:logitraw")),
    ("header_mismatch", ("learner", "feature_names", list("abcdef"))),
    ("header_mismatch", ("learner", "gradient_booster", "name", "dart")),
    ("malformed", ("tree", "split_type", DELETE)), ("malformed", ("tree", "tree_param", DELETE)),
    ("malformed", ("param", "base_score", "[zero]")),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_check_refuses_by_name(real, case):
    check, *edits = case
    with pytest.raises(ModelRefused) as refused:
        rebuild_model(apply(copy.deepcopy(real["model"]), *edits), LIMITS, HEADER)
    assert refused.value.check == check and refused.value.check in CHECKS
    assert refused.value.detail


def _update(model):
    return ModelUpdate(bank="a", round_id=1, base_model_id="x", contract_hash="h", seed=0, counts={}, metrics={},
                       model=model)


BYTES = ModelLimits(max_bytes=256 * 1024)
REFUSALS = [  # (check, call on the real models): limits, bytes, updates
    ("too_deep", lambda r: rebuild_model(r["model"], ModelLimits(max_depth=2), HEADER)),
    ("too_many_nodes", lambda r: rebuild_model(r["model"], ModelLimits(max_nodes_per_tree=5), HEADER)),
    ("too_many_trees", lambda r: rebuild_model(r["model"], ModelLimits(max_trees=5), HEADER)),
    ("too_large", lambda r: rebuild_model(r["model"], ModelLimits(max_bytes=2000), HEADER)),
    ("too_large", lambda r: parse_model_bytes(b"[" * 200_000 + b"]" * 200_000, BYTES, HEADER)),
    ("malformed", lambda r: parse_model_bytes(b"\xff\xfe{}", BYTES, HEADER)),
    ("malformed", lambda r: parse_model_bytes(b'{"learner": ', BYTES, HEADER)),
    ("malformed", lambda r: parse_model_bytes(b"[" * 50_000 + b"]" * 50_000, BYTES, HEADER)),
    ("malformed", lambda r: parse_model_bytes(b"1" * 5000, BYTES, HEADER)),  # beyond Python's int digits
    ("not_finite", lambda r: parse_model_bytes(b'{"learner": NaN}', BYTES, HEADER)),
    ("wrong_type", lambda r: parse_model_bytes(b"[]", BYTES, HEADER)),
    ("wrong_type", lambda r: parse_model_bytes('{"str": 1}', BYTES, HEADER)),
    ("no_trees", lambda r: rebuild_update(_update(model_json.empty_like(r["update"])), LIMITS, HEADER)),
    ("malformed", lambda r: parse_update_bytes(b'{"bank": "a"}', LIMITS, HEADER)),
    ("malformed", lambda r: parse_update_bytes(b"[" * 100_000 + b"]" * 100_000, BYTES, HEADER)),
    ("malformed", lambda r: rebuild_trees([{"tree_param": {"num_nodes": "1"}}], LIMITS, 6)),
    ("header_mismatch", lambda r: parse_received_model(model_json.to_bytes(r["model"]), LIMITS, TOY_FEATURES[:5])),
    ("malformed", lambda r: parse_received_model(b"{}", LIMITS, TOY_FEATURES)),
]


@pytest.mark.parametrize("check,call", REFUSALS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(REFUSALS)])
def test_limits_bytes_and_updates_refused_by_name(real, check, call):
    with pytest.raises(ModelRefused) as refused:
        call(real)
    assert refused.value.check == check


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
    assert CHECKS - {"too_deep", "too_many_nodes", "no_trees"} <= set(refused), refused
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
