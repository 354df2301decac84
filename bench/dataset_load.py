"""How long a bank takes to load its training and holdout matrices, and its peak RSS (one process per run).

    .venv/bin/python bench/dataset_load.py FEATURES_DIR                      # bank_node.dataset.load_dataset
    .venv/bin/python bench/dataset_load.py FEATURES_DIR --commit a5eb7f4     # that commit's loader

``FEATURES_DIR`` is a prepared bank's ``features`` folder (``feature_contract.json`` beside it), e.g. the
scale bench's ``work/bench/scale/bank-1000000/features``. ``--commit`` loads ``bank_node/dataset.py`` as it
was at that commit (a5eb7f4: ``read_features``, a pandas table, then ``time_split``) with ``git show``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def loader(commit: str | None):
    if commit is None:
        from bank_node.dataset import load_dataset
        return load_dataset
    source = subprocess.run(["git", "show", f"{commit}:bank_node/dataset.py"], check=True, capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "dataset_at_commit.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dataset_at_commit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return lambda features, names, fraction: module.time_split(module.read_features(features, names), names, fraction)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("features", type=Path)
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    names = json.loads((args.features.parent / "feature_contract.json").read_text())["names"]
    load = loader(args.commit)
    began = time.perf_counter()
    data = load(args.features, names, 0.2)
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"loader": args.commit or "load_dataset", "seconds": round(seconds, 1),
                      "peak_rss_mib": round(peak), "train_rows": len(data.y_train)}))


if __name__ == "__main__":
    main()
