"""What docker/stack_test.py drives the stack with: the interfaces its users have.

- ``Compose``: docker compose / docker on this machine (build, up, kill, restart, inspect);
- ``Airflow``: Airflow's REST API with a token for the admin user;
- ``MLflow``: the MLflow server's REST API;
- ``Aggregator``: the aggregator's operator API over mutual TLS, with the operator's (Airflow's) certificate.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parents[1]


class StackTestFailure(AssertionError):
    """A check of the stack test failed; the message says which and what was seen."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise StackTestFailure(message)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 2.0,
             retry_failures: bool = False) -> Any:
    """Call ``probe`` until it returns something truthy; fail naming ``what`` (and the last error) at the deadline.

    Connection errors are retried; a failed check ends the wait at once unless ``retry_failures``."""
    deadline, last_error = time.monotonic() + timeout, None
    retried: tuple[type[Exception], ...] = (httpx.HTTPError, subprocess.CalledProcessError, KeyError, ValueError)
    if retry_failures:
        retried += (StackTestFailure,)
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except retried as exc:
            last_error = f"{exc.__class__.__name__}: {exc}"
        time.sleep(interval)
    last = f" (last error: {last_error})" if last_error else ""
    raise StackTestFailure(f"{what}: not within {timeout:.0f}s{last}")


class Compose:
    FILES = ("docker-compose.yml", "docker/compose.stack-test.yml")
    BUILD_FILES = (*FILES, "docker/compose.build-host-network.yml")

    def __init__(self, project: str = "fedfraud"):
        self.project = project

    def command(self, *args: str, build: bool = False) -> list[str]:
        files = [word for name in (self.BUILD_FILES if build else self.FILES) for word in ("-f", str(ROOT / name))]
        return ["docker", "compose", "--project-directory", str(ROOT), "-p", self.project, *files, *args]

    def run(self, *args: str, build: bool = False, capture: bool = True, timeout: float = 1800) -> str:
        result = subprocess.run(self.command(*args, build=build), cwd=ROOT, text=True, timeout=timeout,
                                stdout=subprocess.PIPE if capture else None,
                                stderr=subprocess.STDOUT if capture else None)
        if result.returncode != 0:
            raise StackTestFailure(f"`docker compose {' '.join(args)}` exited {result.returncode}:\n"
                                   f"{(result.stdout or '')[-4000:]}")
        return result.stdout or ""

    def services(self) -> dict[str, dict]:
        """Service -> its container as `docker compose ps` reports it (State, Health, ExitCode)."""
        out = self.run("ps", "--all", "--format", "json")
        rows = json.loads(out) if out.strip().startswith("[") else [json.loads(line) for line in out.splitlines()
                                                                       if line.strip()]
        return {row["Service"]: row for row in rows}

    def container(self, service: str) -> str:
        found = self.run("ps", "--all", "-q", service).split()
        check(len(found) == 1, f"expected one container for {service}, got {found}")
        return found[0]

    def inspect(self, service: str) -> dict:
        return json.loads(docker("inspect", self.container(service)))[0]


def docker(*args: str, check_rc: bool = True, timeout: float = 600) -> str:
    result = subprocess.run(["docker", *args], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=timeout)
    if check_rc and result.returncode != 0:
        raise StackTestFailure(f"`docker {' '.join(args)}` exited {result.returncode}: {result.stdout[-2000:]}")
    return result.stdout


def docker_run(*args: str, timeout: float = 300) -> tuple[int, str]:
    result = subprocess.run(["docker", "run", "--rm", *args], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=timeout)
    return result.returncode, result.stdout


class Airflow:
    def __init__(self, url: str, username: str, password: str):
        self.http = httpx.Client(base_url=url, timeout=60)
        response = self.http.post("/auth/token", json={"username": username, "password": password})
        check(response.status_code in (200, 201), f"Airflow token for {username}: HTTP {response.status_code} "
                                                  f"{response.text[:300]}")
        self.http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def call(self, method: str, path: str, **kwargs) -> Any:
        response = self.http.request(method, f"/api/v2{path}", **kwargs)
        check(response.status_code < 400, f"Airflow {method} {path}: HTTP {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None

    def unpause(self, dag_id: str) -> None:
        wait_for(f"Airflow has parsed {dag_id}", lambda: self.call("GET", f"/dags/{dag_id}"), 300)
        self.call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, run_id: str, conf: dict) -> dict:
        return self.call("POST", f"/dags/{dag_id}/dagRuns", json={"dag_run_id": run_id, "logical_date": None,
                                                                   "conf": conf})

    def runs(self, dag_id: str) -> list[dict]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100})["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def fail_run(self, dag_id: str, run_id: str) -> None:
        self.call("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}", json={"state": "failed"})

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                         params={"limit": 1000})["task_instances"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Any:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
                         params={"map_index": map_index})["value"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> dict:
        def finished():
            run = self.run(dag_id, run_id)
            return run if run["state"] in ("success", "failed") else None

        run = wait_for(f"{dag_id} run {run_id} to finish", finished, timeout, interval=5)
        if run["state"] != "success":
            failed = [f"{t['task_id']}[{t.get('map_index', -1)}] try {t.get('try_number')}: {t['state']}"
                      for t in self.task_instances(dag_id, run_id) if t["state"] in ("failed", "upstream_failed")]
            raise StackTestFailure(f"{dag_id} run {run_id} ended {run['state']}; failed tasks: {failed}")
        return run


class MLflow:
    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=60)

    def call(self, path: str, **params) -> dict:
        response = self.http.get(f"/api/2.0/mlflow/{path}", params=params)
        check(response.status_code == 200, f"MLflow {path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json()

    def versions(self, model: str) -> list[dict]:
        found = self.call("model-versions/search", filter=f"name='{model}'", max_results=1000)
        return sorted(found.get("model_versions", []), key=lambda v: int(v["version"]))

    def aliases(self, model: str) -> dict[str, str]:
        model_info = self.call("registered-models/get", name=model)["registered_model"]
        return {a["alias"]: a["version"] for a in model_info.get("aliases", [])}


def tags(version: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in version.get("tags", [])}


def federation_key(model_name: str, run_id: str) -> str:
    """The aggregator's name for an Airflow run's federation: the same formula as the DAG's networked tasks
    (``federation_key`` in the aggregator's Airflow driver). A mismatch shows as 404 unknown_federation."""
    raw = f"{model_name}--{run_id}"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', raw)[:80]}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}"


class Aggregator:
    """The operator API, as Airflow calls it, from this machine (port 8443) with Airflow's certificate."""

    def __init__(self, url: str, certs: Path):
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        context.load_cert_chain(str(certs / "cert.pem"), str(certs / "key.pem"))
        self.http = httpx.Client(base_url=url, verify=context, timeout=30)

    def get(self, path: str) -> dict:
        response = self.http.get(f"/v1{path}")
        check(response.status_code == 200, f"aggregator GET {path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json()

    def federation(self, key: str) -> dict:
        return self.get(f"/federations/{key}")

    def round(self, key: str, round_id: int) -> dict | None:
        response = self.http.get(f"/v1/federations/{key}/rounds/{round_id}")
        if response.status_code == 404:
            return None
        check(response.status_code == 200, f"aggregator round {round_id}: HTTP {response.status_code} {response.text}")
        return response.json()
