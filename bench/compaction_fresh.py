"""Bench: the compaction bench's round-N models scored on fresh rows no federation ever saw.

``bench/compaction.py`` splits each bank's holdout into a holdout (what compaction selects on) and a
test half; at 200,000 rows that test half holds ~43 frauds, too few to tell 0.005 AUPRC apart. This
script generates the same banks (the profiles of ``--seed``) over the next ``--days`` days with
other rows (``--row-seed``), builds their features with the banks' own pipeline, and scores every
named federation's round-N model on all of them pooled: AUPRC, and rows per CPU second on one
thread (models timed in turns, best of ``--repeats``).

    nice -n 19 .venv/bin/python bench/compaction.py ...   # first: the federations to compare
    nice -n 19 .venv/bin/python bench/compaction_fresh.py --work-dir DIR --round 10 --names without,budget-new-t004
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

from bank_node.node import BankNode
from bench.compaction import interleaved_speeds
from bank_node.training import dmatrix
from fedfraud import model_json
from fedfraud.settings import FederationSettings
from pipelines.config import load_config
from pipelines.spark import get_spark
from pipelines.synthetic import DEFAULT_START, bank_profiles, generate_bank, split_rows


def fresh_rows(args) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every fresh bank's feature rows (train and holdout parts alike), pooled, and the feature names."""
    import pyarrow.parquet as pq

    root, config, settings = args.work_dir / f"fresh-{args.rows}-{args.row_seed}", load_config(), FederationSettings()
    profiles = bank_profiles(args.banks, args.seed)
    spark, X, y, names = get_spark("fedfraud-fresh"), [], [], None
    for profile, n_rows in zip(profiles, split_rows(args.rows, profiles)):
        raw = root / "raw" / profile.name / "transactions.parquet"
        if not raw.exists():
            raw.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(generate_bank(profile, n_rows, args.row_seed, DEFAULT_START + timedelta(days=60), 60), raw)
        node = BankNode(profile.name, raw, root / "banks" / profile.name, config, settings.holdout_fraction)
        print(f"  {profile.name}: features", file=sys.stderr, flush=True)
        node.prepare(spark)
        data = node.data
        if names is not None and data.feature_names != names:
            raise SystemExit(f"{profile.name}'s fresh features differ from the other banks': {data.feature_names}")
        names = data.feature_names
        X += [data.X_train, data.X_holdout]
        y += [data.y_train, data.y_holdout]
    return np.concatenate(X), np.concatenate(y), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="bench/compaction.py's --work-dir")
    parser.add_argument("--round", type=int, default=10)
    parser.add_argument("--names", required=True, help="federations (bench-NAME), comma-separated")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--banks", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7, help="the federations' --seed (the banks' profiles)")
    parser.add_argument("--row-seed", type=int, default=1007)
    parser.add_argument("--score-rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    X, y, features = fresh_rows(args)  # first: features are kept, so a run before the models exist prepares them
    docs = {name: json.loads((args.work_dir / "federations" / f"bench-{name}" / f"round-{args.round}" / "model.json")
                             .read_bytes()) for name in args.names.split(",")}
    speeds = interleaved_speeds(docs, X[:args.score_rows], features, args.repeats)
    print(f"\nRound {args.round} models on {len(y):,} fresh rows ({int(y.sum())} frauds), the days after the "
          f"federations' data; scoring on {min(len(y), args.score_rows):,} of them, one thread")
    print("| federation | trees | fresh AUPRC | scoring rows per CPU s |\n|---|---|---|---|")
    rows = {}
    for name, doc in docs.items():
        auprc = float(average_precision_score(y, model_json.to_booster(doc).predict(dmatrix(X, None, features))))
        rows[name] = {"trees": len(model_json.trees(doc)), "fresh_auprc": auprc, "rows_per_cpu_second": speeds[name]}
        print(f"| {name} | {rows[name]['trees']} | {auprc:.4f} | {speeds[name]:,.0f} |")
    out = args.work_dir / f"fresh-round-{args.round}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": len(y), "frauds": int(y.sum()),
                               "results": rows}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
