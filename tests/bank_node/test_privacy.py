"""Differential privacy on leaf values (bank_node/privacy.py, privacy_ledger.py): the sensitivity bound on
neighbouring datasets, seeded noise, the ε ledger and its accountant, and a private bagging federation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import xgboost as xgb
from conftest import TOY_FEATURES, with_toy_data
from scipy.stats import norm

from bank_node.node import BankNode
from bank_node.policy import TaskRefused
from bank_node.privacy import PrivacyPolicy, clipped_gradients, clipped_leaf_values, private_trees
from bank_node.privacy_ledger import PrivacyLedger, epsilon_spent, noise_for_budget
from bank_node.training import dmatrix
from fedfraud import model_json
from fedfraud.wire import ModelUpdate, TrainTask, WireFormatError

PARAMS = {"max_depth": 3, "eta": 0.3, "max_bin": 16, "base_score": 0.2, "seed": 4}


def one_tree(X, y, **params):
    """A tree's structure on (X, y): each row's leaf and the tree's leaf ids."""
    booster = xgb.train({"objective": "binary:logistic", "nthread": 1, **params}, dmatrix(X, y, TOY_FEATURES), 1)
    tree = model_json.trees(model_json.to_doc(booster))[0]
    leaves = np.array([n for n in range(len(tree["left_children"])) if model_json.is_leaf(tree, n)])
    return booster.predict(dmatrix(X, None, TOY_FEATURES), pred_leaf=True).reshape(-1).astype(np.int64), leaves


@pytest.mark.parametrize("policy, params", [
    (PrivacyPolicy(True, gradient_clip=1.0, leaf_clip=1.0, leaf_lambda=4.0), {"scale_pos_weight": 12.0}),
    (PrivacyPolicy(True, gradient_clip=0.5, leaf_clip=3.0, leaf_lambda=1.0), {"scale_pos_weight": 1.0}),
    (PrivacyPolicy(True, gradient_clip=2.0, leaf_clip=0.5, leaf_lambda=2.0), {"lambda": 3.0, "alpha": 0.2}),
])
def test_one_row_added_or_removed_moves_the_leaf_vector_by_at_most_delta(toy_banks, policy, params):
    X, y = toy_banks["alpha"]
    X, y = X[:160], y[:160]
    leaf_of_row, leaves = one_tree(X, y, max_depth=5, min_child_weight=0.0, max_bin=16)  # small leaves: near the bound
    margin = np.random.default_rng(0).normal(-1.0, 2.5, size=len(y))  # extreme p: large raw gradients
    g, h = clipped_gradients(margin, y, policy, params)
    assert np.abs(g).max() <= policy.gradient_clip + 1e-12 and h.min() >= 0
    delta = policy.sensitivity(params)
    full = clipped_leaf_values(leaf_of_row, leaves, g, h, policy, params)
    moves = []
    for i in range(len(y)):  # remove each row in turn
        keep = np.arange(len(y)) != i
        moves.append(np.linalg.norm(full - clipped_leaf_values(leaf_of_row[keep], leaves, g[keep], h[keep],
                                                               policy, params)))
    bound = policy.leaf_terms(params)[2]
    for leaf in leaves:  # add a worst-case row to each leaf
        for extra_g, extra_h in ((policy.gradient_clip, bound), (-policy.gradient_clip, bound),
                                 (policy.gradient_clip, 0.0), (-policy.gradient_clip, 0.0)):
            added = clipped_leaf_values(np.append(leaf_of_row, leaf), leaves, np.append(g, extra_g),
                                        np.append(h, extra_h), policy, params)
            moves.append(np.linalg.norm(full - added))
    assert max(moves) <= delta + 1e-12
    assert max(moves) > 0.25 * delta  # the bound is not vacuous on small leaves


def test_the_sensitivity_follows_the_derivation():
    policy = PrivacyPolicy(True, gradient_clip=1.0, leaf_clip=1.0, leaf_lambda=20.0)
    assert policy.sensitivity({"scale_pos_weight": 10.0}) == pytest.approx((1.0 + 1.0 * 1.0) / 20)
    assert policy.sensitivity({"scale_pos_weight": 1.0}) == pytest.approx((1.0 + 0.25) / 20)  # B = 0.25
    assert policy.sensitivity({"lambda": 40.0}) == pytest.approx(1.25 / 40)  # the task's larger lambda counts
    assert PrivacyPolicy(True, leaf_lambda=0.5).sensitivity({"lambda": 0.5}) == pytest.approx(2.0)  # at most 2W


def test_the_accountant_matches_the_analytic_gaussian_and_grows_with_tasks_shrinks_with_noise():
    def exact(sigma, count, delta):  # T Gaussian mechanisms = one of mu = sqrt(T)/sigma (Dong, Roth, Su)
        mu = math.sqrt(count) / sigma

        def gap(eps):
            return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

        low, high = 0.0, 200.0
        for _ in range(100):
            low, high = ((low + high) / 2, high) if gap((low + high) / 2) > 0 else (low, (low + high) / 2)
        return high

    for sigma, count in ((2.0, 20), (5.0, 60), (1.0, 3)):
        eps = epsilon_spent({sigma: count}, 1e-5)
        assert exact(sigma, count, 1e-5) <= eps <= exact(sigma, count, 1e-5) * 1.02 + 0.01  # an upper bound
    per_task = [epsilon_spent({3.0: 10 * tasks}, 1e-5) for tasks in (1, 2, 4)]
    assert per_task == sorted(per_task) and per_task[0] < per_task[2]
    by_noise = [epsilon_spent({sigma: 20}, 1e-5) for sigma in (1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True)
    assert epsilon_spent({2.0: 10, 4.0: 10}, 1e-5) < epsilon_spent({2.0: 20}, 1e-5)
    sigma = noise_for_budget(2.0, 1e-5, 40)
    assert epsilon_spent({sigma: 40}, 1e-5) <= 2.0 < epsilon_spent({sigma * 0.98: 40}, 1e-5)


def private_node(tmp_path, toy_banks, name="alpha", folder=None, **policy):
    X, y = toy_banks[name]
    work = tmp_path / (folder or name)
    privacy = PrivacyPolicy(True, **{"noise_multiplier": 2.0, "epsilon_budget": 10.0, **policy})
    return with_toy_data(BankNode(name, work, work, config=None, privacy=privacy), X, y)


def task(round_id=1, trees=4, bank="alpha", **params):
    return TrainTask(bank=bank, round_id=round_id, base_model_id="none", contract_hash="h", num_trees=trees,
                     params={**PARAMS, **params}).to_bytes()


def leaf_vector(update_bytes):
    return list(model_json.leaf_values(ModelUpdate.from_bytes(update_bytes).model))


def test_same_task_same_rows_same_update_and_the_noise_is_the_banks_secret(tmp_path, toy_banks):
    node = private_node(tmp_path, toy_banks)
    first = node.train(task())
    assert private_node(tmp_path, toy_banks).train(task()) == first  # a restart: same key, same update
    elsewhere = private_node(tmp_path, toy_banks, folder="other").train(task())  # another secret key
    assert leaf_vector(elsewhere) != leaf_vector(first)
    plain = with_toy_data(BankNode("alpha", tmp_path / "p", tmp_path / "p", config=None), *toy_banks["alpha"])
    assert leaf_vector(plain.train(task())) != leaf_vector(first)
    assert "privacy_epsilon" not in json.loads(plain.train(task()))  # old messages are unchanged


def test_noise_has_the_declared_scale(toy_banks):
    X, y = toy_banks["alpha"]
    t = TrainTask.from_bytes(task(trees=1))

    def leaves(sigma, seed):
        policy = PrivacyPolicy(True, noise_multiplier=sigma, leaf_clip=100.0, leaf_lambda=50.0)
        return np.array(list(model_json.leaf_values(model_json.to_doc(private_trees(t, X, y, TOY_FEATURES, policy,
                                                                                    seed)))))

    # the first tree's structure does not depend on the noise: same seed, noise scales with sigma
    noise = np.concatenate([leaves(3.0, seed) - leaves(0.3, seed) for seed in range(16)]) / PARAMS["eta"]
    expected = (3.0 - 0.3) * PrivacyPolicy(True, leaf_clip=100.0, leaf_lambda=50.0).sensitivity(PARAMS)
    assert len(noise) >= 80 and np.std(noise) == pytest.approx(expected, rel=0.2)
    assert np.abs(leaves(3.0, 5) - leaves(3.0, 5)).max() == 0  # seeded: the same noise again


def test_the_ledger_refuses_a_task_over_budget_and_remembers_across_restarts(tmp_path, toy_banks):
    node = private_node(tmp_path, toy_banks, epsilon_budget=3.5, noise_multiplier=4.0)
    one, two = epsilon_spent({4.0: 4}, 1e-5), epsilon_spent({4.0: 8}, 1e-5)
    assert two < 3.5 < epsilon_spent({4.0: 12}, 1e-5)  # two tasks of 4 trees fit, a third would not
    assert ModelUpdate.from_bytes(node.train(task(1))).privacy_epsilon == pytest.approx(one)
    assert ModelUpdate.from_bytes(node.train(task(1))).privacy_epsilon == pytest.approx(one)  # re-sent: free
    assert ModelUpdate.from_bytes(node.train(task(2))).privacy_epsilon == pytest.approx(two)
    restarted = private_node(tmp_path, toy_banks, epsilon_budget=3.5, noise_multiplier=4.0)
    with pytest.raises(TaskRefused) as refused:
        restarted.train(task(3))
    assert refused.value.check == "privacy_budget_exceeded" and "budget 3.5" in str(refused.value)
    ledger = PrivacyLedger(tmp_path / "alpha" / "privacy", 3.5, 1e-5)
    assert [e["round_id"] for e in ledger.entries()] == [1, 2] and ledger.spent() == pytest.approx(two)


def test_privacy_config_is_validated_and_spark_is_refused(tmp_path, toy_banks):
    assert PrivacyPolicy.from_dict(None).enabled is False
    assert PrivacyPolicy.from_dict({"enabled": True, "epsilon_budget": 2}).epsilon_budget == 2
    for wrong in ({"enabled": "yes"}, {"epsilon": 1}, {"delta": 1.5}, {"noise_multiplier": 0},
                  {"noise_multiplier": 0.1}, {"leaf_clip": -1}, {"gradient_clip": float("nan")}, [1]):
        with pytest.raises(ValueError, match="privacy"):
            PrivacyPolicy.from_dict(wrong)
    with pytest.raises(ValueError, match="engine 'local'"):
        BankNode("alpha", tmp_path, tmp_path, config=None, engine="spark", privacy=PrivacyPolicy(True))


@pytest.mark.parametrize("value", [-0.1, 2e6, True, "1", [1]])
def test_an_update_with_a_bad_epsilon_is_refused_and_old_updates_parse(value):
    good = ModelUpdate("alpha", 1, "none", "h", 0, {}, {}, {"learner": {}}, privacy_epsilon=1.5)
    body = json.loads(good.to_bytes())
    assert ModelUpdate.from_bytes(good.to_bytes()).privacy_epsilon == 1.5
    with pytest.raises(WireFormatError, match="privacy_epsilon"):
        ModelUpdate.from_bytes(json.dumps({**body, "privacy_epsilon": value}).encode())
    del body["privacy_epsilon"]
    assert ModelUpdate.from_bytes(json.dumps(body).encode()).privacy_epsilon is None


def test_the_agent_yaml_privacy_block_reaches_the_node(tmp_path):
    import yaml

    from bank_node.agent import Agent, AgentConfig, ConfigError

    for name in ("ca.crt", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    base = {"bank": "alpha", "aggregator_url": "https://127.0.0.1:1", "data": str(tmp_path / "raw"),
            "work_dir": str(tmp_path / "agent"),
            "tls": {k: str(tmp_path / f) for k, f in (("ca", "ca.crt"), ("cert", "cert.pem"), ("key", "key.pem"))}}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({**base, "privacy": {"enabled": True, "epsilon_budget": 3, "noise_multiplier": 5}}))
    node = Agent(AgentConfig.load(path), client=object()).node
    assert node.privacy == PrivacyPolicy(True, epsilon_budget=3, noise_multiplier=5)
    assert node.privacy_ledger.path == tmp_path / "agent" / "node" / "privacy" / "ledger.json"
    path.write_text(yaml.safe_dump({**base, "privacy": {"enabled": True, "budget": 3}}))
    with pytest.raises(ConfigError, match="privacy: unknown keys"):
        AgentConfig.load(path)


REPORT = {"training_allowed": True, "decline_reasons": [], "event_time_min": "2026-01-01T00:00:00",
          "event_time_max": "2026-03-01T00:00:00"}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["bagging", "cyclic"])
def test_a_private_federation_reports_each_banks_epsilon_in_mlflow_and_the_round_report(strategy, tmp_path,
                                                                                         toy_banks):
    from conftest import four_toy_banks

    from aggregator.drivers.embedded import run_federation
    from aggregator.tracking import FederationTracker
    from fedfraud.boundary import outgoing_problem
    from fedfraud.settings import FederationSettings

    nodes = {}
    for bank, (X, y) in four_toy_banks(toy_banks).items():
        work = tmp_path / "banks" / bank
        (work / "validation").mkdir(parents=True)
        (work / "validation" / "report.json").write_text(json.dumps(REPORT))
        privacy = PrivacyPolicy(True, epsilon_budget=50.0, noise_multiplier=3.0 if bank != "delta" else 6.0)
        nodes[bank] = with_toy_data(BankNode(bank, work, work, config=None, privacy=privacy), X, y)
    settings = FederationSettings(trees_per_round=3, max_depth=3, max_bin=16, crossval_max_trees=3,
                                  crossval_min_lift=0.0, crossval_max_contradiction_auc=0.0, acceptance_delta=None)
    aggregator = tmp_path / "aggregator"
    tracker = FederationTracker(f"sqlite:///{aggregator / 'mlflow.db'}", f"private-{strategy}")
    result = run_federation(nodes, strategy, 2, tracker, {"hash": "h", "names": TOY_FEATURES}, settings, seed=3,
                            work_dir=aggregator)
    assert result.version == 2

    runs = tracker.client.search_runs([tracker.experiment_id])
    parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    last_round = aggregator / "federations" / f"private-{strategy}" / "round-2"
    report = json.loads((last_round / "registered.json").read_text())
    for bank, node in nodes.items():  # the local model (3 trees) is charged too, then 3 trees a round
        sigma = node.privacy.noise_multiplier
        expected = [epsilon_spent({sigma: 3 + 3 * r}, 1e-5) for r in (1, 2)]
        history = tracker.client.get_metric_history(parent.info.run_id, f"privacy.epsilon.{bank}")
        assert [(m.step, m.value) for m in history] == [(r, pytest.approx(expected[r - 1])) for r in (1, 2)]
        assert node.privacy_ledger.spent() == pytest.approx(expected[1])
        assert report["privacy_epsilon"][bank] == pytest.approx(expected[1])
        assert outgoing_problem("update", (last_round / "updates" / f"{bank}.json").read_bytes()) is None
    assert report["privacy_epsilon"]["delta"] < report["privacy_epsilon"]["alpha"]  # more noise, less ε
