"""Write the part of requirements.lock one image needs: same versions, same hashes, nothing resolved.

    python docker/lock_subset.py IMAGE [requirements.lock [pyproject.toml]] > IMAGE.txt
    python docker/lock_subset.py IMAGE --left-out      # names of runtime packages IMAGE does not need

The lock was compiled by uv with ``# via`` annotations, so it holds the whole dependency graph:
a package is kept when a path of ``via`` edges leads to it from one of the image's roots, which are
the project's runtime dependencies (``[project].dependencies``; never the ``dev`` extra) minus the
ones the image leaves out (``LEFT_OUT``). Every kept block is copied verbatim (version and hashes),
so ``uv pip sync --require-hashes`` of the output is still a locked, hashed install.

``NEVER`` lists packages no image ships: ``nvidia-nccl-cu12`` is NCCL for multi-GPU training, which
XGBoost loads only when it trains on CUDA devices; these images have no GPU (465 MB).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

LEFT_OUT = {
    # Airflow runs the DAGs; embedded mode runs Spark + GX in the worker, so it has everything.
    "airflow": set(),
    # The bank's agent: Spark, GX, XGBoost, scikit-learn. No Airflow, no web service, no database
    # drivers, no MLflow (a bank reaches the aggregator only, never the consortium's MLflow).
    "bank-node": {"apache-airflow", "fastapi", "uvicorn", "asyncpg", "psycopg2-binary", "mlflow"},
    # The aggregator and `mlflow server`: no Airflow, no GX, no DP accountant (each bank keeps its own
    # privacy ledger; the aggregator never computes an epsilon). pyspark stays as a Python package only
    # (pipelines.io imports it; the image has no Java and never starts Spark: the Dockerfile drops its jars).
    "aggregator": {"apache-airflow", "great-expectations", "asyncpg", "dp-accounting"},
}
NEVER = {"nvidia-nccl-cu12"}
BLOCK_START = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> tuple[list[str], dict[str, list[str]], dict[str, set[str]]]:
    """(header lines, block lines per package, the packages each one is required ``via``)."""
    header: list[str] = []
    blocks: dict[str, list[str]] = {}
    via: dict[str, set[str]] = {}
    current = None
    in_via_list = False
    for line in text.splitlines():
        match = BLOCK_START.match(line)
        if match:
            current, in_via_list = normalize(match.group(1)), False
            blocks[current], via[current] = [line], set()
            continue
        if current is None:
            header.append(line)
            continue
        blocks[current].append(line)
        stripped = line.strip()
        if stripped == "# via":
            in_via_list = True
        elif stripped.startswith("# via "):
            via[current].add(stripped[len("# via "):].strip())
        elif in_via_list and stripped.startswith("#   "):
            via[current].add(stripped[len("#   "):].strip())
    return header, blocks, {name: {p.split(" ")[0] for p in parents} for name, parents in via.items()}


def runtime_roots(pyproject: Path) -> set[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {normalize(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) for spec in dependencies}


def kept(image: str, lock: Path, pyproject: Path) -> tuple[set[str], list[str], dict[str, list[str]]]:
    """(names the image keeps, the lock's header lines, every block)."""
    if image not in LEFT_OUT:
        raise SystemExit(f"unknown image {image!r}: one of {', '.join(sorted(LEFT_OUT))}")
    header, blocks, via = parse_lock(lock.read_text())
    roots = runtime_roots(pyproject) - {normalize(n) for n in LEFT_OUT[image]}
    missing = roots - set(blocks)
    if missing:
        raise SystemExit(f"{lock}: no locked version of {', '.join(sorted(missing))}; re-lock first")
    children: dict[str, set[str]] = {}
    for name, parents in via.items():
        for parent in parents:
            children.setdefault(normalize(parent), set()).add(name)
    keep, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in keep or name in NEVER:
            continue
        keep.add(name)
        todo.extend(children.get(name, ()))
    return keep, header, blocks


def subset(image: str, lock: Path, pyproject: Path) -> str:
    keep, header, blocks = kept(image, lock, pyproject)
    lines = [f"# {image}: {len(keep)} of {len(blocks)} locked packages (docker/lock_subset.py)", *header]
    for name, block in blocks.items():
        if name in keep:
            lines.extend(block)
    return "\n".join(lines) + "\n"


def left_out(image: str, lock: Path, pyproject: Path) -> list[str]:
    """Runtime packages (the airflow image's set) that ``image`` does not need."""
    return sorted(kept("airflow", lock, pyproject)[0] - kept(image, lock, pyproject)[0])


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--left-out"]
    if not args:
        raise SystemExit(__doc__)
    lock_path = Path(args[1] if len(args) > 1 else "requirements.lock")
    pyproject_path = Path(args[2] if len(args) > 2 else "pyproject.toml")
    if "--left-out" in sys.argv:
        sys.stdout.write("".join(f"{name}\n" for name in left_out(args[0], lock_path, pyproject_path)))
    else:
        sys.stdout.write(subset(args[0], lock_path, pyproject_path))
