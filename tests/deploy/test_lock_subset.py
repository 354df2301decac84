"""docker/lock_subset.py: each image's part of requirements.lock is verbatim, complete and smaller."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCK, PYPROJECT = ROOT / "requirements.lock", ROOT / "pyproject.toml"
spec = importlib.util.spec_from_file_location("lock_subset", ROOT / "docker" / "lock_subset.py")
lock_subset = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock_subset)


def _names(text: str) -> set[str]:
    return {lock_subset.normalize(m.group(1)) for m in map(lock_subset.BLOCK_START.match, text.splitlines()) if m}


@pytest.fixture(scope="module")
def graph():
    _, blocks, via = lock_subset.parse_lock(LOCK.read_text())
    return blocks, via


@pytest.mark.parametrize("image", ["airflow", "bank-node", "aggregator"])
def test_every_kept_block_is_the_lock_verbatim_and_closed_under_dependencies(image, graph):
    blocks, via = graph
    text = lock_subset.subset(image, LOCK, PYPROJECT)
    kept = _names(text)
    for name in kept:  # same version, same hashes, same annotations
        assert "\n".join(blocks[name]) in text, name
    for name, parents in via.items():  # whatever a kept package needs is kept (or never shipped)
        if name not in kept and name not in lock_subset.NEVER:
            needing = {lock_subset.normalize(p) for p in parents} & kept
            assert not needing, f"{image}: {needing} need {name}, which is left out"
    assert all(re.search(r"--hash=sha256:[0-9a-f]{64}", "\n".join(blocks[name])) for name in kept)


def test_dev_tools_and_gpu_libraries_are_in_no_image():
    for image in lock_subset.LEFT_OUT:
        kept = _names(lock_subset.subset(image, LOCK, PYPROJECT))
        assert not kept & {"pytest", "ruff", "uv", "check-jsonschema", "nvidia-nccl-cu12"}, image


def test_images_leave_out_what_they_do_not_run():
    airflow = _names(lock_subset.subset("airflow", LOCK, PYPROJECT))
    bank = _names(lock_subset.subset("bank-node", LOCK, PYPROJECT))
    aggregator = _names(lock_subset.subset("aggregator", LOCK, PYPROJECT))
    assert {"apache-airflow", "pyspark", "great-expectations", "mlflow"} <= airflow
    assert {"pyspark", "great-expectations", "xgboost", "httpx"} <= bank
    assert not bank & {"apache-airflow", "mlflow", "fastapi", "uvicorn", "psycopg2-binary"}
    assert {"mlflow", "fastapi", "uvicorn", "psycopg2-binary", "xgboost"} <= aggregator
    assert not aggregator & {"apache-airflow", "great-expectations"}
    assert set(lock_subset.left_out("bank-node", LOCK, PYPROJECT)) == airflow - bank


def test_unknown_image_and_unlocked_dependency_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown image"):
        lock_subset.subset("web", LOCK, PYPROJECT)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(PYPROJECT.read_text().replace('"httpx",', '"httpx",\n    "not-in-the-lock",'))
    with pytest.raises(SystemExit, match="not-in-the-lock"):
        lock_subset.subset("bank-node", LOCK, pyproject)
