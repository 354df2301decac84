"""``share_local_model`` in the agent's YAML: the bank decides whether its local model leaves for
cross-evaluation (default yes); a wrong value is refused by name, and the node it builds obeys it."""

from __future__ import annotations

import pytest
import yaml

from bank_node.acceptance import LocalModelRefused
from bank_node.agent import Agent, AgentConfig, ConfigError
from fedfraud.protocol import TaskKind
from fedfraud.wire import TrainTask, WireFormatError


@pytest.fixture
def write_config(tmp_path):
    for name in ("ca.crt", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    tls = {"ca": str(tmp_path / "ca.crt"), "cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    good = {"bank": "alpha", "aggregator_url": "https://127.0.0.1:1", "data": str(tmp_path / "raw"),
            "work_dir": str(tmp_path / "agent"), "tls": tls}

    def write(**extra):
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump({**good, **extra}))
        return path

    return write


def task(round_id: int) -> bytes:
    return TrainTask(bank="alpha", round_id=round_id, base_model_id="none", contract_hash="h", num_trees=2,
                     params={}).to_bytes()


def test_share_local_model_defaults_to_true_and_must_be_a_bool(write_config):
    assert AgentConfig.load(write_config()).share_local_model is True
    assert AgentConfig.load(write_config(share_local_model=False)).share_local_model is False
    for wrong in ("no", 0, None, [True]):
        with pytest.raises(ConfigError, match="share_local_model must be true or false"):
            AgentConfig.load(write_config(share_local_model=wrong))


def test_a_bank_that_does_not_share_refuses_the_local_model_task(write_config):
    agent = Agent(AgentConfig.load(write_config(share_local_model=False)), client=object())
    assert agent.node.share_local_model is False
    with pytest.raises(LocalModelRefused, match="alpha does not share its local model"):
        agent.compute(TaskKind.LOCAL_MODEL, task(0))


def test_a_sharing_bank_goes_on_to_check_the_task(write_config):
    agent = Agent(AgentConfig.load(write_config()), client=object())
    assert agent.node.share_local_model is True
    with pytest.raises(WireFormatError, match="round 0"):  # past the policy: the task itself is checked
        agent.compute(TaskKind.LOCAL_MODEL, task(1))
