"""Bench (prototype, offline): smaller round-N models with their leaves refitted, scored on fresh rows.

Takes the uncompacted federation's round-N model and the banks' training rows from a
``bench/compaction.py`` work dir, keeps a subset of trees (``--keep``), refits the kept leaves by damped
Newton steps on the pooled per-leaf gradient/hessian sums (computed here in the clear: a prototype;
the federation sums them masked), and scores each result on the fresh rows of
``bench/compaction_fresh.py`` (fresh AUPRC; rows per CPU second on one thread, timed in turns).

    nice -n 19 .venv/bin/python bench/refit_prototype.py --work-dir DIR --cache /work/bench-refit \
        --keep first:10,thin --refit none,joint:8:0.5,rounds:2:1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

from bank_node.dataset import load_dataset
from bank_node.training import dmatrix
from bench.compaction import interleaved_speeds
from fedfraud import leaf_refit, model_json
from fedfraud.settings import FederationSettings

BANKS = ["alpine", "baltic", "celtic", "danube", "elbe"]


def holdout_halves(args) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """bench/compaction.py's split of every bank's holdout, pooled: the first halves (the holdout the phases
    use) and the second halves (its test rows), cached."""
    cache = args.cache
    if not (cache / "test-X.npy").exists():
        fraction, parts = FederationSettings().holdout_fraction, {"hold": ([], []), "test": ([], [])}
        for bank in BANKS:
            root = args.work_dir / "banks" / bank
            names = json.loads((root / "feature_contract.json").read_text())["names"]
            data = load_dataset(root / "features", names, fraction)
            half = len(data.y_holdout) // 2
            for part, rows in (("hold", slice(None, half)), ("test", slice(half, None))):
                parts[part][0].append(data.X_holdout[rows])
                parts[part][1].append(data.y_holdout[rows])
        for part, (X, y) in parts.items():
            np.save(cache / f"{part}-X.npy", np.concatenate(X))
            np.save(cache / f"{part}-y.npy", np.concatenate(y))
    return {part: (np.load(cache / f"{part}-X.npy"), np.load(cache / f"{part}-y.npy")) for part in ("hold", "test")}


def paired_bootstrap(y: np.ndarray, scores: np.ndarray, reference: np.ndarray, draws: int) -> tuple[float, float]:
    """Standard deviation and 2.5th percentile of AUPRC(scores) - AUPRC(reference) over resampled rows (seed 0)."""
    rng, deltas = np.random.default_rng(0), []
    for _ in range(draws):
        rows = rng.integers(0, len(y), len(y))
        ours, theirs = average_precision_score(y[rows], scores[rows]), average_precision_score(y[rows], reference[rows])
        deltas.append(ours - theirs)
    return float(np.std(deltas)), float(np.percentile(deltas, 2.5))


def cached_rows(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Pooled training rows of the federation's banks and the fresh rows (bench/compaction_fresh.py's), cached."""
    cache = args.cache
    if not ((cache / "fresh-X.npy").exists() and (cache / "train-X.npy").exists()):
        cache.mkdir(parents=True, exist_ok=True)
        fraction = FederationSettings().holdout_fraction
        fresh = args.work_dir / f"fresh-{args.fresh_rows}-1007" / "banks"
        for root, out in ((args.work_dir / "banks", "train"), (fresh, "fresh")):
            X, y = [], []
            for bank in BANKS:
                names = json.loads((root / bank / "feature_contract.json").read_text())["names"]
                data = load_dataset(root / bank / "features", names, fraction)
                X += [data.X_train] + ([data.X_holdout] if out == "fresh" else [])
                y += [data.y_train] + ([data.y_holdout] if out == "fresh" else [])
            np.save(cache / f"{out}-X.npy", np.concatenate(X))
            np.save(cache / f"{out}-y.npy", np.concatenate(y))
        (cache / "names.json").write_text(json.dumps(names))
    load = lambda name: np.load(cache / name)  # noqa: E731
    return (load("train-X.npy"), load("train-y.npy"), load("fresh-X.npy"), load("fresh-y.npy"),
            json.loads((cache / "names.json").read_text()))


def origins(count: int, rounds: int, weights: dict[str, float]) -> list[tuple[int, str, int]]:
    """(round, bank, position in its block) per tree of an uncompacted bagged model (banks in name order)."""
    per_block = count // (rounds * len(BANKS))
    return [(r, b, k) for r in range(1, rounds + 1) for b in BANKS for k in range(per_block)]


def selection(spec: str, origin: list, weights: dict[str, float], strength: list[float]
              ) -> tuple[list[int], dict[int, float]]:
    """Kept tree indices and per-tree leaf scale for a ``--keep`` spec."""
    kind, _, arg = spec.partition(":")
    if kind == "all":
        return list(range(len(origin))), {}
    if kind == "first":  # the first k trees of every bank's block
        return [i for i, (_, _, k) in enumerate(origin) if k < int(arg)], {}
    if kind == "thin":  # the block of the largest-weight bank per round, scaled to the round's weight (k banks)
        n = int(arg or 1)
        top = sorted(BANKS, key=lambda b: (-weights[b], b))[:n]
        scale = sum(weights.values()) / sum(weights[b] for b in top)
        kept = [i for i, (_, b, _) in enumerate(origin) if b in top]
        return kept, dict.fromkeys(kept, scale)
    if kind == "strong":  # the strongest n trees (mean |leaf|)
        order = sorted(range(len(origin)), key=lambda i: -strength[i])[:int(arg)]
        return sorted(order), {}
    if kind == "rounds":  # the first n rounds' trees
        return [i for i, (r, _, _) in enumerate(origin) if r <= int(arg)], {}
    raise SystemExit(f"unknown --keep {spec!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="where the pooled rows are cached as .npy")
    parser.add_argument("--name", default="without")
    parser.add_argument("--round", type=int, default=10)
    parser.add_argument("--fresh-rows", type=int, default=1_000_000)
    parser.add_argument("--keep", default="first:10")
    parser.add_argument("--refit", default="none,joint:8:0.5")
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--score-rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--bootstrap", type=int, default=0, help="paired bootstrap draws on the fresh rows")
    parser.add_argument("--models", default="", help="also score these federations' round-N models (bench-NAME)")
    args = parser.parse_args()
    X, y, Xf, yf, names = cached_rows(args)
    halves = holdout_halves(args)
    fed = args.work_dir / "federations" / f"bench-{args.name}"
    doc = json.loads((fed / f"round-{args.round}" / "model.json").read_bytes())
    plan = json.loads((fed / "plan.json").read_text())
    rows = {b: plan["counts"][b]["train_rows"] for b in BANKS}
    weights = {b: rows[b] / sum(rows.values()) for b in BANKS}  # bagging's shares (no cap reached here)
    forest = model_json.trees(doc)
    from aggregator.compaction import strength
    origin = origins(len(forest), args.round, weights)
    strengths = [strength(t) for t in forest]
    booster = model_json.to_booster(doc)
    matrix = dmatrix(X, None, names)
    flat = leaf_refit.flat_leaves(doc, booster.predict(matrix, pred_leaf=True).reshape(len(X), -1))
    values0 = np.array(list(model_json.leaf_values(doc)))
    base = float(booster.predict(matrix, output_margin=True)[0] - values0[flat[0]].sum())
    weight = leaf_refit.pos_weight(doc)
    print(f"{len(forest)} trees, {len(values0)} leaves; {len(y):,} training rows ({int(y.sum())} frauds); "
          f"{len(yf):,} fresh rows ({int(yf.sum())} frauds); base margin {base:.4f}", file=sys.stderr, flush=True)
    tree_of_leaf = np.concatenate([np.full(len(n), t) for t, n in enumerate(leaf_refit.leaf_nodes(doc))])

    def loss(margin):
        p = 1 / (1 + np.exp(-margin))
        w = np.where(y > 0, weight, 1.0)
        return float(np.mean(-w * (y * np.log(p + 1e-15) + (1 - y) * np.log(1 - p + 1e-15))))

    results, docs = {}, {"all": doc}
    full_scores = booster.predict(dmatrix(Xf, None, names))
    full_auprc = float(average_precision_score(yf, full_scores))
    results["all"] = {"trees": len(forest), "fresh_auprc": full_auprc, "train_loss": loss(base + values0[flat].sum(1))}

    def small_sets(model):
        scored = model_json.to_booster(model)
        return {part: float(average_precision_score(yy, scored.predict(dmatrix(XX, None, names))))
                for part, (XX, yy) in halves.items()}

    results["all"].update(small_sets(doc))
    for name in filter(None, args.models.split(",")):
        other = json.loads((args.work_dir / "federations" / f"bench-{name}" / f"round-{args.round}" / "model.json")
                           .read_bytes())
        scores = model_json.to_booster(other).predict(dmatrix(Xf, None, names))
        docs[f"federation:{name}"] = other
        results[f"federation:{name}"] = {"trees": len(model_json.trees(other)), "train_loss": float("nan"),
                                         "fresh_auprc": float(average_precision_score(yf, scores)), **small_sets(other)}
        if args.bootstrap:
            sd, low = paired_bootstrap(yf, scores, full_scores, args.bootstrap)
            results[f"federation:{name}"].update(bootstrap_sd=sd, bootstrap_p025=low)
    print(f"all: {len(forest)} trees, fresh AUPRC {full_auprc:.4f}", file=sys.stderr, flush=True)
    for keep in args.keep.split(","):
        kept, scales = selection(keep, origin, weights, strengths)
        for refit in args.refit.split(","):
            label = f"{keep}/{refit}"
            started = time.process_time()
            values = values0.copy()
            for t, s in scales.items():
                values[tree_of_leaf == t] *= s
            sub = flat[:, kept]
            trace = [loss(base + values[sub].sum(1))]
            kind, *param = refit.split(":")
            if kind == "joint":  # every kept leaf at once, eta (x 1/trees) per pass
                passes, eta = int(param[0]), float(param[1]) / len(kept)
                for _ in range(passes):
                    g, h = leaf_refit.gradients(base + values[sub].sum(1), y, weight)
                    G, H = leaf_refit.sums(sub, g, h, len(values))
                    values -= eta * G / (H + args.lam)
                    trace.append(loss(base + values[sub].sum(1)))
            elif kind == "rounds":  # round by round (Gauss-Seidel over rounds), eta (x 1/the round's trees)
                passes, eta = int(param[0]), float(param[1])
                blocks = sorted({origin[i][0] for i in kept})
                for _ in range(passes):
                    for r in blocks:
                        cols = [j for j, i in enumerate(kept) if origin[i][0] == r]
                        g, h = leaf_refit.gradients(base + values[sub].sum(1), y, weight)
                        G, H = leaf_refit.sums(sub[:, cols], g, h, len(values))
                        values -= eta / len(cols) * G / (H + args.lam)
                    trace.append(loss(base + values[sub].sum(1)))
            elif kind == "trees":  # tree by tree (backfitting), eta per tree
                passes, eta = int(param[0]), float(param[1])
                for _ in range(passes):
                    margin = base + values[sub].sum(1)
                    for j in range(len(kept)):
                        g, h = leaf_refit.gradients(margin, y, weight)
                        G, H = leaf_refit.sums(sub[:, [j]], g, h, len(values))
                        step = -eta * G / (H + args.lam)
                        values += step
                        margin += step[sub[:, j]]
                    trace.append(loss(margin))
            elif kind in ("rscale", "bscale"):  # one scale per round (per bank-round block), full Newton
                passes = int(param[0])
                key = (lambda i: origin[i][0]) if kind == "rscale" else (lambda i: origin[i][:2])
                blocks = sorted({key(i) for i in kept})
                C = np.zeros((len(y), len(blocks)))
                for j, i in enumerate(kept):
                    C[:, blocks.index(key(i))] += values[sub[:, j]]
                a = np.ones(len(blocks))
                for _ in range(passes):
                    g, h = leaf_refit.gradients(base + C @ a, y, weight)
                    a -= np.linalg.solve((C * h[:, None]).T @ C + args.lam * np.eye(len(a)), C.T @ g)
                    trace.append(loss(base + C @ a))
                for i in kept:
                    values[tree_of_leaf == i] *= a[blocks.index(key(i))]
            elif kind != "none":
                raise SystemExit(f"unknown --refit {refit!r}")
            seconds = time.process_time() - started
            small = model_json.append_trees(model_json.empty_like(doc), _only(doc, [forest[i] for i in kept]))
            offsets = np.concatenate([[0], np.cumsum([len(n) for n in leaf_refit.leaf_nodes(doc)])])
            kept_values = np.concatenate([values[offsets[i]:offsets[i + 1]] for i in kept])
            small = leaf_refit.newton_step(small, -kept_values + np.array(list(model_json.leaf_values(small))),
                                           np.zeros(len(kept_values)), 1.0, 1.0)
            scores = model_json.to_booster(small).predict(dmatrix(Xf, None, names))
            auprc = float(average_precision_score(yf, scores))
            docs[label] = small
            results[label] = {"trees": len(kept), "fresh_auprc": auprc, "train_loss": trace[-1],
                              "loss_trace": trace, "refit_cpu_seconds": seconds, **small_sets(small)}
            if args.bootstrap:
                sd, low = paired_bootstrap(yf, scores, full_scores, args.bootstrap)
                results[label].update(bootstrap_sd=sd, bootstrap_p025=low)
            print(f"{label}: {len(kept)} trees, fresh AUPRC {auprc:.4f} ({auprc - full_auprc:+.4f}), "
                  f"train loss {trace[0]:.5f} -> {trace[-1]:.5f} (full {results['all']['train_loss']:.5f})",
                  file=sys.stderr, flush=True)
    speeds = interleaved_speeds(docs, Xf[:args.score_rows], names, args.repeats)
    print("| model | trees | fresh AUPRC | vs all (bootstrap sd) | holdout AUPRC | test AUPRC | training loss | "
          "scoring rows per CPU s | speed-up |\n|---|---|---|---|---|---|---|---|---|")
    for label, row in results.items():
        row["rows_per_cpu_second"] = speeds[label]
        sd = f" ({row['bootstrap_sd']:.4f})" if "bootstrap_sd" in row else ""
        print(f"| {label} | {row['trees']} | {row['fresh_auprc']:.4f} | {row['fresh_auprc'] - full_auprc:+.4f}{sd} | "
              f"{row['hold']:.4f} | {row['test']:.4f} | {row['train_loss']:.5f} | {speeds[label]:,.0f} | "
              f"{speeds[label] / speeds['all']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))


def _only(doc, forest):
    empty = model_json.empty_like(doc)
    empty["learner"]["gradient_booster"]["model"]["trees"] = forest
    return empty


if __name__ == "__main__":
    main()
