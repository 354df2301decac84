"""The stack test's checks of the images and containers, and its faults: a killed bank, a crashed
aggregator, a restarted Postgres, and intruders on the federation network (docker/stack_test.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from stack_clients import (ROOT, Aggregator, Airflow, Compose, MLflow, StackTestFailure, check, docker, docker_run,
                           tags, wait_for)

IMAGES = {"fedfraud-bank-node:local": True, "fedfraud-aggregator:local": True, "fedfraud-airflow:local": False}
READ_ONLY = ("aggregator", "mlflow", "bank-a", "bank-b", "bank-c")
SECRET_KEYS = ("PASSWORD", "SECRET", "FERNET", "KEY")
NETWORK = "fedfraud_federation"
HARDENED_RUN = ("--read-only", "--tmpfs", "/tmp:exec", "-v", "/var/lib/fedfraud", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges:true")  # an anonymous work volume, removed with --rm


def check_images(compose: Compose, secrets: dict[str, str]) -> None:
    """Non-root, a healthcheck where the image is a service, and no secret or key in any layer."""
    values = {k: v for k, v in secrets.items() if any(s in k for s in SECRET_KEYS) and len(v) >= 8}
    check(values, "no secrets found in .env to look for")
    for image, has_healthcheck in IMAGES.items():
        info = json.loads(docker("image", "inspect", image))[0]
        config = info["Config"]
        check(config.get("User") not in (None, "", "root", "0"), f"{image} runs as {config.get('User')!r}")
        check(not has_healthcheck or bool(config.get("Healthcheck")), f"{image} has no HEALTHCHECK")
        layers = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
        for text, where in ((layers, "docker history"), (json.dumps(config.get("Env")), "its environment")):
            leaked = [k for k, v in values.items() if v in text]
            check(not leaked, f"{image}: {where} holds the value of {leaked}")
            check("PRIVATE KEY" not in text, f"{image}: {where} holds a private key")
        rc, found = docker_run("--user", "0", "--entrypoint", "find", image, "/", "-xdev", "(", "-name", "key.pem",
                               "-o", "-name", "ca.key", "-o", "-name", ".env", ")", "-print")
        check(rc in (0, 1) and not found.strip(), f"{image} contains key or .env files: {found.strip()[:500]}")
        print(f"    {image}: user {config['User']}, {info['Size'] / 1e9:.2f} GB, {len(layers.splitlines())} layers, "
              "no secret in its history")


def check_running_hardening(compose: Compose) -> None:
    for service in compose.services():
        if service == "airflow-init":
            continue
        info = compose.inspect(service)
        host = info["HostConfig"]
        if service != "postgres":
            check("ALL" in (host.get("CapDrop") or []), f"{service} keeps Linux capabilities: {host.get('CapDrop')}")
            check(info["Config"].get("User") == "fedfraud", f"{service} runs as {info['Config'].get('User')!r}")
        check("no-new-privileges:true" in (host.get("SecurityOpt") or []), f"{service}: no no-new-privileges")
        check(host.get("ReadonlyRootfs") == (service in READ_ONLY), f"{service}: read-only root is "
                                                                     f"{host.get('ReadonlyRootfs')}")
        if service.startswith("bank-"):
            check(not host.get("PortBindings"), f"{service} publishes {host.get('PortBindings')}")


def _intruder_config(folder: Path, bank: str) -> Path:
    config = folder / "node.yaml"
    config.write_text(f"bank: {bank}\naggregator_url: https://aggregator:8443\ndata: /data/raw\n"
                      "work_dir: /var/lib/fedfraud\ntls: {ca: /consortium/ca.crt, cert: /certs/cert.pem, "
                      "key: /certs/key.pem}\nretry: {attempts: 2, backoff_seconds: 1, max_backoff_seconds: 1}\n")
    return config


def _intrude(name: str, folder: Path, bank: str) -> str:
    """A bank agent on the federation network with ``folder``'s certificate; the consortium's CA to trust."""
    uid = int(next(line.split("=", 1)[1] for line in (ROOT / ".env").read_text().splitlines()
                   if line.startswith("FEDFRAUD_UID=")))
    config = _intruder_config(folder, bank)
    if os.getuid() == 0:  # keys are 0600: hand them to the containers' user, as `make stack` does
        for path in (folder, *folder.iterdir()):
            os.chown(path, uid, -1)
    ca = ROOT / "work" / "stack" / "certs" / "bankA" / "ca.crt"
    rc, out = docker_run("--name", name, "--network", NETWORK, *HARDENED_RUN,
                         "-v", f"{folder}:/certs:ro", "-v", f"{ca}:/consortium/ca.crt:ro",
                         "-v", f"{config}:/etc/fedfraud/node.yaml:ro", "fedfraud-bank-node:local",
                         "fedfraud", "node", "run", "--config", "/etc/fedfraud/node.yaml", "--once")
    check(rc != 0, f"{name}: the aggregator let it in (exit 0): {out[-1500:]}")
    return out


def check_refusals(compose: Compose, scratch: Path) -> None:
    venv = ROOT / ".venv" / "bin"
    foreign = scratch / "foreign"
    shutil.rmtree(foreign, ignore_errors=True)
    subprocess.run([str(venv / "fedfraud"), "provision", "--consortium", "foreign", "--participants",
                    "aggregator,bankA", "--out", str(foreign)], check=True, stdout=subprocess.DEVNULL)
    out = _intrude("fedfraud-stacktest-foreign", foreign / "bankA", "bankA")
    # TLS 1.3: the server checks the client's certificate after the client's side of the handshake and
    # drops the connection; no HTTP response ever arrives (httpx logs one line per response it gets).
    check("HTTP Request:" not in out and any(s in out for s in ("Server disconnected", "SSL", "certificate")),
          f"foreign-CA certificate: refused, but not at the TLS handshake: {out[-1500:]}")
    print(f"    foreign CA: {out.strip().splitlines()[-1][:240]}")
    # bankD held a certificate from the consortium's CA and was then removed from the consortium
    # (it is not in the aggregator's config): a valid certificate of a non-participant.
    from fedfraud.pki import issue

    removed = scratch / "removed"
    shutil.rmtree(removed, ignore_errors=True)
    folder = issue(ROOT / "work" / "stack" / "certs" / "ca", "bankD", "bank", removed)
    out = _intrude("fedfraud-stacktest-removed", folder, "bankD")
    check("403 unknown_participant" in out, f"removed participant: expected 403 unknown_participant: {out[-1500:]}")
    print(f"    removed participant: {out.strip().splitlines()[-1][:240]}")


def freeze(compose: Compose, service: str) -> None:
    """`docker pause`: the service's processes stop at once, mid-whatever, until killed or unpaused."""
    docker("pause", compose.container(service))


def kill_bank_mid_round(compose: Compose, aggregator: Aggregator, key: str, round_id: int, service: str,
                        bank: str) -> None:
    """`docker kill` the bank (frozen by ``freeze`` before the round opened, so its training task is surely
    still open: a 5-tree round on warm data is over in seconds); it stays down until the training phase
    has closed without it (quorum; its silence costs ``liveness_seconds``), then comes back and answers
    the round's evaluation."""
    status = wait_for(f"round {round_id} open", lambda: aggregator.round(key, round_id), 1800, interval=0.2)
    state = status["tasks"].get(bank, {}).get("train")
    check(state in ("pending", "fetched"), f"{bank}'s round-{round_id} training task is {state!r}: too late to kill")
    container = compose.container(service)
    docker("kill", container)  # still frozen: it dies without running another instruction (no unpause first:
    docker("stop", container)  # under load the gap let it finish the round); engines that restart it: keep it down
    print(f"    killed {service} while its training task was {state}")
    status = wait_for(f"round {round_id}'s training phase to close without {bank}",
                      lambda: (s := aggregator.round(key, round_id)) and s["state"] != "training" and s, 900)
    # the round goes on to its next phase (accepting / evaluating / ...) without the bank, or has failed
    check(status["state"] != "failed", f"round {round_id} after the kill: {status}")
    check(status["tasks"][bank]["train"] == "expired", f"{bank}'s training task: {status['tasks'][bank]}")
    others = {b: t.get("train") for b, t in status["tasks"].items() if b != bank}
    check(all(state == "done" for state in others.values()), f"the other banks' training: {others}")
    docker("start", compose.container(service))
    print(f"    round {round_id} aggregated the quorum {sorted(others)}; {service} restarted")
    status = wait_for(f"round {round_id} registered", lambda: (s := aggregator.round(key, round_id))
                      and s["state"] in ("registered", "failed") and s, 900)
    check(status["state"] == "registered", f"round {round_id}: {status}")


def _kill_service_process(compose: Compose, service: str) -> None:
    """SIGKILL the service's main process (under the container's init), as the kernel's OOM killer would.
    Not `docker kill`: Docker counts that as a manual stop and its restart policy would not apply."""
    finder = ("import os, signal\n"
              "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
              "    cmd = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
              "    if int(pid) > 1 and b'serve' in cmd:\n"
              "        os.kill(int(pid), signal.SIGKILL); print('killed', pid); break\n")
    out = docker("exec", compose.container(service), "python", "-c", finder)
    check("killed" in out, f"no `serve` process found in {service}: {out}")


def crash_aggregator_mid_round(compose: Compose, aggregator: Aggregator, key: str, round_id: int) -> None:
    wait_for(f"round {round_id} open", lambda: aggregator.round(key, round_id), 1800, interval=0.5)
    restarts = compose.inspect("aggregator")["RestartCount"]
    _kill_service_process(compose, "aggregator")
    wait_for("the aggregator restarted by its restart policy", lambda: compose.inspect("aggregator")["RestartCount"]
             > restarts and compose.inspect("aggregator")["State"]["Status"] == "running", 300)
    wait_for("the aggregator healthy again", lambda: compose.inspect("aggregator")["State"].get("Health", {})
             .get("Status") == "healthy", 300)
    status = wait_for(f"round {round_id} registered after the crash", lambda: (s := aggregator.round(key, round_id))
                      and s["state"] in ("registered", "failed") and s, 1800, retry_failures=True)
    check(status["state"] == "registered", f"round {round_id} after the crash: {status['state']}: {status['error']}")
    print(f"    aggregator restarted ({restarts} -> {compose.inspect('aggregator')['RestartCount']}); round {round_id} "
          f"resumed and registered version {status['version']}")


def _snapshot(airflow: Airflow, aggregator: Aggregator, mlflow: MLflow, key: str, run_id: str, rounds: int) -> dict:
    return {
        "airflow run": airflow.run("federated_round", run_id)["state"],
        "airflow tasks": sorted((t["task_id"], t.get("map_index", -1), t["state"], t.get("try_number"))
                                for t in airflow.task_instances("federated_round", run_id)),
        "federation": aggregator.federation(key),
        "rounds": [aggregator.round(key, r) for r in range(1, rounds + 1)],
        "model versions": [(v["version"], tags(v)) for v in mlflow.versions("fedfraud")],
        "aliases": mlflow.aliases("fedfraud"),
    }


def restart_postgres_and_compare(compose: Compose, airflow: Airflow, aggregator: Aggregator, mlflow: MLflow, key: str,
                                 run_id: str, rounds: int, wait_healthy: Callable[[], None]) -> None:
    before = _snapshot(airflow, aggregator, mlflow, key, run_id, rounds)
    compose.run("restart", "postgres", capture=False, timeout=300)
    wait_healthy()
    after = wait_for("every service answering after the restart", lambda: _snapshot(
        airflow, aggregator, mlflow, key, run_id, rounds), 600, interval=5, retry_failures=True)
    lost = [name for name in before if before[name] != after[name]]
    changes = {n: (before[n], after[n]) for n in lost}
    check(not lost, f"changed across the Postgres restart: {lost}: {changes}"[:3000])
    print(f"    unchanged: {len(before['airflow tasks'])} Airflow task instances, "
          f"federation {before['federation']['state']}, {len(before['rounds'])} rounds, "
          f"{len(before['model versions'])} model versions, aliases {before['aliases']}")


__all__ = ["StackTestFailure", "check_images", "check_refusals", "check_running_hardening",
           "crash_aggregator_mid_round", "kill_bank_mid_round", "restart_postgres_and_compare"]
