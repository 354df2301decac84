"""The compose stack's hardening, and the two override files `make stack-test` adds, checked without Docker."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
READ_ONLY = {"aggregator", "mlflow", "bank-a", "bank-b", "bank-c"}


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_every_service_drops_capabilities_and_privilege_escalation(services):
    for name, service in services.items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        if name != "postgres":  # its entrypoint owns the data directory, then drops to user postgres
            assert not service.get("cap_add"), f"{name} adds {service.get('cap_add')}"
    assert set(services["postgres"]["cap_add"]) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"}


def test_bank_nodes_aggregator_and_mlflow_have_read_only_roots_with_a_private_tmp(services):
    for name, service in services.items():
        assert bool(service.get("read_only")) == (name in READ_ONLY), name
        if name in READ_ONLY:
            tmp = [t for t in service.get("tmpfs", []) if t.split(":")[0] == "/tmp"]
            assert len(tmp) == 1 and "size=" in tmp[0], (name, tmp)
            # Java maps the native libraries it extracts to /tmp: the banks' /tmp needs exec, no other does
            assert ("exec" in tmp[0].split(":")[1].split(",")) == name.startswith("bank-"), (name, tmp)
    for name in ("bank-a", "bank-b", "bank-c"):
        assert services[name]["environment"]["SPARK_LOCAL_DIRS"].startswith("/var/lib/fedfraud/")


def test_the_build_override_only_puts_every_build_on_the_host_network(services):
    override = yaml.safe_load((ROOT / "docker" / "compose.build-host-network.yml").read_text())["services"]
    built = {name for name, service in services.items() if "build" in service}
    assert set(override) == built
    for name, service in override.items():
        assert service == {"build": {"network": "host"}}, name


def test_the_stack_test_override_only_shortens_waits(services):
    override = yaml.safe_load((ROOT / "docker" / "compose.stack-test.yml").read_text())["services"]
    assert set(override) == {"aggregator", "airflow-scheduler", "airflow-dag-processor"}
    mounts = override["aggregator"]["volumes"]
    assert mounts == ["./docker/config/aggregator.stack-test.yaml:/etc/fedfraud/aggregator.yaml:ro"]
    main = yaml.safe_load((ROOT / "docker" / "config" / "aggregator.yaml").read_text())
    test = yaml.safe_load((ROOT / "docker" / "config" / "aggregator.stack-test.yaml").read_text())
    assert {k: v for k, v in test.items() if k != "deadline_seconds"} == {
        k: v for k, v in main.items() if k != "deadline_seconds"}
    assert test["deadline_seconds"] < main["deadline_seconds"]
    for name in ("airflow-scheduler", "airflow-dag-processor"):
        assert override[name] == {"environment": {"FEDFRAUD_RETRY_DELAY_SECONDS": "20"}}
