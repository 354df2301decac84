"""`make stack-test`: build the images, bring the whole stack up, and drive it the way its users do.

Airflow's REST API triggers `federated_round` (3 rounds) and `score_transactions`; MLflow's REST API
shows what was registered; the aggregator's operator API (Airflow's certificate) shows each round.
Faults on the way: a bank killed mid-round, the aggregator crashed mid-round, Postgres restarted,
and two containers on the federation network with certificates the aggregator must refuse.
The stack and its volumes are torn down at the end, also when a step fails or on SIGINT/SIGTERM;
each step's time is printed. Run with the project's venv: `.venv/bin/python docker/stack_test.py`.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from stack_clients import (ROOT, Aggregator, Airflow, Compose, MLflow, StackTestFailure, check, docker, federation_key,
                           tags, wait_for)
from stack_faults import (check_images, check_refusals, check_running_hardening, crash_aggregator_mid_round, freeze,
                          kill_bank_mid_round, restart_postgres_and_compare)

BANKS = ("bankA", "bankB", "bankC")
MODEL = "fedfraud"
ROUNDS = 3
SCRATCH = ROOT / "work" / "stack-test"
TIMINGS: list[tuple[str, float, str]] = []


@contextmanager
def step(name: str):
    print(f"\n==> {name}", flush=True)
    start = time.monotonic()
    try:
        yield
    except BaseException:
        TIMINGS.append((name, time.monotonic() - start, "FAILED"))
        raise
    TIMINGS.append((name, time.monotonic() - start, "ok"))
    print(f"    ok in {time.monotonic() - start:.1f}s", flush=True)


def env_file() -> dict[str, str]:
    path = ROOT / ".env"
    check(path.is_file(), f"{path} is missing: run `make stack-test` (it writes .env, certificates and data first)")
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def preflight(compose: Compose) -> None:
    docker("info", timeout=30)
    running = [s for s, row in compose.services().items() if row.get("State") == "running"]
    check(not running, f"a fedfraud stack is already running ({', '.join(running)}); the stack test would "
                       "replace it and delete its volumes: stop it first with `docker compose down`")
    # A stopped stack's volumes hold databases made with an earlier .env's passwords: start from nothing.
    compose.run("down", "-v", "--remove-orphans", "--timeout", "10")
    for sub in ("certs/participants.json", *(f"data/{bank}" for bank in BANKS)):
        check((ROOT / "work" / "stack" / sub).exists(), f"work/stack/{sub} is missing: run `make stack-test`")


def wait_healthy(compose: Compose, timeout: float = 900) -> None:
    def healthy():
        services = compose.services()
        init = services.get("airflow-init", {})
        check(not (init.get("State") == "exited" and init.get("ExitCode") != 0),
              f"airflow-init exited {init.get('ExitCode')}: {compose.run('logs', '--tail=30', 'airflow-init')}")
        waiting = [s for s, row in services.items() if s != "airflow-init" and row.get("Health") != "healthy"]
        return not waiting and init.get("State") == "exited"

    wait_for("every service healthy (docker compose ps)", healthy, timeout, interval=5)


def planned(aggregator: Aggregator, key: str) -> bool:
    """The federation is planned (every summary in, or its deadline passed); a failed plan fails the test."""
    try:
        status = aggregator.federation(key)
    except StackTestFailure:  # 404 until Airflow's first prepare task has started the federation
        return False
    check(status["state"] != "failed", f"the federation failed: {status}")
    return status["state"] == "planned"


def summary_times(airflow: Airflow, run_id: str) -> dict[str, float]:
    """Each bank's first summary (gate + features in its container), as Airflow's `prepare` task saw it."""
    from datetime import datetime

    times = {}
    for ti in airflow.task_instances("federated_round", run_id):
        if ti["task_id"] == "prepare" and ti.get("start_date") and ti.get("end_date"):
            start, end = (datetime.fromisoformat(ti[k].replace("Z", "+00:00")) for k in ("start_date", "end_date"))
            times[ti.get("rendered_map_index") or str(ti["map_index"])] = (end - start).total_seconds()
    return times


def check_registry(mlflow: MLflow, killed_bank: str) -> None:
    versions = mlflow.versions(MODEL)
    check(len(versions) == ROUNDS, f"MLflow holds {len(versions)} versions of {MODEL}, expected exactly {ROUNDS} "
                                   f"(one per round): {[v['version'] for v in versions]}")
    by_round = {}
    for version in versions:
        t = tags(version)
        by_round.setdefault(t.get("fedfraud.round"), []).append(version["version"])
        print(f"    version {version['version']}: round {t.get('fedfraud.round')}, "
              f"participants {t.get('fedfraud.participating_banks')}, promotion {t.get('fedfraud.promotion')}")
    check(sorted(by_round) == [str(r) for r in range(1, ROUNDS + 1)] and all(len(v) == 1 for v in by_round.values()),
          f"expected exactly one version per round 1..{ROUNDS}, got {by_round}")
    aliases = mlflow.aliases(MODEL)
    check("champion" in aliases, f"no champion alias on {MODEL}: {aliases}")
    participants = {tags(v)["fedfraud.round"]: set(re.findall(r"bank[A-Z]", tags(v)["fedfraud.participating_banks"]))
                    for v in versions}
    check(killed_bank not in participants["1"] and len(participants["1"]) >= 2,
          f"round 1 went on with the quorum without {killed_bank}: participants {participants['1']}")
    check(killed_bank in participants["2"], f"{killed_bank}, restarted, takes part in round 2: {participants['2']}")
    print(f"    aliases {aliases}")


def score_new_transactions(compose: Compose, airflow: Airflow) -> None:
    """One bank's new transactions scored with models:/fedfraud@champion by the score_transactions DAG."""
    import subprocess

    incoming = SCRATCH / "incoming"
    if not (incoming / "alpine").exists():
        subprocess.run([str(ROOT / ".venv" / "bin" / "fedfraud"), "generate", "--out", str(incoming), "--banks", "1",
                        "--rows", "5000", "--seed", "99"], check=True, stdout=subprocess.DEVNULL)
    for path in (incoming / "alpine").rglob("*"):  # written 0600 (atomic writes); copied as root: the
        path.chmod(0o755 if path.is_dir() else 0o644)  # scheduler's unprivileged user must read it
    compose.run("cp", str(incoming / "alpine"), "airflow-scheduler:/var/lib/fedfraud/incoming-bankA")
    airflow.unpause("score_transactions")
    for run in airflow.runs("score_transactions"):  # the hourly schedule's own run has no input: not ours
        if run["run_type"] == "scheduled" and run["state"] in ("queued", "running"):
            airflow.fail_run("score_transactions", run["dag_run_id"])
    run_id = f"stack-test-score-{int(time.time())}"
    airflow.trigger("score_transactions", run_id, {"model": f"models:/{MODEL}@champion",
                                                   "input": "/var/lib/fedfraud/incoming-bankA"})
    airflow.wait_run("score_transactions", run_id, timeout=900)
    counts = airflow.xcom("score_transactions", run_id, "score")
    print(f"    {counts}")
    check(isinstance(counts, dict) and str(counts.get("output", "")).endswith(".parquet"), f"scoring result: {counts}")


def main() -> int:
    compose = Compose()
    stopping = {"signal": None}

    def interrupted(signum, _frame):
        stopping["signal"] = signum
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    started, failed = time.monotonic(), None
    try:
        with step("preflight: docker, no running stack, certificates and data"):
            preflight(compose)
            secrets = env_file()
        with step("build the images (host network for PyPI and Debian at build time only)"):
            compose.run("build", build=True, capture=False, timeout=3600)
        with step("images: non-root, healthchecks, no secret in any layer (docker history)"):
            check_images(compose, secrets)
        with step("docker compose up: every service healthy"):
            compose.run("up", "-d", "--no-build", capture=False, timeout=1200)
            wait_healthy(compose)
        with step("running containers: read-only roots, no capabilities, no-new-privileges"):
            check_running_hardening(compose)
        with step("a foreign-CA and a removed participant's certificate are refused"):
            check_refusals(compose, SCRATCH)
        airflow = Airflow("http://127.0.0.1:8080", "admin", secrets["AIRFLOW_ADMIN_PASSWORD"])
        aggregator = Aggregator("https://127.0.0.1:8443", ROOT / "work" / "stack" / "certs" / "airflow")
        mlflow = MLflow("http://127.0.0.1:5000")
        run_id = f"stack-test-{int(time.time())}"
        key = federation_key(MODEL, run_id)
        with step(f"trigger federated_round ({ROUNDS} rounds) through Airflow's REST API"):
            airflow.unpause("federated_round")
            # cross-evaluation on; the champion gate off: on ~20 holdout frauds per bank whether 3 rounds beat the
            # best local model is noise, and scoring needs a champion (the gate is tested in tests/aggregator)
            airflow.trigger("federated_round", run_id, {"rounds": ROUNDS, "model_name": MODEL, "min_banks": 2,
                                                        "crossval": True, "champion_gate": False})
        with step("first summaries (every bank's gate + features in its container), cross-evaluation"):
            wait_for("the federation's plan", lambda: planned(aggregator, key), 1800, interval=0.5)
            freeze(compose, "bank-c")  # before Airflow can open round 1: it is killed there with its task open
            print(f"    prepare task seconds per bank: {summary_times(airflow, run_id)}")
        with step("round 1: bank-c killed mid-round; the round completes with the quorum"):
            kill_bank_mid_round(compose, aggregator, key, 1, "bank-c", "bankC")
        with step("round 2: the aggregator crashes mid-round; its restart policy brings it back"):
            crash_aggregator_mid_round(compose, aggregator, key, 2)
        with step("federated_round completes"):
            airflow.wait_run("federated_round", run_id, timeout=3600)
            retried = [f"{t['task_id']}[{t.get('rendered_map_index') or t.get('map_index')}] x{t['try_number']}"
                       for t in airflow.task_instances("federated_round", run_id) if (t.get("try_number") or 1) > 1]
            print(f"    tasks Airflow retried: {retried or 'none'}")
        with step("MLflow: one version per round, champion alias, participants in the tags"):
            check_registry(mlflow, "bankC")
        with step("docker compose restart postgres: no federation, task, run or model version lost"):
            restart_postgres_and_compare(compose, airflow, aggregator, mlflow, key, run_id, ROUNDS,
                                         lambda: wait_healthy(compose, 600))
        with step("score_transactions: one bank's new transactions scored with the champion"):
            score_new_transactions(compose, airflow)
    except BaseException as exc:  # noqa: B036 - report, tear down, exit non-zero whatever happened
        failed = exc
        print(f"\nFAILED: {exc.__class__.__name__}: {exc}", file=sys.stderr, flush=True)
        if not isinstance(exc, KeyboardInterrupt):
            try:
                print(compose.run("ps", "--all"), file=sys.stderr)
                unhealthy = [s for s, row in compose.services().items() if row.get("Health") not in ("", "healthy")]
                for service in sorted({*unhealthy, "aggregator", "bank-c", "airflow-scheduler"}):
                    print(compose.run("logs", "--tail=30", service), file=sys.stderr)
            except (StackTestFailure, OSError) as diag:
                print(f"(no diagnostics: {diag})", file=sys.stderr)
    finally:
        with step("tear down: docker compose down -v"):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            compose.run("down", "-v", "--remove-orphans", "--timeout", "20", capture=False, timeout=600)
            docker("rm", "-f", "fedfraud-stacktest-foreign", "fedfraud-stacktest-removed", check_rc=False)
        print("\nstack-test step times:")
        for name, seconds, outcome in TIMINGS:
            print(f"  {seconds:8.1f}s  {outcome:6}  {name}")
        print(f"  {time.monotonic() - started:8.1f}s  total")
    if failed is not None:
        print(f"stack-test: 0 passed, 1 failed ({failed.__class__.__name__})")
        return 1
    print(f"stack-test: {len(TIMINGS)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    os.chdir(ROOT)
    sys.exit(main())
