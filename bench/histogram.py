"""Bench: histogram federation against bagging / cyclic / centralized / local on generated banks.

It reuses the banks that ``bench/federation.py`` prepared in ``--work-dir`` (and its
results.json, for the other strategies' AUPRC). It generates and prepares them only when they
are missing. Then:

1. quality: ``--rounds`` x 20 trees of histogram federation (registered in the bench's MLflow).
   It prints holdout AUPRC per bank and pooled beside the other strategies'.
2. exactness: the registered model, scoring *raw* holdout features, against a centralized fit
   on the same *binned* pooled rows. Both use the same rounds and seeds. It prints whether
   every prediction is bit-identical.
3. wall time: one round of 20 trees (server and bank processes included), with secure
   aggregation (every bank behind its masking sidecar, the default) and without, against a
   centralized fit of 20 trees on the pooled raw rows, as ``bench/federation.py`` times it
   (XGBoost nthread=2), and with nthread=1. Median of ``--repeats``; masked and unmasked
   rounds alternate, so load changes hit both alike. These are one-round worlds (server and
   workers started for the round: the Airflow and service drivers today).
4. kept world (the embedded driver): ``--repeats`` + 1 masked rounds on one federated server and
   one worker + sidecar per bank; the first round starts them, each later round is timed against
   centralized fits of the same 20 trees on top of the same global model (nthread 2 and 1), right
   after it. Where each round's time goes (server listening and every bank asked, the slowest bank's
   trees) is printed, and the kept world's model is checked bit-identical to a centralized fit on the
   shared bins and to the same rounds in one-round worlds.

``--masking on|off`` chooses how steps 1-2 run (default on); ``--round-times-only`` skips them.

    .venv/bin/python bench/federation.py --rows 300000 --repeats 1 --work-dir work/bench/fed300
    .venv/bin/python bench/histogram.py --work-dir work/bench/fed300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


from aggregator.drivers.embedded import Consortium, federate, prepare_consortium, processes_kept, train_round
from fedfraud.settings import FederationSettings, consortium_params
from aggregator.strategies.histogram import Histogram
from aggregator.tracking import default_tracking_uri
from bank_node.exact_gradients import fixed_point_logistic
from bank_node.histogram_worker import ALLOW_UNMASKED_ENV, ClientTLS
from bank_node.node import FINGERPRINT_FILE, BankNode, input_fingerprint
from fedfraud import pki
from bank_node.training import dmatrix, train_trees
from fedfraud import model_json
from fedfraud.wire import TrainTask
from pipelines.config import load_config
from pipelines.synthetic import write_banks

OTHERS = ("local", "bagging", "cyclic", "centralized")


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def load_consortium(work_dir: Path, rows: int, n_banks: int, seed: int, settings: FederationSettings) -> Consortium:
    """The prepared banks in ``work_dir`` if they are current (no Spark needed), else generate/prepare."""
    config = load_config()
    raw = work_dir / "raw"
    paths = {p.name: p / "transactions.parquet" for p in sorted(raw.iterdir())} if raw.exists() else {}
    if len(paths) != n_banks or not all(p.exists() for p in paths.values()):
        log(f"generating {n_banks} banks, {rows:,} rows")
        paths = write_banks(raw, n_banks=n_banks, total_rows=rows, seed=seed)
    nodes = {b: BankNode(b, p, work_dir / "banks" / b, config, settings.holdout_fraction, settings.alert_budget)
             for b, p in paths.items()}
    current = all((n.work_dir / FINGERPRINT_FILE).exists()
                  and json.loads((n.work_dir / FINGERPRINT_FILE).read_text()) == input_fingerprint(n.raw_path, config)
                  for n in nodes.values())
    if current:
        log("reusing prepared banks")
        return Consortium(nodes, config, work_dir)
    return prepare_consortium(paths, work_dir, config, settings, log)


def certify(consortium: Consortium) -> None:
    """Banks without consortium credentials get a certificate of a bench consortium (masking agrees keys with it)."""
    folder = consortium.work_dir / "pki-histogram"
    banks = sorted(consortium.nodes)
    if not (folder / "ca" / "ca.crt").exists():
        pki.provision("bench-histogram", [pki.AGGREGATOR, *banks], folder, operators=())
    for bank, node in consortium.nodes.items():
        if getattr(node, "secagg", None) is None and node.histogram_tls is None:
            node.histogram_tls = ClientTLS(str(folder / bank / "ca.crt"), str(folder / bank / "key.pem"),
                                           str(folder / bank / "cert.pem"))


def other_strategies(work_dir: Path) -> tuple[dict[str, dict[str, float]], dict]:
    """AUPRC rows of bench/federation.py for the same banks (its results.json), if present."""
    path = work_dir / "results.json"
    if not path.exists():
        log(f"{path} missing: run bench/federation.py --work-dir {work_dir} for the other strategies")
        return {}, {}
    results = json.loads(path.read_text())
    return {s: results["auprc"][s] for s in OTHERS if s in results["auprc"]}, results


def histogram_quality(consortium: Consortium, rounds: int, settings: FederationSettings, seed: int):
    uri = default_tracking_uri(consortium.work_dir)
    started = time.perf_counter()
    result = federate(consortium, "histogram", rounds, "bench-histogram", uri, settings, seed, log)[""]
    seconds = time.perf_counter() - started
    row = {b: m["auprc"] for b, m in result.evaluation.per_bank.items()}
    row["pooled"] = result.evaluation.pooled["auprc"]
    return row, result, uri, seconds


def exactness(consortium: Consortium, result, uri: str, rounds: int, settings: FederationSettings, seed: int):
    """Registered model on raw holdouts vs a centralized fit on the binned pooled rows, same seeds."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    registered = mlflow.xgboost.load_model(result.model_uri)
    nodes, names = consortium.nodes, consortium.contract["names"]
    banks = sorted(nodes)
    counts = [nodes[b].data.counts() for b in banks]  # in process: the plaintext reference
    strategy = Histogram(settings, seed, consortium_params(settings, sum(c["positives"] for c in counts),
                                                           sum(c["negatives"] for c in counts)))
    bins = strategy.shared_bins(nodes, banks)
    booster = centralized_chain(consortium, strategy, bins, rounds)
    identical, worst = True, 0.0
    for b in banks:
        raw = registered.predict(dmatrix(nodes[b].data.X_holdout, None, names))
        pooled = booster.predict(dmatrix(bins.apply(nodes[b].data.X_holdout), None, names))
        identical &= bool(np.array_equal(raw, pooled))
        worst = max(worst, float(np.abs(raw - pooled).max(initial=0.0)))
    return identical, worst, [len(e) + 1 for e in bins.edges]


def pooled_rows(consortium: Consortium, settings: FederationSettings):
    """(nodes, contract, banks, consortium params, pooled X, pooled y): what a centralized fit of the banks needs."""
    nodes, contract = consortium.nodes, consortium.contract
    banks = sorted(nodes)
    counts = [nodes[b].data.counts() for b in banks]  # in process: the plaintext reference
    params = consortium_params(settings, sum(c["positives"] for c in counts), sum(c["negatives"] for c in counts))
    X = np.concatenate([nodes[b].data.X_train for b in banks])
    y = np.concatenate([nodes[b].data.y_train for b in banks])
    return nodes, contract, banks, params, X, y


def round_times(consortium: Consortium, settings: FederationSettings, seed: int, repeats: int) -> dict[str, float]:
    """Median seconds of one histogram round, masked and unmasked, and of centralized fits of as many trees."""
    nodes, contract, banks, params, X, y = pooled_rows(consortium, settings)
    strategy = Histogram(settings, seed, params)
    started = time.perf_counter()
    strategy.bins = strategy.shared_bins(nodes, banks)
    timings: dict[str, list[float]] = {"histogram": [], "histogram_unmasked": [], "centralized": [],
                                       "centralized_nthread1": []}
    bins_seconds = time.perf_counter() - started
    models = set()
    for repeat in range(repeats):
        modes = [("histogram", True), ("histogram_unmasked", False)]
        for name, masked in modes if repeat % 2 == 0 else modes[::-1]:
            strategy.secagg = masked
            started = time.perf_counter()
            doc, _, _ = train_round(nodes, strategy, banks, 1, None, contract, settings)
            timings[name].append(time.perf_counter() - started)
            models.add(model_json.model_id(doc))
        if len(models) != 1:
            raise SystemExit("masked and unmasked rounds grew different models")
        for name, extra in (("centralized", {}), ("centralized_nthread1", {"nthread": 1})):
            task = TrainTask(bank="pooled", round_id=1, base_model_id="none", contract_hash=contract["hash"],
                             num_trees=settings.trees_per_round, params={**params, "seed": seed + repeat, **extra})
            started = time.perf_counter()
            train_trees(task, X, y, contract["names"], obj=fixed_point_logistic(task.params))
            timings[name].append(time.perf_counter() - started)
        log(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in timings.items()))
    return {**{name: statistics.median(values) for name, values in timings.items()}, "shared_bins": bins_seconds}


def slowest_trees(nodes: dict) -> float:
    """The slowest bank's training time in its worker's last round (from its log): the trees alone."""
    seconds = []
    for node in nodes.values():
        lines = [line for line in (node.work_dir / "histogram" / "worker.log").read_text(errors="replace").splitlines()
                 if " trees in " in line]
        if lines:
            seconds.append(float(lines[-1].split(" trees in ", 1)[1].split("s", 1)[0]))
    return max(seconds, default=float("nan"))


def kept_world_times(consortium: Consortium, settings: FederationSettings, seed: int, repeats: int,
                     masked: bool = True) -> dict:
    """``repeats`` + 1 rounds in one kept world; each later round against centralized fits of the same
    trees on the same global model, timed right after it."""
    nodes, contract, banks, params, X, y = pooled_rows(consortium, settings)
    strategy = Histogram(settings, seed, params)
    strategy.secagg = masked
    timings: dict[str, list[float]] = {"kept_round": [], "centralized_warm": [], "centralized_warm_nthread1": []}
    breakdown, doc, ids = [], None, []
    with processes_kept(strategy):
        for round_id in range(1, repeats + 2):
            started = time.perf_counter()
            new_doc, _, _ = train_round(nodes, strategy, banks, round_id, doc, contract, settings)
            seconds = time.perf_counter() - started
            breakdown.append({"round": round_id, "seconds": seconds, "slowest_bank_trees_s": slowest_trees(nodes),
                              **strategy.last_timings})
            if round_id > 1:
                timings["kept_round"].append(seconds)
                for name, extra in (("centralized_warm", {}), ("centralized_warm_nthread1", {"nthread": 1})):
                    task = strategy.configure(round_id, "pooled", 0, doc, contract["hash"])
                    task = dataclasses.replace(task, base_model=doc, params={**task.params, **extra})
                    started = time.perf_counter()
                    train_trees(task, X, y, contract["names"], obj=fixed_point_logistic(task.params))
                    timings[name].append(time.perf_counter() - started)
            mode = "masked" if masked else "unmasked"
            log(f"kept world ({mode}), round {round_id}: {seconds:.2f}s ({breakdown[-1]})" + (
                "" if round_id == 1 else f"; centralized {timings['centralized_warm'][-1]:.2f}s, nthread=1 "
                                         f"{timings['centralized_warm_nthread1'][-1]:.2f}s"))
            doc = new_doc
            ids.append(model_json.model_id(doc))
    identical = kept_equals_centralized(consortium, strategy, doc, repeats + 1)
    one_round = Histogram(settings, seed, params)  # the same rounds in one-round worlds: the same models?
    one_round.secagg, one_round_doc, one_round_ids = masked, None, []
    for round_id in range(1, repeats + 2):
        one_round_doc, _, _ = train_round(nodes, one_round, banks, round_id, one_round_doc, contract, settings)
        one_round_ids.append(model_json.model_id(one_round_doc))
    return {**{name: statistics.median(values) for name, values in timings.items()},
            "first_round": breakdown[0]["seconds"], "rounds": breakdown, "bit_identical": identical,
            "model_ids": ids, "same_as_one_round_worlds": ids == one_round_ids}


def centralized_chain(consortium: Consortium, strategy: Histogram, bins, rounds: int):
    """``rounds`` rounds of the strategy's trees fitted centrally on every bank's binned training rows."""
    nodes, names = consortium.nodes, consortium.contract["names"]
    banks = sorted(nodes)
    X = np.concatenate([bins.apply(nodes[b].data.X_train) for b in banks])
    y = np.concatenate([nodes[b].data.y_train for b in banks])
    booster = None
    for round_id in range(1, rounds + 1):
        task = strategy.configure(round_id, "pooled", 0, None, consortium.contract["hash"])
        task = dataclasses.replace(task, base_model=None if booster is None else model_json.to_doc(booster))
        booster = train_trees(task, X, y, names, obj=fixed_point_logistic(task.params))
    return booster


def kept_equals_centralized(consortium: Consortium, strategy: Histogram, doc, rounds: int) -> bool:
    """The kept world's model against a centralized chain on the binned pooled rows (same rounds and seeds)."""
    nodes, names = consortium.nodes, consortium.contract["names"]
    banks = sorted(nodes)
    booster = centralized_chain(consortium, strategy, strategy.bins, rounds)
    federated = model_json.to_booster(doc)
    return all(np.array_equal(federated.predict(dmatrix(nodes[b].data.X_holdout, None, names)),
                              booster.predict(dmatrix(strategy.bins.apply(nodes[b].data.X_holdout), None, names)))
               for b in banks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("work/bench/fed300"))
    parser.add_argument("--rows", type=int, default=300_000, help="only used when banks must be generated")
    parser.add_argument("--banks", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--masking", choices=("on", "off"), default="on", help="secure aggregation in steps 1-2")
    parser.add_argument("--round-times-only", action="store_true", help="skip steps 1-2 (quality, exactness)")
    args = parser.parse_args()
    os.environ["FEDFRAUD_HISTOGRAM_SECAGG"] = "1" if args.masking == "on" else "0"
    os.environ[ALLOW_UNMASKED_ENV] = "1"  # the bench's banks join unmasked rounds too (for the comparison)
    settings = FederationSettings()
    consortium = load_consortium(args.work_dir, args.rows, args.banks, args.seed, settings)
    certify(consortium)
    banks = sorted(consortium.nodes)
    table, previous = other_strategies(args.work_dir)
    if not args.round_times_only:
        row, result, uri, federation_seconds = histogram_quality(consortium, args.rounds, settings, args.seed)
        table["histogram"] = row
        identical, worst, bins_per_feature = exactness(consortium, result, uri, args.rounds, settings, args.seed)
    times = round_times(consortium, settings, args.seed, args.repeats)
    kept = kept_world_times(consortium, settings, args.seed, args.repeats)
    kept_unmasked = kept_world_times(consortium, settings, args.seed, args.repeats, masked=False)

    rows_total = sum(consortium.nodes[b].data.counts()["train_rows"] for b in banks)
    print(f"\nOne round of {settings.trees_per_round} trees, {len(banks)} banks, {rows_total:,} training rows "
          f"(median of {args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
    print(f"  masked (secure aggregation) {times['histogram']:6.2f}s, unmasked {times['histogram_unmasked']:6.2f}s: "
          f"{times['histogram'] / times['histogram_unmasked']:.2f}x; the same model either way")
    print(f"  kept world (embedded driver), masked: first round {kept['first_round']:.2f}s, later rounds "
          f"{kept['kept_round']:.2f}s = {kept['kept_round'] / kept['centralized_warm']:.2f}x centralized "
          f"({kept['centralized_warm']:.2f}s), {kept['kept_round'] / kept['centralized_warm_nthread1']:.2f}x "
          f"centralized nthread=1 ({kept['centralized_warm_nthread1']:.2f}s); bit-identical to centralized on "
          f"the shared bins: {kept['bit_identical']}; the same models as one-round worlds, round by round: "
          f"{kept['same_as_one_round_worlds']}")
    print(f"  kept world, unmasked: first round {kept_unmasked['first_round']:.2f}s, later rounds "
          f"{kept_unmasked['kept_round']:.2f}s = {kept_unmasked['kept_round'] / kept_unmasked['centralized_warm']:.2f}x"
          f" centralized, {kept_unmasked['kept_round'] / kept_unmasked['centralized_warm_nthread1']:.2f}x nthread=1;"
          f" bit-identical to centralized: {kept_unmasked['bit_identical']}; same models as one-round worlds: "
          f"{kept_unmasked['same_as_one_round_worlds']}")
    for r in kept["rounds"]:
        print(f"    masked round {r['round']}: {r['seconds']:.2f}s, {r.get('world')} world, server listening and "
              f"banks asked after {r.get('ready_s', float('nan')):.2f}s, slowest bank's trees "
              f"{r['slowest_bank_trees_s']:.2f}s")
    if args.round_times_only:  # steps 1-2 skipped
        out = args.work_dir / "histogram_round_times.json"
        out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                                   "banks": banks, "train_rows": rows_total, "round_seconds": times,
                                   "kept_world": kept, "kept_world_unmasked": kept_unmasked,
                                   "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}, indent=2))
        print(f"\nresults: {out}")
        return
    print(f"\nHoldout AUPRC ({len(banks)} banks, {rows_total:,} training rows, {args.rounds} rounds x "
          f"{settings.trees_per_round} trees, seed {args.seed}; other rows from {args.work_dir / 'results.json'})")
    print("| strategy | " + " | ".join(banks) + " | pooled |")
    print("|---" * (len(banks) + 2) + "|")
    for strategy in (*OTHERS, "histogram"):
        if strategy in table:
            cells = [table[strategy].get(b, math.nan) for b in [*banks, "pooled"]]
            print(f"| {strategy} | " + " | ".join("-" if math.isnan(v) else f"{v:.3f}" for v in cells) + " |")
    if "centralized" in table:
        print(f"histogram: pooled AUPRC {row['pooled'] / table['centralized']['pooled']:.3f}x centralized (raw rows)")
    print(f"bit-identical to a centralized fit on the binned pooled rows (registered model on raw holdout "
          f"features): {identical} (max |diff| {worst:g}); bins per feature {min(bins_per_feature)}.."
          f"{max(bins_per_feature)}")
    print(f"\nOne round of {settings.trees_per_round} trees (median of {args.repeats}; {os.cpu_count()} cores; "
          f"masking {args.masking} above, on below):")
    for name in ("centralized", "centralized_nthread1"):
        print(f"  histogram {times['histogram']:6.2f}s = {times['histogram'] / times[name]:.2f}x {name} "
              f"({times[name]:.2f}s)")
    print(f"  once per federation: shared bins from grid counts {times['shared_bins']:.2f}s; whole "
          f"{args.rounds}-round federation incl. evaluation + MLflow {federation_seconds:.1f}s")
    out = args.work_dir / "histogram_results.json"
    out.write_text(json.dumps({
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "banks": banks, "rounds": args.rounds,
        "seed": args.seed, "masking": args.masking, "train_rows": rows_total, "auprc": table,
        "bit_identical": identical, "kept_world": kept, "kept_world_unmasked": kept_unmasked,
        "max_abs_diff": worst, "bins_per_feature": bins_per_feature, "round_seconds": times,
        "federation_seconds": federation_seconds, "model_uri": result.model_uri,
        "other_strategies_from": previous.get("command"), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "python": platform.python_version()}, indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
