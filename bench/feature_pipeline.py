"""Bench: the bank's whole preparation (``fedfraud features``) against Spark's plain read -> write.

All steps run in one SparkSession on the same generated input (the union of every bank's
``transactions.parquet``), so the ratio says what the gate and the features cost on top of the
I/O Spark must do anyway. Target: ``fedfraud features`` <= 3x the plain read -> write.

Steps (each run ``--repeats`` times after one small warm-up run; the median is reported):

* ``read_write``   ``spark.read.parquet(union).write.parquet(out)``
* ``features``     ``spark.read.parquet(union)`` -> ``build_features`` -> ``write.parquet(out)``
* ``gate``         ``validate(spark, union, out, config)``: the validation gate alone (GX and Data
                   Docs included); only with ``--per-step``, to see where the command's time goes
* ``command``      ``build_bank_features(spark, union, out, config)``: what ``fedfraud features``
                   runs (gate, then features from its ``valid/``, contract) on the union written
                   as one Parquet dir -- the target's numerator

Run from the repository root (``make bench`` does the same with the defaults)::

    .venv/bin/python bench/feature_pipeline.py --rows 1000000 --seed 7 --repeats 3

Writes ``<work-dir>/results.json`` (default ``work/bench/features/results.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path

from pipelines.build import build_bank_features
from pipelines.config import PipelineConfig, load_config
from pipelines.features import build_features
from pipelines.spark import get_spark
from pipelines.synthetic import write_banks
from pipelines.validation import validate

REPO = Path(__file__).resolve().parents[1]
N_BANKS = 5
WARMUP_ROWS = 20_000
TARGET_RATIO = 3.0
STEPS = ("read_write", "features", "gate", "command")
LABELS = {
    "read_write": "plain read -> write (baseline)",
    "features": "read -> build_features -> write",
    "gate": "validation gate alone (GX, Data Docs)",
    "command": "fedfraud features (gate + features)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="total generated rows (all banks)")
    parser.add_argument("--seed", type=int, default=7, help="synthetic data seed")
    parser.add_argument("--work-dir", type=Path, default=REPO / "work" / "bench" / "features",
                        help="data, outputs and results.json go here (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="measured runs per step; the median is reported")
    parser.add_argument("--skip-command", action="store_true", help="do not time the whole fedfraud features")
    parser.add_argument("--explain", action="store_true", help="print the feature pipeline's physical plan")
    parser.add_argument("--per-step", action="store_true", help="also time the validation gate alone")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        parser.error("--rows and --repeats must be >= 1")
    return args


def generate(data_dir: Path, rows: int, seed: int) -> list[str]:
    """The banks' transactions.parquet paths; generated once per (rows, seed) and then reused."""
    marker = data_dir / "generated.json"
    wanted = {"rows": rows, "seed": seed, "n_banks": N_BANKS}
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("params") == wanted and all(Path(p).exists() for p in done["paths"]):
            return done["paths"]
    shutil.rmtree(data_dir, ignore_errors=True)
    started = time.perf_counter()
    paths = write_banks(data_dir, n_banks=N_BANKS, total_rows=rows, seed=seed)
    print(f"generated {rows:,} rows for {len(paths)} banks in {time.perf_counter() - started:.1f}s -> {data_dir}")
    listed = [str(paths[bank]) for bank in sorted(paths)]
    marker.write_text(json.dumps({"params": wanted, "paths": listed}, indent=2) + "\n")
    return listed


def clean(*dirs: Path) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


class Clock:
    """Wall seconds and CPU seconds: Spark's driver JVM (where local[*] runs every task), its child
    processes (the Python workers of ``mapInArrow``; ended ones through the JVM's reaped-children
    times) and this Python process.

    CPU seconds barely move when other processes compete for the cores, so they back up the wall
    clock on a busy machine; wall seconds are what the target is about.
    """

    def __init__(self, spark):
        self.jvm_pid = None
        with suppress(Exception):  # CPU seconds are a bonus (Linux /proc), never a reason to fail
            pid = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()
            self.jvm_pid = pid if Path(f"/proc/{pid}/stat").exists() else None
        self.ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def cpu(self) -> float | None:
        if self.jvm_pid is None:
            return None
        return process_tree_ticks(self.jvm_pid) / self.ticks + time.process_time()

    def measure(self, fn: Callable[[], object]) -> tuple[float, float | None]:
        cpu, started = self.cpu(), time.perf_counter()
        fn()
        wall, cpu_end = time.perf_counter() - started, self.cpu()
        return wall, (cpu_end - cpu if cpu is not None else None)


class Bench:
    """The measured steps for one input (the bank files and their union as one Parquet dir)."""

    def __init__(self, spark, config: PipelineConfig, bank_paths: list[str], root: Path):
        self.spark, self.config, self.bank_paths, self.root = spark, config, bank_paths, root
        self.clock = Clock(spark)
        self.union = root / "union"
        self.out = root / "out"
        if not (self.union / "_SUCCESS").exists():  # the gate's input: the union as one Parquet dir
            spark.read.parquet(*bank_paths).write.mode("overwrite").parquet(str(self.union))

    def read_write(self) -> None:
        target = self.out / "read_write"
        self.spark.read.parquet(str(self.union)).write.mode("overwrite").parquet(str(target))

    def features(self) -> None:
        target = self.out / "features"
        df = self.spark.read.parquet(str(self.union))
        build_features(df, self.config.features).write.mode("overwrite").parquet(str(target))

    def gate(self) -> None:
        validate(self.spark, self.union, self.out / "gate", self.config)

    def command(self) -> None:
        build_bank_features(self.spark, self.union, self.out / "bank", self.config)

    def run(self, with_command: bool, with_gate: bool = False) -> dict[str, tuple[float, float | None]]:
        """{step: (wall s, cpu s)}; every step starts from an empty output directory."""
        clean(self.out)
        times = {"read_write": self.clock.measure(self.read_write), "features": self.clock.measure(self.features)}
        if with_gate:
            times["gate"] = self.clock.measure(self.gate)
        if with_command:
            times["command"] = self.clock.measure(self.command)
        return times


def process_tree_ticks(root: int) -> int:
    """utime + stime + cutime + cstime of ``root`` and every live descendant (/proc). A process that
    ended and was reaped is in its parent's cutime/cstime, so nothing is counted twice or lost."""
    stats, children = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                stats[int(entry.name)] = sum(int(x) for x in fields[11:15])
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0)
        todo += children.get(pid, [])
    return total


def median_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.median(values)


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def print_table(result: dict) -> None:
    base, base_cpu = result["seconds"]["read_write"], result["cpu_seconds"]["read_write"]
    print()
    print(f"rows={result['rows']:,}  banks={N_BANKS}  repeats={result['repeats']}  cores={result['cores']}  "
          f"spark={result['spark_version']}  master={result['spark_master']}  "
          f"shuffle_partitions={result['shuffle_partitions']}")
    print(f"{'step':<42}{'wall s':>8}{'x base':>8}{'cpu s':>8}{'x base':>8}   wall runs (s)")
    print("-" * 96)
    for step in STEPS:
        if step not in result["seconds"]:
            continue
        wall, cpu = result["seconds"][step], result["cpu_seconds"][step]
        cpu_cols = f"{cpu:>8.2f}{cpu / base_cpu:>7.2f}x" if cpu is not None and base_cpu else f"{'-':>8}{'-':>8}"
        runs = ", ".join(f"{t:.2f}" for t in result["runs"][step])
        print(f"{LABELS[step]:<42}{wall:>8.2f}{wall / base:>7.2f}x{cpu_cols}   {runs}")
    print("-" * 96)
    if result["ratio"] is not None:
        verdict = "met" if result["target_met"] else "NOT met"
        print(f"fedfraud features / plain read->write = {result['ratio']:.2f}x wall"
              + (f", {result['ratio_cpu']:.2f}x cpu" if result["ratio_cpu"] is not None else "")
              + f"  (target <= {TARGET_RATIO:.0f}x wall: {verdict})")
    print(f"build_features alone / plain read->write = {result['ratio_features']:.2f}x wall")
    print(f"load average before / after: {result['load_average_before']} / {result['load_average_after']}"
          f"  (above {result['cores']} means other processes shared the cores: trust cpu s more)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = load_config()

    bank_paths = generate(work / "data", args.rows, args.seed)
    warm_rows = min(WARMUP_ROWS, args.rows)
    warm_paths = generate(work / "warmup" / "data", warm_rows, args.seed)

    spark = get_spark("fedfraud-bench")
    with_command = not args.skip_command

    started = time.perf_counter()
    Bench(spark, config, warm_paths, work / "warmup").run(with_command)  # JVM start-up, JIT, GX imports
    print(f"warm-up ({warm_rows:,} rows) took {time.perf_counter() - started:.1f}s")

    bench = Bench(spark, config, bank_paths, work)
    if args.explain:
        build_features(spark.read.parquet(*bank_paths), config.features).explain(mode="formatted")

    load_before = load_average()
    walls: dict[str, list[float]] = {}
    cpus: dict[str, list[float | None]] = {}
    for i in range(args.repeats):
        times = bench.run(with_command, args.per_step)
        for step, (wall, cpu) in times.items():
            walls.setdefault(step, []).append(wall)
            cpus.setdefault(step, []).append(cpu)
        shown = (f"{s}={w:.2f}s" + (f" (cpu {c:.1f}s)" if c is not None else "") for s, (w, c) in times.items())
        print(f"repeat {i + 1}/{args.repeats}: " + "  ".join(shown), flush=True)
    load_after = load_average()

    seconds = {step: statistics.median(values) for step, values in walls.items()}
    cpu_seconds = {step: median_or_none(values) for step, values in cpus.items()}
    base, base_cpu = seconds["read_write"], cpu_seconds["read_write"]
    ratio = seconds["command"] / base if "command" in seconds else None
    command_cpu = cpu_seconds.get("command")
    result = {
        "rows": args.rows,
        "banks": N_BANKS,
        "seed": args.seed,
        "repeats": args.repeats,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "runs": walls,
        "cpu_runs": cpus,
        "ratio": ratio,  # fedfraud features (gate + features) / plain read -> write, wall
        "ratio_cpu": command_cpu / base_cpu if base_cpu and command_cpu else None,
        "ratio_features": seconds["features"] / base,
        "ratio_gate": seconds["gate"] / base if "gate" in seconds else None,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio is not None and ratio <= TARGET_RATIO,
        "cores": os.cpu_count(),
        "spark_version": spark.version,
        "spark_master": spark.sparkContext.master,
        "spark_default_parallelism": spark.sparkContext.defaultParallelism,
        "shuffle_partitions": spark.conf.get("spark.sql.shuffle.partitions"),
        "driver_memory": spark.sparkContext.getConf().get("spark.driver.memory", None),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": shlex.join(sys.orig_argv),
        "cwd": os.getcwd(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print_table(result)
    results_path = work / "results.json"
    results_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
