"""Bench: federated strategies vs local-only and centralized on generated non-IID banks.

Reports holdout AUPRC per bank and pooled for local / bagging / cyclic / centralized, the bytes each
bank sent and received per federated strategy (counted by the rounds themselves), and the wall time
of one training round against a centralized fit of the same number of trees.

    .venv/bin/python bench/federation.py --rows 500000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


from aggregator.drivers.embedded import federate, prepare_consortium, train_round
from fedfraud.settings import FederationSettings, consortium_params
from aggregator.protocol import traffic
from aggregator.strategies import STRATEGIES
from aggregator.tracking import default_tracking_uri
from bank_node.training import train_trees
from fedfraud.wire import TrainTask
from pipelines.config import load_config
from pipelines.synthetic import write_banks


def quality(consortium, rounds, settings, seed) -> dict[str, dict[str, float]]:
    """AUPRC per bank and pooled, for every strategy (each registered in the bench's MLflow)."""
    uri = default_tracking_uri(consortium.work_dir)
    table: dict[str, dict[str, float]] = {}
    for strategy in ("local", "bagging", "cyclic", "centralized"):
        started = time.perf_counter()
        results = federate(consortium, strategy, rounds, f"bench-{strategy}", uri, settings, seed, lambda m: None)
        if strategy == "local":
            table[strategy] = {b: r.evaluation.per_bank[b]["auprc"] for b, r in results.items()}
            table[strategy]["pooled"] = float("nan")  # each bank has its own model
        else:
            evaluation = results[""].evaluation
            table[strategy] = {**{b: m["auprc"] for b, m in evaluation.per_bank.items()},
                               "pooled": evaluation.pooled["auprc"]}
        print(f"  {strategy:<12} done in {time.perf_counter() - started:6.1f}s", file=sys.stderr)
    return table


def round_times(consortium, settings, seed, repeats) -> dict[str, float]:
    """Median seconds of one training round (tasks, training, checks, aggregation) per strategy,
    and of a centralized fit of the same number of trees on the pooled rows."""
    nodes, contract = consortium.nodes, consortium.contract
    banks = sorted(nodes)
    counts = [nodes[b].data.counts() for b in banks]  # in process: the plaintext reference
    params = consortium_params(settings, sum(c["positives"] for c in counts), sum(c["negatives"] for c in counts))
    timings: dict[str, list[float]] = {"bagging": [], "cyclic": [], "centralized": []}
    X = np.concatenate([nodes[b].data.X_train for b in banks])
    y = np.concatenate([nodes[b].data.y_train for b in banks])
    for repeat in range(repeats):
        for name in ("bagging", "cyclic"):
            strategy = STRATEGIES[name](settings, seed + repeat, params)
            started = time.perf_counter()
            train_round(nodes, strategy, banks, 1, None, contract, settings)
            timings[name].append(time.perf_counter() - started)
        task = TrainTask(bank="pooled", round_id=1, base_model_id="none", contract_hash=contract["hash"],
                         num_trees=settings.trees_per_round, params={**params, "seed": seed + repeat})
        started = time.perf_counter()
        train_trees(task, X, y, contract["names"])
        timings["centralized"].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--banks", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("work/bench/federation"))
    args = parser.parse_args()
    settings = FederationSettings()
    paths = write_banks(args.work_dir / "raw", n_banks=args.banks, total_rows=args.rows, seed=args.seed)
    consortium = prepare_consortium(paths, args.work_dir, load_config(), settings,
                                    lambda m: print(f"  {m}", file=sys.stderr))
    table = quality(consortium, args.rounds, settings, args.seed)
    wire = {name: traffic.over_rounds(consortium.work_dir / "federations" / f"bench-{name}", args.rounds)
            for name in ("bagging", "cyclic")}
    times = round_times(consortium, settings, args.seed, args.repeats)
    banks = sorted(consortium.nodes)
    print(f"\nHoldout AUPRC ({args.banks} banks, {args.rows:,} rows, {args.rounds} rounds x "
          f"{settings.trees_per_round} trees, seed {args.seed})")
    print("| strategy | " + " | ".join(banks) + " | pooled |")
    print("|---" * (len(banks) + 2) + "|")
    for strategy, row in table.items():
        print(f"| {strategy} | " + " | ".join(f"{row[b]:.3f}" for b in banks) + f" | {row['pooled']:.3f} |")
    central = table["centralized"]["pooled"]
    for name in ("bagging", "cyclic"):
        beats = sum(table[name][b] > table["local"][b] for b in banks)
        print(f"{name}: pooled AUPRC {table[name]['pooled'] / central:.3f}x centralized; "
              f"above local-only at {beats}/{len(banks)} banks")
    print(f"\nBytes on the wire over {args.rounds} rounds (MB each bank sent / received; payloads as counted "
          "at the in-process boundary):")
    print("| strategy | " + " | ".join(banks) + " | all banks |")
    print("|---" * (len(banks) + 2) + "|")
    for name, rows in wire.items():
        cells = [f"{rows[b]['sent'] / 1e6:.2f} / {rows[b]['received'] / 1e6:.2f}" if b in rows else "–" for b in banks]
        sent, received = (sum(r[way] for r in rows.values()) / 1e6 for way in ("sent", "received"))
        print(f"| {name} | " + " | ".join(cells) + f" | {sent:.2f} / {received:.2f} |")
    print(f"\nOne training round of {settings.trees_per_round} trees (median of {args.repeats}):")
    for name in ("bagging", "cyclic"):
        print(f"  {name:<8} {times[name]:6.2f}s = {times[name] / times['centralized']:.2f}x centralized "
              f"({times['centralized']:.2f}s)")
    results = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "rows": args.rows,
               "banks": banks, "rounds": args.rounds, "seed": args.seed, "auprc": table, "round_seconds": times,
               "wire_bytes": wire, "cpu_count": __import__("os").cpu_count(), "python": platform.python_version()}
    out = args.work_dir / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
