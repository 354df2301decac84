"""Bench: bagging with and without compaction over 10 rounds on generated non-IID banks.

Both federations run the whole embedded protocol (cross-evaluation, acceptance scoring, federated
evaluation, MLflow registry) on the same banks and seed; only ``settings.compaction`` differs.
Each bank's holdout is split in time: the first half stays the holdout every phase uses (and
compaction is judged on); the second half is a test set no phase sees, so the AUPRC figures are
not the ones compaction selected on. Reported per federation: model size by round, pooled
AUPRC (federated holdout and test), wall time, and scoring speed of the champion and of the last
round's model (XGBoost ``predict`` on the pooled test rows, best of ``--repeats``).

    nice -n 15 .venv/bin/python bench/compaction.py --rows 200000 --rounds 10
    (or side by side: ``--only without`` and ``--only compacted`` in two processes, then ``--report``;
    ``--at-round N`` compares both federations' round-N models from their workspaces)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

from aggregator.drivers.embedded import Consortium, federate, prepare_consortium
from aggregator.protocol import traffic
from aggregator.tracking import FederationTracker
from bank_node.training import dmatrix
from fedfraud import model_json
from fedfraud.settings import FederationSettings
from pipelines.config import load_config
from pipelines.synthetic import write_banks


def banks_for(args) -> dict[str, Path]:
    """Generated banks, written once per (rows, banks, seed): rewriting them would re-run the features."""
    raw, stamp = args.work_dir / "raw", {"rows": args.rows, "banks": args.banks, "seed": args.seed}
    marker = raw / "generated.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return {p.name: p / "transactions.parquet" for p in sorted(raw.iterdir()) if p.is_dir()}
    paths = write_banks(raw, n_banks=args.banks, total_rows=args.rows, seed=args.seed)
    marker.write_text(json.dumps(stamp))
    return paths


def split_test(consortium: Consortium) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first half of every bank's holdout as its holdout; return the second halves, pooled."""
    X, y = [], []
    for bank in sorted(consortium.nodes):
        node = consortium.nodes[bank]
        data, half = node.data, len(node.data.y_holdout) // 2
        X.append(data.X_holdout[half:])
        y.append(data.y_holdout[half:])
        node.__dict__["data"] = dataclasses.replace(data, X_holdout=data.X_holdout[:half],
                                                    y_holdout=data.y_holdout[:half])
    return np.concatenate(X), np.concatenate(y)


def rows_per_second(doc, X: np.ndarray, names: list[str], repeats: int) -> float:
    """Scoring speed of a model on ``X`` (DMatrix built once; best of ``repeats``)."""
    booster = model_json.to_booster(doc)
    booster.inplace_predict(X)  # warm-up; in place: predict() on one DMatrix serves cached results
    best = min(_timed(lambda: booster.inplace_predict(X)) for _ in range(repeats))
    return len(X) / best


def interleaved_speeds(docs: dict, X: np.ndarray, names: list[str], repeats: int) -> dict[str, float]:
    """Rows per CPU second of each model on one thread, timed in turns (best of ``repeats`` each): on a
    shared, loaded machine wall time mostly measures the neighbours, CPU time the model."""
    boosters = {name: model_json.to_booster(doc) for name, doc in docs.items()}
    best = dict.fromkeys(boosters, float("inf"))
    for booster in boosters.values():
        booster.set_param({"nthread": 1})
        booster.inplace_predict(X)  # warm-up; in place: predict() on one DMatrix serves cached results
    for _ in range(repeats):
        for name, booster in boosters.items():
            started = time.process_time()
            booster.inplace_predict(X)
            best[name] = min(best[name], time.process_time() - started)
    return {name: len(X) / seconds for name, seconds in best.items()}


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def run(consortium: Consortium, settings: FederationSettings, name: str, args, test) -> dict:
    work = (args.work_dir / name).resolve()
    shutil.rmtree(work, ignore_errors=True)  # a fresh registry: no champion left from an earlier run
    work.mkdir(parents=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    started = time.perf_counter()
    result = federate(consortium, "bagging", args.rounds, f"bench-{name}", uri, settings, args.seed,
                      lambda m: print(f"  [{name}] {m}", file=sys.stderr, flush=True))[""]
    seconds = time.perf_counter() - started
    ws_root = consortium.work_dir / "federations" / f"bench-{name}"
    trees = [len(model_json.trees(json.loads((ws_root / f"round-{n}" / "model.json").read_bytes())))
             for n in range(1, args.rounds + 1)]
    last = json.loads((ws_root / f"round-{args.rounds}" / "model.json").read_bytes())
    champion = FederationTracker(uri, f"bench-{name}").champion_model()
    champion_version, champion_doc = champion if champion is not None else (result.version, last)
    X, y, names = test[0], test[1], consortium.contract["names"]
    big = np.concatenate([X] * max(1, -(-args.score_rows // len(X))))[:args.score_rows]
    test_auprc = {label: float(average_precision_score(y, model_json.to_booster(doc).predict(dmatrix(X, None, names))))
                  for label, doc in (("last", last), ("champion", champion_doc))}
    return {"seconds": seconds, "trees_by_round": trees, "pooled_holdout_auprc": result.evaluation.pooled["auprc"],
            "test_auprc": test_auprc, "champion_version": champion_version,
            "champion_trees": len(model_json.trees(champion_doc)),
            "rows_per_second": {"last": rows_per_second(last, big, names, args.repeats),
                                "champion": rows_per_second(champion_doc, big, names, args.repeats)}}


def workspace_facts(work_dir: Path, name: str, rounds: int) -> dict:
    """What the rounds recorded: bytes the banks sent and received, and each round's compaction choice."""
    root = work_dir / "federations" / f"bench-{name}"
    sent = received = 0
    chosen = []
    for round_id in range(1, rounds + 1):
        for row in traffic.totals(root / f"round-{round_id}").values():
            sent, received = sent + row["sent"], received + row["received"]
        record = root / f"round-{round_id}" / "compaction.json"
        if record.exists():
            chosen.append(json.loads(record.read_text()).get("chosen"))
    return {"sent": sent, "received": received, "chosen": chosen}


def report_at_round(args, round_id: int) -> None:
    """Both federations' round-``round_id`` models from their workspaces (a run may still be going):
    trees, pooled holdout AUPRC as the round registered it, test AUPRC and scoring speed measured here."""
    from bank_node.node import BankNode

    config, settings = load_config(), FederationSettings()
    nodes = {bank: BankNode(bank, path, args.work_dir / "banks" / bank, config, settings.holdout_fraction)
             for bank, path in banks_for(args).items()}
    consortium = Consortium(nodes, config, args.work_dir)
    X, y = split_test(consortium)
    names = consortium.contract["names"]
    big = np.concatenate([X] * max(1, -(-args.score_rows // len(X))))[:args.score_rows]
    rows, docs = {}, {}
    for name in ("without", args.name):
        docs[name] = json.loads((args.work_dir / "federations" / f"bench-{name}" / f"round-{round_id}" / "model.json")
                                .read_bytes())
    speeds = interleaved_speeds(docs, big, names, args.repeats)
    print(f"\nRound {round_id} of bagging, {args.banks} banks, {args.rows:,} rows, {settings.trees_per_round} "
          f"trees per bank and round, seed {args.seed}; test rows {len(y):,} ({int(y.sum())} frauds)")
    print("| compaction | trees | pooled holdout AUPRC | test AUPRC | scoring rows per CPU s (1 thread) | "
          "MB sent / received (all rounds) |")
    print("|---|---|---|---|---|---|")
    for label, name in (("off", "without"), ("on", args.name)):
        root = args.work_dir / "federations" / f"bench-{name}" / f"round-{round_id}"
        doc, speed = docs[name], speeds[name]
        pooled = json.loads((root / "registered.json").read_bytes())["pooled"]["auprc"]
        auprc = float(average_precision_score(y, model_json.to_booster(doc).predict(dmatrix(X, None, names))))
        facts = workspace_facts(args.work_dir, name, round_id)
        rows[name] = {"trees": len(model_json.trees(doc)), "pooled": pooled, "test": auprc, "speed": speed, **facts}
        print(f"| {label} | {rows[name]['trees']} | {pooled:.4f} | {auprc:.4f} | {speed:,.0f} | "
              f"{facts['sent'] / 1e6:.1f} / {facts['received'] / 1e6:.1f} |")
    on, off = rows[args.name], rows["without"]
    print(f"chosen by round: {on['chosen']}")
    print(f"scoring {on['speed'] / off['speed']:.2f}x faster; test AUPRC {on['test'] - off['test']:+.4f}; "
          f"pooled holdout AUPRC {on['pooled'] - off['pooled']:+.4f}")
    out = args.work_dir / f"results-round-{round_id}.json"
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                               "round": round_id, "rows": rows}, indent=2))
    print(f"results: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--banks", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tolerance", type=float, default=FederationSettings.compaction_tolerance)
    parser.add_argument("--score-rows", type=int, default=200_000, help="rows scored per timing (test rows repeated)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=Path("work/bench/compaction"))
    parser.add_argument("--new-trees", action="store_true", help="compaction may drop a round's own trees too")
    parser.add_argument("--steps", type=int, default=FederationSettings.compaction_steps, help="drop sizes per round")
    parser.add_argument("--per-round", action="store_true", help="the tolerance bounds each round's loss "
                        "(compaction_budget off: the losses add up over rounds), not the federation's")
    parser.add_argument("--refit", action="store_true", help="leaf refit (compaction_refit) in the last round "
                        "(or every --refit-every rounds): each bank block keeps --refit-keep of its trees")
    parser.add_argument("--no-drop", action="store_true", help="no drop ladder (compaction off): the refit alone")
    parser.add_argument("--refit-every", type=int, help="default: --rounds")
    parser.add_argument("--refit-keep", type=float, default=FederationSettings.compaction_refit_keep)
    parser.add_argument("--refit-steps", type=int, default=FederationSettings.compaction_refit_steps)
    parser.add_argument("--refit-eta", type=float, default=FederationSettings.compaction_refit_eta)
    parser.add_argument("--report", action="store_true", help="print the table from both results files")
    parser.add_argument("--name", default="with", help="the compacted federation's name (bench-NAME)")
    parser.add_argument("--only", choices=("compacted", "without"),
                        help="run one federation (two processes can run side by side); the table is printed "
                             "once both results exist")
    parser.add_argument("--at-round", type=int, help="compare both federations' models of this round, "
                        "from their workspaces (no federation is run)")
    args = parser.parse_args()
    if args.at_round:
        report_at_round(args, args.at_round)
        return
    plain = FederationSettings()
    settings = {"without": plain, args.name: dataclasses.replace(plain, compaction=not args.no_drop,
                                                                   compaction_tolerance=args.tolerance,
                                                                   compaction_new_trees=args.new_trees,
                                                                   compaction_budget=not args.per_round,
                                                                   compaction_steps=args.steps,
                                                                   compaction_refit=args.refit,
                                                                   compaction_refit_every=args.refit_every
                                                                   or args.rounds,
                                                                   compaction_refit_keep=args.refit_keep,
                                                                   compaction_refit_steps=args.refit_steps,
                                                                   compaction_refit_eta=args.refit_eta)}
    same = {"rows": args.rows, "banks": args.banks, "rounds": args.rounds, "seed": args.seed}
    done = {name: args.work_dir / f"results-{name}.json" for name in settings}
    if not args.report:
        consortium = prepare_consortium(banks_for(args), args.work_dir, load_config(), FederationSettings(),
                                        lambda m: print(f"  {m}", file=sys.stderr, flush=True))
        test = split_test(consortium)
        for name in [{"compacted": args.name}.get(args.only, args.only)] if args.only else list(settings):
            row = run(consortium, settings[name], name, args, test)
            done[name].write_text(json.dumps({**same, "test_rows": len(test[1]), "test_frauds": int(test[1].sum()),
                                              "settings": dataclasses.asdict(settings[name]), **row}, indent=2))
    results = {name: json.loads(path.read_text()) for name, path in done.items() if path.exists()}
    if len(results) < 2 or any({k: r[k] for k in same} != same for r in results.values()):
        print("waiting for both federations' results with these arguments", file=sys.stderr)
        return
    off, on = results["without"], results[args.name]
    print(f"\nBagging, {args.banks} banks, {args.rows:,} rows, {args.rounds} rounds x {plain.trees_per_round} trees, "
          f"seed {args.seed}; compaction tolerance {args.tolerance}; test rows {off['test_rows']:,} "
          f"({off['test_frauds']} frauds)")
    print("| compaction | model | version | trees | pooled holdout AUPRC (last round) | test AUPRC | "
          "scoring rows/s | federation s | MB sent / received by the banks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, name, row in (("off", "without", off), ("on", args.name, on)):
        facts = workspace_facts(args.work_dir, name, args.rounds)
        wire = f"{facts['sent'] / 1e6:.1f} / {facts['received'] / 1e6:.1f}"
        for model, version, trees in (("last round", args.rounds, row["trees_by_round"][-1]),
                                      ("champion", row["champion_version"], row["champion_trees"])):
            key = "last" if model == "last round" else "champion"
            print(f"| {label} | {model} | {version} | {trees} | {row['pooled_holdout_auprc']:.4f} | "
                  f"{row['test_auprc'][key]:.4f} | {row['rows_per_second'][key]:,.0f} | {row['seconds']:.0f} | "
                  f"{wire} |")
        if name == args.name:
            print(f"chosen by round: {facts['chosen']}")
    print(f"trees by round, off: {off['trees_by_round']}\ntrees by round, on:  {on['trees_by_round']}")
    for key in ("last", "champion"):
        speedup = on["rows_per_second"][key] / off["rows_per_second"][key]
        print(f"{key}: scoring {speedup:.2f}x faster with compaction; test AUPRC "
              f"{on['test_auprc'][key] - off['test_auprc'][key]:+.4f}")
    print(f"pooled holdout AUPRC (last round) {on['pooled_holdout_auprc'] - off['pooled_holdout_auprc']:+.4f}")
    out = args.work_dir / "results.json"
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), **vars(args),
                               "work_dir": str(args.work_dir), "results": results, "cpu_count": os.cpu_count(),
                               "python": platform.python_version()}, indent=2, default=str))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
