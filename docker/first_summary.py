"""A bank node's first summary, timed inside its container: Spark start, the validation gate (and the
GX suite within it), the feature build, as the agent runs them for its first `summary` task
(``pipelines.build``: one job writes the valid rows with their features).

    docker run --rm --read-only --tmpfs /tmp:exec -v RAW:/data/raw:ro -v WORK:/var/lib/fedfraud \\
        -v "$PWD/docker/first_summary.py:/opt/first_summary.py:ro" fedfraud-bank-node:local \\
        python /opt/first_summary.py /data/raw /var/lib/fedfraud/first-summary

Prints one line per stage: wall seconds, and the container's CPU seconds (cgroup) over the same span,
so a loaded machine shows as wall >> CPU. Measurement only: it calls the pipeline's own functions.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

CGROUP_CPU = (Path("/sys/fs/cgroup/cpuacct/cpuacct.usage"), Path("/sys/fs/cgroup/cpu.stat"))


def cpu_seconds() -> float:
    v1, v2 = CGROUP_CPU
    if v1.exists():
        return int(v1.read_text()) / 1e9
    if v2.exists():
        return int(dict(line.split() for line in v2.read_text().splitlines())["usage_usec"]) / 1e6
    return float("nan")


class Clock:
    def __init__(self):
        self.rows: list[tuple[str, float, float]] = []

    def stage(self, name: str, call):
        wall, cpu = time.monotonic(), cpu_seconds()
        result = call()
        self.rows.append((name, time.monotonic() - wall, cpu_seconds() - cpu))
        print(f"{name:28} wall {self.rows[-1][1]:7.1f}s  cpu {self.rows[-1][2]:7.1f}s", flush=True)
        return result


def main(raw: str, out: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    start_wall, start_cpu = time.monotonic(), cpu_seconds()
    from pipelines import validation
    from pipelines.build import FEATURES_DIR, VALIDATION_DIR
    from pipelines.config import load_config
    from pipelines.features import build_features
    from pipelines.io import write_parquet
    from pipelines.spark import get_spark

    suite = validation.run_suite
    validation.run_suite = lambda *a, **k: clock.stage("  GX contract suite", lambda: suite(*a, **k))
    config = load_config()
    spark = clock.stage("spark session", lambda: get_spark("fedfraud-first-summary"))
    features = Path(out) / FEATURES_DIR  # what build_bank_features runs, one stage at a time
    with clock.stage("gate plan (ids, footers)", lambda: validation.Gate(
            spark, raw, Path(out) / VALIDATION_DIR, config)) as gate:
        clock.stage("valid rows + features (1 job)", lambda: write_parquet(
            build_features(gate.valid, config.features, keep=tuple(gate.valid.columns)), features))
        report = clock.stage("quarantine, counts, GX", lambda: gate.finish(features))
    total = (time.monotonic() - start_wall, cpu_seconds() - start_cpu)
    print(f"{'total (gate + features)':28} wall {total[0]:7.1f}s  cpu {total[1]:7.1f}s")
    conf = {k: spark.conf.get(k) for k in ("spark.master", "spark.driver.memory", "spark.sql.shuffle.partitions")}
    print(json.dumps({"input_rows": report.get("input_rows"), "valid_rows": report.get("valid_rows"), **conf}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
