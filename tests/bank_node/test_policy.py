"""A bank's own policy: tasks outside its bounds are refused by name before any data is touched;
the agent's YAML sets the bounds."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from bank_node.policy import TaskRefused, TrainingPolicy
from fedfraud.config_file import ConfigError
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import TrainTask

PARAMS = {**consortium_params(FederationSettings(), 100, 20_000), "seed": 7}
TASK = TrainTask(bank="alpha", round_id=1, base_model_id="none", contract_hash="h", num_trees=20, params=PARAMS)


def test_the_consortium_defaults_are_accepted():
    TrainingPolicy().check(TASK)
    TrainingPolicy().check(dataclasses.replace(TASK, params={**PARAMS, "subsample": 1.0}))  # histogram


@pytest.mark.parametrize("change, check", [
    ({"max_depth": 30}, "policy_max_depth"),
    ({"eta": 1.0}, "policy_eta"),
    ({"eta": 0.0}, "policy_eta"),
    ({"min_child_weight": 0}, "policy_min_child_weight"),
    ({"lambda": 0.0}, "policy_lambda"),
    ({"max_bin": 100_000}, "policy_max_bin"),
    ({"scale_pos_weight": 1e9}, "policy_scale_pos_weight"),
    ({"base_score": 1.0}, "policy_base_score"),
    ({"max_depth": 6.5}, "policy_max_depth"),
    ({"eta": "0.1"}, "policy_eta"),
    ({"objective": "reg:squarederror"}, "policy_unknown_param"),
    ({"process_type": "update"}, "policy_unknown_param"),
])
def test_each_bound_refuses_by_name(change, check):
    with pytest.raises(TaskRefused) as refused:
        TrainingPolicy().check(dataclasses.replace(TASK, params={**PARAMS, **change}))
    assert refused.value.check == check


def test_trees_per_task_and_a_stricter_bank():
    with pytest.raises(TaskRefused, match="policy_num_trees"):
        TrainingPolicy().check(dataclasses.replace(TASK, num_trees=10_000))
    strict = TrainingPolicy(max_depth=4, max_eta=0.05)
    with pytest.raises(TaskRefused, match="max_depth 6 is outside"):
        strict.check(TASK)
    assert strict.received_limits().max_depth == 4


def test_agent_config_reads_the_policy(tmp_path):
    from bank_node.agent import AgentConfig

    tls = {name: str(tmp_path / name) for name in ("ca.crt", "cert.pem", "key.pem")}
    for file in tls.values():
        open(file, "w").close()
    base = {"bank": "alpha", "aggregator_url": "https://127.0.0.1:1", "data": "raw", "work_dir": "w",
            "tls": {"ca": tls["ca.crt"], "cert": tls["cert.pem"], "key": tls["key.pem"]}}
    path = tmp_path / "bank.yaml"
    path.write_text(yaml.safe_dump({**base, "policy": {"max_depth": 5, "max_eta": 0.2}}))
    assert AgentConfig.load(path).policy == TrainingPolicy(max_depth=5, max_eta=0.2)
    path.write_text(yaml.safe_dump(base))
    assert AgentConfig.load(path).policy == TrainingPolicy()
    for bad in ({"max_dept": 5}, {"max_depth": -1}, {"max_eta": "fast"}):
        path.write_text(yaml.safe_dump({**base, "policy": bad}))
        with pytest.raises(ConfigError, match="policy"):
            AgentConfig.load(path)
