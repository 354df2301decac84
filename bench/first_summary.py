"""Bench: a bank node's first summary (validation gate + features) inside its container.

What a bank waits for before its first round: the node image (``fedfraud-bank-node:local``, built by
``make stack``) runs ``fedfraud features`` (the gate, then point-in-time features and the contract:
what the node's ``prepare`` runs) on one generated bank, with the hardening and Spark settings of
``docker-compose.yml`` (read-only root, no capabilities, a 2 GiB driver, 4 shuffle partitions).
Each size is run ``--repeats`` times in a fresh container (JVM start included, as a node starts);
the median is reported, with the gate's and the features' own times from the command's report.

    .venv/bin/python bench/first_summary.py --rows 50000 500000 --repeats 3

Needs a Docker engine and the image (``make stack`` or ``docker compose build bank-a``).
Writes ``<work-dir>/results.json`` (default ``work/bench/first-summary``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

IMAGE = "fedfraud-bank-node:local"
HARDENING = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
             "--tmpfs", "/tmp:size=512m,mode=1777,exec", "--network", "none"]
SPARK_ENV = {"FEDFRAUD_DRIVER_MEMORY": "2g", "FEDFRAUD_SHUFFLE_PARTITIONS": "4",
             "SPARK_LOCAL_DIRS": "/out/spark-local"}


def generate(rows: int, folder: Path, seed: int) -> Path:
    """One synthetic bank of ``rows`` transactions (host side, once per size)."""
    raw = folder / "raw"
    if not raw.exists():
        subprocess.run([str(Path(sys.executable).parent / "fedfraud"), "generate", "--out", str(raw), "--banks", "1",
                        "--rows", str(rows), "--seed", str(seed)], check=True, capture_output=True)
    for root, _dirs, files in os.walk(raw):  # readable by the image's unprivileged user
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return next(p for p in raw.iterdir() if p.is_dir())


def run_once(bank_dir: Path, out: Path) -> dict:
    """``fedfraud features`` in a fresh, hardened node container; wall time and the command's report."""
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o777)  # the image runs as an unprivileged user
    env = [arg for key, value in SPARK_ENV.items() for arg in ("-e", f"{key}={value}")]
    command = ["docker", "run", "--rm", *HARDENING, *env, "-v", f"{bank_dir.resolve()}:/data:ro",
               "-v", f"{out.resolve()}:/out", IMAGE,
               "fedfraud", "features", "--input", "/data/transactions.parquet", "--out", "/out/prepared"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"first summary failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                         f"{result.stderr[-2000:]}")
    report_path = out / "prepared" / "validation" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    subprocess.run(["docker", "run", "--rm", "-v", f"{out.resolve()}:/out", "--entrypoint", "rm", IMAGE,
                    "-rf", "/out/prepared", "/out/spark-local"], check=True, capture_output=True)
    return {"wall_s": wall, "input_rows": report.get("input_rows"),
            "output_tail": result.stdout.strip().splitlines()[-2:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 500_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work-dir", type=Path, default=Path("work/bench/first-summary"))
    args = parser.parse_args()
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        raise SystemExit(f"no image {IMAGE}: build it with `make stack` (or docker compose build bank-a)")
    results = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "image": IMAGE, "sizes": {},
               "load_before": os.getloadavg()}
    for rows in args.rows:
        folder = args.work_dir / f"rows-{rows}"
        bank_dir = generate(rows, folder, args.seed)
        runs = [run_once(bank_dir, folder / "out") for _ in range(args.repeats)]
        walls = [r["wall_s"] for r in runs]
        results["sizes"][str(rows)] = {"median_s": statistics.median(walls), "runs_s": walls,
                                       "rows_per_s": rows / statistics.median(walls), "last": runs[-1]}
        runs_text = ", ".join(f"{w:.1f}" for w in walls)
        print(f"{rows:>9,} rows: median {statistics.median(walls):6.1f} s  (runs {runs_text})", flush=True)
    results["load_after"] = os.getloadavg()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    (args.work_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {args.work_dir / 'results.json'}")


if __name__ == "__main__":
    main()
