"""Bench: pooled AUPRC of a private federation against the ε each bank spends (bagging: bank_node/privacy.py;
histogram: bank_node/histogram_privacy.py).

Generated non-IID banks (``pipelines.synthetic``), validated and featurised once; then one embedded
federation of ``--strategy`` (real XGBoost, real MLflow, masked evaluation, acceptance on) per target ε:

* ``inf`` — privacy off (the ordinary federation);
* a number — every bank's noise multiplier sigma taken from the accountant so that its Gaussian mechanisms
  spend that ε at δ (``privacy_ledger.noise_for_budget``; never below the policy's least sigma, 0.3, so a
  large ε may be under-spent). Bagging: ``rounds x trees`` mechanisms; histogram: ``rounds x trees x
  (max_depth + 1)`` (each tree's levels and root sums).

Cross-evaluation is off (a shared local model is charged to the budget too: it would halve what the
rounds may spend). Every bank has the same policy (the defaults: C 1, W 1, leaf_lambda 20). Each
private setting runs with ``--noise-seeds`` different noise keys (the bank's secret), reported as mean
and range. The pooled AUPRC is the federation's own (from masked sums) for its last round's model on
every bank's holdout.

    nice -n 19 .venv/bin/python bench/privacy.py --rows 100000 --banks 4 --rounds 2 --trees 10 --noise-seeds 2 \
        --work-dir work/bench/privacy [--epsilons inf,8,4,2,1]
    nice -n 19 .venv/bin/python bench/privacy.py --strategy histogram --rows 100000 --banks 4 --rounds 2 \
        --trees 10 --max-depth 4 --max-bin 32 --noise-seeds 2 --work-dir work/bench/privacy-histogram
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from aggregator.drivers.embedded import prepare_consortium, run_federation
from aggregator.tracking import FederationTracker
from bank_node.node import BankNode
from bank_node.privacy import PrivacyPolicy
from bank_node.privacy_ledger import noise_for_budget
from fedfraud.settings import FederationSettings
from pipelines.config import load_config
from pipelines.synthetic import write_banks

def run(consortium, args, label: str, policy: PrivacyPolicy, noise_seed: int, settings) -> dict:
    """One federation with every bank on ``policy``; its pooled AUPRC and the ε each bank spent."""
    name = f"privacy-{args.strategy}-{label}-{noise_seed}"
    nodes = {}
    for bank, base in sorted(consortium.nodes.items()):
        shutil.rmtree(base.work_dir / "privacy", ignore_errors=True)  # a fresh ledger per federation
        node = BankNode(bank, base.raw_path, base.work_dir, base.config, base.holdout_fraction, base.alert_budget,
                        secagg=base.secagg, share_metrics=True, privacy=policy)
        if policy.enabled:  # a reproducible secret per bank and noise seed (a deployed bank's is random)
            key = hashlib.sha256(f"{args.seed}:{noise_seed}:{bank}".encode()).digest()
            (node.work_dir / "privacy").mkdir(parents=True, exist_ok=True)
            (node.work_dir / "privacy" / "noise.key").write_bytes(key)
        nodes[bank] = node
    work = args.work_dir / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    tracker = FederationTracker(f"sqlite:///{(args.work_dir / 'mlflow.db').resolve()}", name)
    started = time.perf_counter()
    result = run_federation(nodes, args.strategy, args.rounds, tracker, consortium.contract, settings, args.seed,
                            work_dir=work)
    spent = {b: n.privacy_ledger.spent() for b, n in nodes.items()} if policy.enabled else {}
    return {"label": label, "noise_seed": noise_seed, "noise_multiplier": policy.noise_multiplier if policy.enabled
            else None, "pooled_auprc": result.evaluation.pooled["auprc"], "epsilon_spent": spent,
            "rejections": sorted({f"{x['bank']}:{x['check']}" for x in result.rejections}),
            "seconds": round(time.perf_counter() - started, 1)}


def generated_banks(args) -> dict[str, Path]:
    """The generated banks, written once per (banks, rows, seed): a re-run keeps their features."""
    raw, wanted = args.work_dir / "raw", {"banks": args.banks, "rows": args.rows, "seed": args.seed}
    marker = raw / "generated.json"
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return {p.parent.name: p for p in sorted(raw.glob("*/transactions.parquet"))}
    paths = write_banks(raw, n_banks=args.banks, total_rows=args.rows, seed=args.seed)
    marker.write_text(json.dumps(wanted))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=("bagging", "histogram"), default="bagging")
    parser.add_argument("--rows", type=int, default=150_000)
    parser.add_argument("--banks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trees", type=int, default=20, help="trees per round")
    parser.add_argument("--max-depth", type=int, default=6)
    parser.add_argument("--max-bin", type=int, default=256)
    parser.add_argument("--min-child-weight", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--epsilons", default="inf,8,4,2,1")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--noise-seeds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work-dir", type=Path, default=Path("work/bench/privacy"))
    args = parser.parse_args()
    settings = FederationSettings(trees_per_round=args.trees, crossval=False, max_depth=args.max_depth,
                                  max_bin=args.max_bin, min_child_weight=args.min_child_weight,
                                  learning_rate=args.learning_rate)
    paths = generated_banks(args)
    consortium = prepare_consortium(paths, args.work_dir, load_config(), settings,
                                    lambda m: print(f"  {m}", file=sys.stderr))
    per_tree = args.max_depth + 1 if args.strategy == "histogram" else 1
    mechanisms = args.rounds * args.trees * per_tree
    rows = []
    for label in args.epsilons.split(","):
        if label == "inf":
            policies = [(PrivacyPolicy(), 0)]
        else:
            sigma = noise_for_budget(float(label), args.delta, mechanisms)
            budget = float(label) * 1.001  # the accountant's own rounding
            policy = PrivacyPolicy(True, epsilon_budget=budget, delta=args.delta, noise_multiplier=sigma)
            policies = [(policy, seed) for seed in range(args.noise_seeds)]
        for policy, seed in policies:
            row = run(consortium, args, label, policy, seed, settings)
            rows.append(row)
            print(f"  ε {label:<5} noise seed {seed}: pooled AUPRC {row['pooled_auprc']:.4f} "
                  f"({row['seconds']:.0f}s)", file=sys.stderr)
    print(f"\nPrivate {args.strategy}: pooled AUPRC vs ε ({args.banks} banks, {args.rows:,} rows, {args.rounds} "
          f"rounds x {args.trees} trees{f' x {per_tree} releases' if per_tree > 1 else ''} = {mechanisms} Gaussian "
          f"mechanisms per bank, max_depth {args.max_depth}, max_bin {args.max_bin}, min_child_weight "
          f"{args.min_child_weight:g}, eta {args.learning_rate:g}, δ {args.delta:g}, "
          f"seed {args.seed}, {args.noise_seeds} noise seeds)")
    print("| target ε | noise multiplier σ | ε spent (max over banks) | pooled AUPRC mean (min – max) |")
    print("|---|---|---|---|")
    for label in args.epsilons.split(","):
        group = [r for r in rows if r["label"] == label]
        auprc = [r["pooled_auprc"] for r in group]
        sigma = group[0]["noise_multiplier"]
        spent = max((max(r["epsilon_spent"].values()) for r in group if r["epsilon_spent"]), default=None)
        print(f"| {label} | {'–' if sigma is None else f'{sigma:.3g}'} | "
              f"{'–' if spent is None else f'{spent:.3f}'} | "
              f"{statistics.mean(auprc):.4f} ({min(auprc):.4f} – {max(auprc):.4f}) |")
    out = args.work_dir / f"results-{args.strategy}-{args.epsilons.replace(',', '_')}.json"
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "rows": rows,
                               "cpu_count": os.cpu_count(), "python": platform.python_version(),
                               "load_average": os.getloadavg()}, indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
