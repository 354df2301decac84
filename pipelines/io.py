"""Reading bank inputs and writing outputs so that no partial file is ever visible."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pyspark.sql import DataFrame, SparkSession


class InputError(ValueError):
    """The input path does not exist or is not Parquet / CSV."""


def detect_format(path: str | Path) -> str:
    """Return ``"csv"`` or ``"parquet"`` for a file or a directory of such files."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}")
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and not f.name.startswith((".", "_"))]
    suffixes = {f.suffix.lower() for f in files}
    if suffixes and suffixes <= {".csv"}:
        return "csv"
    if suffixes and suffixes <= {".parquet"}:
        return "parquet"
    if not files:
        raise InputError(f"input directory holds no data files: {p}")
    raise InputError(f"input must be Parquet or CSV with a header, found {sorted(suffixes)} in {p}")


def read_input(spark: SparkSession, path: str | Path) -> tuple[DataFrame, str]:
    """Read raw transactions as they are (CSV: every column a string). Returns (df, format)."""
    fmt = detect_format(path)
    if fmt == "csv":
        df = spark.read.option("header", "true").option("inferSchema", "false").csv(str(path))
    else:
        df = spark.read.parquet(str(path))
    return df, fmt


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield stage
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def write_parquet(df: DataFrame, final: str | Path, options: dict[str, str] | None = None) -> None:
    """Write ``df`` as Parquet at ``final`` atomically (stage, then rename), with writer ``options``."""
    with staged_dir(final) as stage:
        df.write.mode("overwrite").options(**(options or {})).parquet(str(stage))


def parquet_rows(path: str | Path) -> int:
    """Rows in the Parquet dataset Spark wrote at ``path``, summed from its part files' footers."""
    import pyarrow.parquet as pq

    parts = [f for f in Path(path).rglob("*.parquet") if not f.name.startswith((".", "_"))]
    return sum(pq.ParquetFile(part).metadata.num_rows for part in parts)


def write_bytes(data: bytes, final: str | Path) -> None:
    """Write ``data`` at ``final`` through a temp file and a rename: never a partial file."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}-", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj: Any, final: str | Path) -> None:
    """Write ``obj`` as indented JSON at ``final`` atomically."""
    write_bytes((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), final)
