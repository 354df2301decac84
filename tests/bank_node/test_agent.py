"""The bank's agent: its config, and its ledger (a task is computed once and lands once),
against the real coordinator and sqlite state, called in process instead of over HTTPS."""

from __future__ import annotations

import pytest
import yaml
from conftest import bank_summary as summary, federation_request as request, make_coordinator

from aggregator.service import store
from aggregator.service.intake import Refused
from bank_node.agent import Agent, AgentConfig, ConfigError
from fedfraud.config_file import TLSFiles
from fedfraud.transport import AggregatorUnreachable, ServiceRefused


class InProcessClient:
    """The agent's view of the aggregator, wired straight to a ``Coordinator`` as ``bank``."""

    def __init__(self, coordinator, bank: str, lose: str | None = None):
        self.c, self.bank, self.lose = coordinator, bank, lose  # lose: "request" or "answer" of one upload

    def _call(self, fn, *args):
        try:
            return fn(self.bank, *args)
        except Refused as exc:
            raise ServiceRefused(exc.status, exc.check, exc.detail) from exc

    def next_task(self, wait_s: float = 0.0):
        self.c.seen(self.bank)
        return self.c.next_task(self.bank)

    def heartbeat(self):
        self.c.seen(self.bank)

    def task_input(self, tid):
        return self._call(self.c.task_input, tid)

    def upload_result(self, tid, body):
        lose, self.lose = self.lose, None
        if lose == "request":
            raise AggregatorUnreachable("connection reset before the upload arrived")
        answer = self._call(self.c.accept_result, tid, body)
        if lose == "answer":
            raise AggregatorUnreachable("connection reset after the upload arrived")
        return answer

    def upload_failure(self, tid, reason):
        return self._call(self.c.accept_failure, tid, reason)


class CountingAgent(Agent):
    """The real agent; its node work is replaced by a fixed summary so the ledger is what is tested."""

    computed = 0
    fail_with: Exception | None = None
    answer: bytes | None = None

    def compute(self, kind, data):
        type(self).computed += 1
        if self.fail_with is not None:
            raise self.fail_with
        return self.answer or summary(self.config.bank)


@pytest.fixture
def agent_config(tmp_path):
    tls = TLSFiles(tmp_path / "ca.crt", tmp_path / "cert.pem", tmp_path / "key.pem")
    return AgentConfig(bank="alpha", aggregator_url="https://127.0.0.1:1", data=tmp_path / "raw",
                       work_dir=tmp_path / "agent", tls=tls)


@pytest.fixture
def coordinator(tmp_path):
    c = make_coordinator(tmp_path / "service")
    c.start_federation("f1", request())
    CountingAgent.computed, CountingAgent.fail_with, CountingAgent.answer = 0, None, None
    return c


def test_an_upload_lost_on_the_way_is_resent_from_the_ledger_without_recomputing(agent_config, coordinator):
    with pytest.raises(AggregatorUnreachable):  # the agent process would exit; its container restarts
        CountingAgent(agent_config, InProcessClient(coordinator, "alpha", lose="request")).run(once=True)
    assert coordinator.federation_status("f1")["summaries"]["alpha"]["summary"] == "pending"  # still open
    CountingAgent(agent_config, InProcessClient(coordinator, "alpha")).run(once=True)
    assert CountingAgent.computed == 1
    assert coordinator.federation_status("f1")["summaries"]["alpha"]["summary"] == "done"


def test_an_answer_lost_on_the_way_back_never_makes_a_second_upload(agent_config, coordinator):
    task = coordinator.next_task("alpha")
    with pytest.raises(AggregatorUnreachable):
        CountingAgent(agent_config, InProcessClient(coordinator, "alpha", lose="answer")).handle(task)
    restarted = CountingAgent(agent_config, InProcessClient(coordinator, "alpha"))
    restarted.run(once=True)  # nothing is offered again: the aggregator has it
    restarted.handle(task)  # even if it were, the aggregator's verdict is "duplicate" and the agent stops there
    assert CountingAgent.computed == 1
    assert restarted.ledger.closed(task["id"])


def test_a_bank_that_cannot_do_a_task_says_why_and_the_phase_does_not_wait_for_it(agent_config, coordinator):
    CountingAgent.fail_with = RuntimeError("fraud rate 9% is outside the validation band")
    CountingAgent(agent_config, InProcessClient(coordinator, "alpha")).run(once=True)
    assert coordinator.federation_status("f1")["summaries"]["alpha"]["summary"] == "failed"
    assert coordinator.next_task("alpha") is None


def test_a_refused_answer_is_not_sent_again_and_the_task_ends_with_the_reason(agent_config, coordinator):
    CountingAgent.answer = b'{"bank": "alpha", "counts": '  # truncated
    CountingAgent(agent_config, InProcessClient(coordinator, "alpha")).run(once=True)
    with coordinator.Session() as s:
        task = s.query(store.Task).filter_by(bank="alpha").one()
        assert task.state == "failed" and "malformed" in task.detail
    assert CountingAgent.computed == 1


def test_the_config_names_what_is_wrong(tmp_path):
    def load(**content):
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump(content))
        return AgentConfig.load(path)

    for name in ("ca.crt", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    tls = {"ca": str(tmp_path / "ca.crt"), "cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    good = {"bank": "alpha", "aggregator_url": "https://agg:8443", "data": "/d", "work_dir": "/w", "tls": tls}
    assert load(**good).retry.attempts == 8
    with pytest.raises(ConfigError, match="missing key.*aggregator_url"):
        load(**{k: v for k, v in good.items() if k != "aggregator_url"})
    with pytest.raises(ConfigError, match="unknown key.*colour"):
        load(**good, colour="red")
    with pytest.raises(ConfigError, match="must be https"):
        load(**{**good, "aggregator_url": "http://agg:8443"})
    with pytest.raises(ConfigError, match="not found.*nowhere"):
        load(**{**good, "tls": {**tls, "key": "/nowhere/key.pem"}})
    with pytest.raises(ConfigError, match="retry takes"):
        load(**good, retry={"tries": 3})
    assert load(**good).share_metrics is False and load(**good, share_metrics=True).share_metrics is True
    with pytest.raises(ConfigError, match="share_metrics must be true or false"):
        load(**good, share_metrics="yes")


def test_node_health_reports_the_agents_heartbeat(tmp_path, coordinator):
    from typer.testing import CliRunner

    from fedfraud.cli import app

    tls = {}
    for key, name in (("ca", "ca.crt"), ("cert", "cert.pem"), ("key", "key.pem")):
        (tmp_path / name).write_text("x")
        tls[key] = str(tmp_path / name)
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"bank": "alpha", "aggregator_url": "https://agg:8443", "data": str(tmp_path),
                                    "work_dir": str(tmp_path / "agent"), "tls": tls}))
    health = ["node", "health", "--config", str(path)]
    result = CliRunner().invoke(app, health)
    assert result.exit_code == 1 and "no heartbeat" in result.output
    CountingAgent(AgentConfig.load(path), InProcessClient(coordinator, "alpha")).run(once=True)
    result = CliRunner().invoke(app, health)
    assert result.exit_code == 0 and "alive" in result.output
