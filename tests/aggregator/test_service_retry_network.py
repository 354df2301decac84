"""A bank's agent dies mid-round in the networked deployment (four bank agents, the service, each its own
process): the round fails within its deadline, Airflow's networked task bodies retry it, the service runs its
next attempt with the banks still healthy, and the federation goes on."""

from __future__ import annotations

import json
import signal
import time

import pytest
from test_service_network import DEADLINE_S, Stack, registered_version

pytestmark = pytest.mark.slow
BANKS = ["alpine", "baltic", "celtic", "danube"]
LIVENESS_S = 10  # a bank silent this long is given up (its agent beats every 2 s)


@pytest.fixture(scope="module")
def stack(consortium, tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("retry"), consortium, banks=BANKS, liveness_seconds=LIVENESS_S,
                  agent_options={"remote_beat_seconds": 2})
    try:
        for bank in BANKS:
            stack.start_agent(bank)
        stack.start_service()
        yield stack
    finally:
        stack.stop()


def test_a_histogram_round_whose_bank_died_runs_again_with_the_healthy_banks_when_airflow_retries_it(
        stack, monkeypatch):
    from mlflow import MlflowClient

    from aggregator.drivers.airflow_networked import NetworkedTasks, RoundAttemptFailed
    from aggregator.drivers.airflow_spec import RunSpec

    folder = stack.certs / "airflow"
    for name, value in {"FEDFRAUD_AGGREGATOR_URL": stack.url, "FEDFRAUD_TLS_CA": folder / "ca.crt",
                        "FEDFRAUD_TLS_CERT": folder / "cert.pem", "FEDFRAUD_TLS_KEY": folder / "key.pem"}.items():
        monkeypatch.setenv(name, str(value))
    tasks = NetworkedTasks(RunSpec(banks=dict.fromkeys(BANKS, ""), model_name="net-retry", strategy="histogram",
                                   rounds=3, min_banks=3, trees_per_round=5, mode="networked", wait_seconds=240,
                                   crossval=False, champion_gate=False, run_id="retry-1"))
    for bank in BANKS:
        tasks.prepare_bank(bank)
    assert tasks.open_federation() == BANKS
    tasks.open_round(1)
    tasks.finish_round(1)

    danube = stack.processes["danube"]
    danube.send_signal(signal.SIGSTOP)  # frozen: it neither beats nor answers round 2; killed once the round failed
    tasks.open_round(2)
    opened = time.monotonic()
    with pytest.raises(RoundAttemptFailed, match="attempt 1 of at most 3"):
        tasks.finish_round(2)
    assert time.monotonic() - opened < DEADLINE_S + 5, "the round outlived its deadline"  # the wait polls every 2 s
    danube.kill()
    danube.wait(10)

    tasks.finish_round(2)  # Airflow's retry of the task: the round's next attempt, then its registration
    status = tasks.service.round(tasks.key, 2)
    assert (status["state"], status["attempt"], status["banks"]) == ("registered", 2, BANKS[:3]), status
    earlier = status["earlier_attempts"][0]
    assert "danube" in earlier["error"] and set(earlier["left_out"]) == {"danube"}, earlier
    assert earlier["tasks"]["danube"]["histogram"] == "expired"
    tags = registered_version(stack, "net-retry", status["version"]).tags
    assert tags["fedfraud.participating_banks"] == ",".join(BANKS[:3])
    workspace = stack.root / "aggregator" / "runs" / tasks.key / "federations" / "net-retry"
    assert (workspace / "round-2.attempt-1").is_dir()  # the failed attempt's files, set aside
    assert json.loads((workspace / "round-2" / "collective.json").read_text())["world"] == "new"

    tasks.open_round(3)  # the federation goes on: danube, silent, is left out of the round's world
    tasks.finish_round(3)
    assert tasks.service.round(tasks.key, 3)["attempt"] == 1
    versions = MlflowClient(tracking_uri=stack.tracking_uri).search_model_versions("name='net-retry'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]  # one per round: the failed attempt registered none
