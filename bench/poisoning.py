"""Bench: one bank attacks a bagging federation, undefended and defended.

Every attack of issue 11's table is played by one bank (``--attacker``) through the real code
paths of an embedded federation (real XGBoost, real MLflow): a ``BankNode`` subclass that lies in
what it sends. *Undefended* is the code at ``--undefended-commit`` (before issue 11, extracted
with ``git archive``); *defended* is the working tree with its default settings. Each attack runs
in a child process, so a crash or a hang is recorded, not suffered; the pooled AUPRC is the last
registered model scored by the bench itself on every bank's true holdout.

    .venv/bin/python bench/poisoning.py --rows 150000 --rounds 3 --work-dir work/bench/poison
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = {
    "clean": "no attack",
    "absent": "nothing: it sits the federation out (the honest banks' own federation, a reference)",
    "flipped": "trees trained on flipped labels",
    "flipped_leaves_x100": "flipped labels and leaves x 100",
    "flipped_rows_x1e6": "flipped labels and train_rows claimed x 10^6",
    "forged_evaluation": "flipped labels, leaves x 100, and forged (perfect) evaluation reports",
    "negative_positives": "negative positives in its summary",
    "own_header": "round 1: its own header (base_score 0.999, objective binary:logitraw)",
    "oversized": "an update padded to ~26 MiB",
    "split_index": "one split_indices value of 10^6",
    "cyclic_tree": "a tree whose child indices form a cycle",
    "leaf_1e39": "a leaf of 1e39",
}
MODES = ("undefended", "defended", "acceptance_only", "defended_clear", "acceptance_clear")
# defended: default settings, except the gate's δ if --acceptance-delta says so; acceptance_only: the gate
# alone, no cross-evaluation; *_clear: the same with acceptance in the clear (judged at the other banks)
# instead of masked (judged on the pool of every bank), and the cross-evaluation's reports in the clear.
MODE_SETTINGS = {"defended": {}, "acceptance_only": {"crossval": False},
                 "defended_clear": {"acceptance_masked": False, "crossval_masked": False},
                 "acceptance_clear": {"crossval": False, "acceptance_masked": False}}


def acceptance_delta(text: str) -> float | str | None:
    """--acceptance-delta: "auto" (the default setting), "none" (measure only) or a fixed drop."""
    lowered = text.strip().lower()
    return "auto" if lowered == "auto" else None if lowered == "none" else float(text)


def mode_settings(args, mode: str) -> dict:
    settings = dict(MODE_SETTINGS.get(mode, {}))
    if mode != "undefended":
        settings["acceptance_delta"] = acceptance_delta(args.acceptance_delta)
    return settings


# ---- the attacker: a bank node that lies in what it sends -----------------------------------------


def hostile_node_class():
    from bank_node.node import BankNode
    from fedfraud import model_json
    from bank_node.masked_counts import masked_counts
    from fedfraud.wire import CLEAR_COUNTS, EvaluationReport, ModelUpdate, TrainTask

    class Hostile(BankNode):
        attack = "clean"

        @cached_property
        def honest(self):
            return BankNode.data.func(self)

        @cached_property
        def data(self):
            if self.attack.startswith("flipped") or self.attack == "forged_evaluation":
                return dataclasses.replace(self.honest, y_train=1 - self.honest.y_train)
            return self.honest

        def summary(self):
            honest = self.honest.counts()
            summary = {**super().summary(), "counts": {k: honest[k] for k in CLEAR_COUNTS}}  # honest counts, except:
            if self.attack == "negative_positives":
                summary["counts"] = {**summary["counts"], "positives": -10 ** 6}  # in the clear: refused by name
            elif self.attack == "absent":
                summary.update(training_allowed=False, decline_reasons=["the bench: sits this federation out"])
            return summary

        def masked_counts(self, task_bytes: bytes) -> bytes:
            return masked_counts(self, task_bytes, self.honest.counts())  # honest label counts, masked

        def train(self, task_bytes: bytes) -> bytes:
            update = ModelUpdate.from_bytes(super().train(task_bytes))
            task = TrainTask.from_bytes(task_bytes)
            honest = self.honest.counts()
            doc, counts = update.model, {**update.counts, **{k: honest[k] for k in CLEAR_COUNTS}}  # its true rows
            trees = model_json.trees(doc)
            if self.attack in ("flipped_leaves_x100", "forged_evaluation"):
                doc = model_json.scale_leaves(doc, 100.0)
            elif self.attack == "flipped_rows_x1e6":
                counts["train_rows"] *= 10 ** 6
            elif self.attack == "own_header" and task.round_id <= 1:
                param = doc["learner"]["learner_model_param"]
                param["base_score"] = "9.99E-1"
                doc["learner"]["objective"] = {"name": "binary:logitraw", "reg_loss_param": {"scale_pos_weight": "1"}}
            elif self.attack == "oversized":
                copies = 26 * 1024 * 1024 // len(model_json.to_bytes(doc)) + 1
                block = {"learner": {"gradient_booster": {"model": {"trees": trees}}}}
                doc = model_json.append_trees(doc, *[block] * copies)
            elif self.attack == "split_index":
                inner = next(n for n, left in enumerate(trees[0]["left_children"]) if left != -1)
                trees[0]["split_indices"][inner] = 10 ** 6
            elif self.attack == "cyclic_tree":
                tree = trees[0]
                leaf = next(n for n, left in enumerate(tree["left_children"]) if left == -1 and n > 0)
                tree["left_children"][leaf], tree["right_children"][leaf] = 0, 0  # back to the root
            elif self.attack == "leaf_1e39":
                tree = trees[0]
                leaf = next(n for n, left in enumerate(tree["left_children"]) if left == -1)
                tree["split_conditions"][leaf] = 1e39
                tree["base_weights"][leaf] = 1e39
            return dataclasses.replace(update, model=doc, counts=counts).to_bytes()

        def evaluate(self, model_bytes: bytes) -> bytes:
            report = EvaluationReport.from_bytes(super().evaluate(model_bytes))
            if self.attack != "forged_evaluation":
                return report.to_bytes()
            pos, neg = [0] * len(report.hist_pos), [0] * len(report.hist_neg)
            pos[-1], neg[0] = report.positives, report.negatives
            perfect = {k: 1.0 for k in report.metrics}
            return dataclasses.replace(report, metrics=perfect, hist_pos=pos, hist_neg=neg).to_bytes()

    return Hostile


# ---- one child process: attacks in turn, one JSON line each -----------------------------------------


def nodes_for(args, attack: str):
    from bank_node.node import BankNode
    from fedfraud.settings import FederationSettings
    from pipelines.config import load_config

    settings, config = FederationSettings(), load_config()
    hostile = hostile_node_class()
    nodes = {}
    for raw in sorted((args.work_dir / "raw").glob("*/transactions.parquet")):
        bank = raw.parent.name
        cls = hostile if bank == args.attacker else BankNode
        nodes[bank] = cls(bank, raw, args.work_dir / "banks" / bank, config, settings.holdout_fraction,
                          settings.alert_budget)
        if cls is hostile:
            nodes[bank].attack = attack
    return nodes


def true_pooled_auprc(doc: dict, honest: dict) -> float:
    import numpy as np

    from bank_node.training import dmatrix
    from fedfraud import model_json
    from fedfraud.scores import BINS, average_precision, score_histograms

    booster = model_json.to_booster(doc)
    pos, neg = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    for node in honest.values():
        data = node.data
        p, n = score_histograms(booster.predict(dmatrix(data.X_holdout, None, data.feature_names)), data.y_holdout)
        pos, neg = pos + p, neg + n
    return average_precision(pos, neg)


def run_attack(args, mode: str, attack: str) -> dict:
    from mlflow import MlflowClient

    from aggregator.drivers.embedded import run_federation
    from aggregator.tracking import FederationTracker
    from fedfraud.settings import FederationSettings
    from pipelines.build import CONTRACT_FILE
    from pipelines.feature_contract import load_contract

    name = f"poison-{mode}-{attack}"
    work = args.work_dir / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    uri = f"sqlite:///{(args.work_dir / f'mlflow-{mode}.db').resolve()}"
    tracker = FederationTracker(uri, name)
    nodes, honest = nodes_for(args, attack), nodes_for(args, "clean")
    started, row = time.perf_counter(), {"attack": attack, "mode": mode}
    try:
        contract = load_contract(next(iter(honest.values())).work_dir / CONTRACT_FILE)  # as the banks built it
        result = run_federation(nodes, "bagging", args.rounds, tracker, contract,
                                FederationSettings(trees_per_round=args.trees, **mode_settings(args, mode)),
                                args.seed, work_dir=work)
        doc = json.loads((work / "federations" / name / f"round-{args.rounds}" / "model.json").read_bytes())
        row["gate"] = gate_figures(work / "federations" / name, args.rounds)
        row.update(outcome="registered", version=result.version, reported_auprc=result.evaluation.pooled["auprc"],
                   pooled_auprc=true_pooled_auprc(doc, honest),
                   rejections=sorted({f"{x['bank']}:{x['check']}" for x in result.rejections}),
                   excluded={b: r.split(":")[0] for b, r in result.excluded.items()})
        client = MlflowClient(uri, registry_uri=uri)
        tags = client.get_model_version(name, str(result.version)).tags
        champion = [a for a in client.get_registered_model(name).aliases if a == "champion"]
        row.update(champion=bool(champion), promotion_reason=tags.get("fedfraud.promotion_reason"),
                   named_in_mlflow=args.attacker in (tags.get("fedfraud.rejected_banks", "") + ","
                                                     + _parent_tag(client, result.federation_id)))
    except Exception as exc:  # the federation refused to go on: a verdict, by name
        row.update(outcome=f"failed: {exc.__class__.__name__}: {str(exc)[:160]}")
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def gate_figures(folder: Path, rounds: int) -> dict:
    """Per round and bank: the drop of the others' pooled AUPRC its update caused, and the allowed drop
    (first pass; ``2nd`` the second pass's, after a refusal), from the rounds' acceptance records."""
    out = {}
    for round_id in range(1, rounds + 1):
        path = folder / f"round-{round_id}" / "acceptance.json"
        for stage in json.loads(path.read_bytes())["stages"] if path.exists() else []:
            for bank, row in stage["banks"].items():
                figures = {"drop": _drop(row), "allowed": row.get("allowed_drop")}
                if "second_pass" in row:
                    second = row["second_pass"]
                    figures["2nd"] = {"drop": _drop(second), "allowed": second.get("allowed_drop")}
                out.setdefault(str(round_id), {})[bank] = figures
    return out


def _drop(row: dict) -> float | None:
    if "others_with" not in row:
        return None
    return round(row["others_without"] - row["others_with"], 4)


def _parent_tag(client, federation_id: str) -> str:
    runs = client.search_runs(client.get_experiment_by_name("fedfraud").experiment_id,
                              f"tags.`fedfraud.federation_id` = '{federation_id}'")
    return ",".join(r.data.tags.get("fedfraud.excluded_banks", "") for r in runs)


def child(args) -> None:
    for attack in args.attacks.split(","):
        with open(args.out, "a") as out:
            out.write(json.dumps({"start": attack}) + "\n")
        row = run_attack(args, args.child, attack)
        with open(args.out, "a") as out:
            out.write(json.dumps(row) + "\n")


# ---- the parent: prepare once, run each mode's attacks in children, print the table ----------------


def source_for(mode: str, args) -> Path:
    if mode != "undefended":
        return ROOT
    src = args.work_dir / f"src-{args.undefended_commit[:10]}"
    if not src.exists():
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.undefended_commit], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src


def newest_write(runs: Path, prefix: str, out: Path) -> float:
    """The latest modification time among the mode's run folders and its rows file."""
    times = [out.stat().st_mtime] if out.exists() else [0.0]
    try:
        for folder in runs.glob(f"{prefix}*") if runs.exists() else []:
            times += [p.stat().st_mtime for p in folder.rglob("*")]
    except FileNotFoundError:  # a run's folder changing while we look: that is progress
        return time.time()
    return max(times)


def run_mode(args, mode: str, attacks: list[str]) -> list[dict]:
    """Children until every attack has a row; a child that dies or stalls is recorded for its attack."""
    out = args.work_dir / f"rows-{mode}.jsonl"  # appended to: the latest row of an attack is its result
    env = {**os.environ, "PYTHONPATH": str(source_for(mode, args)), "FEDFRAUD_SHUFFLE_PARTITIONS": "2"}
    rows: list[dict] = []
    seen_lines = len(out.read_text().splitlines()) if out.exists() else 0
    while attacks:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--attacks", ",".join(attacks),
               "--out", str(out), "--work-dir", str(args.work_dir), "--rounds", str(args.rounds),
               "--trees", str(str(args.trees)), "--seed", str(args.seed), "--attacker", args.attacker,
               "--acceptance-delta", args.acceptance_delta]
        proc = subprocess.Popen(cmd, env=env, cwd=args.work_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        last, seen = time.monotonic(), 0.0
        while proc.poll() is None:
            time.sleep(2)
            progress = newest_write(args.work_dir / "runs", f"poison-{mode}-", out)
            if progress != seen:  # any file of this mode's runs written: the federation moves
                last, seen = time.monotonic(), progress
            elif time.monotonic() - last > args.stall_seconds:
                proc.kill()
                proc.wait()
                break
        lines = [json.loads(line) for line in out.read_text().splitlines()[seen_lines:]] if out.exists() else []
        done = [x for x in lines if "attack" in x]
        rows += [x for x in done if x["attack"] in attacks]
        attacks = [a for a in attacks if a not in {x["attack"] for x in done}]
        started = [x["start"] for x in lines if "start" in x and x["start"] in attacks]
        if attacks and started:
            code = proc.returncode
            stderr = proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:] if proc.stderr else []
            what = (f"hung: no progress for {args.stall_seconds}s, killed" if code == -9
                    else f"crashed: exit {code} {' '.join(stderr)[:160]}")
            rows.append({"attack": started[-1], "mode": mode, "outcome": what})
            with open(out, "a") as record:
                record.write(json.dumps(rows[-1]) + "\n")
            attacks.remove(started[-1])
        elif attacks:
            raise RuntimeError(f"{mode} child ended before starting {attacks}: {proc.stderr.read().decode()[-2000:]}")
        proc.stderr.close()
    return rows


def prepare(args) -> None:
    from aggregator.drivers.embedded import prepare_consortium
    from fedfraud.settings import FederationSettings
    from pipelines.config import load_config
    from pipelines.synthetic import write_banks

    marker, params = args.work_dir / "raw" / "params.json", {"banks": args.banks, "rows": args.rows, "seed": args.seed}
    if marker.exists() and json.loads(marker.read_text()) == params:  # reuse: same files, features stay current
        paths = {p.parent.name: p for p in sorted((args.work_dir / "raw").glob("*/transactions.parquet"))}
    else:
        paths = write_banks(args.work_dir / "raw", n_banks=args.banks, total_rows=args.rows, seed=args.seed)
        marker.write_text(json.dumps(params))
    prepare_consortium(paths, args.work_dir, load_config(), FederationSettings(),
                       lambda m: print(f"  {m}", file=sys.stderr))


def cell(row: dict | None) -> str:
    if row is None:
        return "–"
    if row["outcome"] != "registered":
        return row["outcome"].split(":")[0]
    return f"{row['pooled_auprc']:.3f}"


def named(row: dict | None, attacker: str) -> str:
    if row is None or row["outcome"] != "registered":
        return row["outcome"][:90] if row else "–"
    names = [f"excluded {r}" for b, r in row["excluded"].items() if b == attacker]
    names += [x.split(":", 1)[1] for x in row["rejections"] if x.startswith(attacker + ":")]
    honest = sorted(x.split(":")[0] for x in row["rejections"]
                    if x.endswith(":acceptance_degrades") and not x.startswith(attacker + ":"))
    return (", ".join(sorted(set(names))) or "not named") + (f"; gate refused {', '.join(honest)}" if honest else "")


def recorded(args, mode: str) -> dict[str, dict]:
    """The latest row of each attack in ``mode``'s rows file (runs with other settings start a new work dir)."""
    path = args.work_dir / f"rows-{mode}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["attack"]: r for r in rows if "attack" in r}


def setup(args) -> dict:
    """What makes two runs' rows comparable (one table may gather modes run separately)."""
    return {k: getattr(args, k) for k in ("rows", "banks", "rounds", "trees", "seed", "attacker",
                                          "undefended_commit", "acceptance_delta")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=150_000)
    parser.add_argument("--banks", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trees", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--attacker", default="baltic")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--modes", default="undefended,defended")
    parser.add_argument("--undefended-commit", default="18f26c1")
    parser.add_argument("--acceptance-delta", default="auto",
                        help='the gate\'s allowed drop in defended modes: "auto" (the default), "none" or a number')
    parser.add_argument("--stall-seconds", type=int, default=240)  # no file written for this long: hung
    parser.add_argument("--work-dir", type=Path, default=Path("work/bench/poison"))
    parser.add_argument("--child", choices=MODES)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.work_dir = args.work_dir.resolve()
    if args.child:
        return child(args)
    sys.path.insert(0, str(ROOT))
    prepare(args)
    attacks = args.attacks.split(",")
    modes = args.modes.split(",")
    for mode in modes:
        source_for(mode, args)
    with ThreadPoolExecutor(len(modes)) as pool:  # one child per mode at a time, side by side
        list(pool.map(lambda mode: run_mode(args, mode, list(attacks)), modes))
    out = args.work_dir / "results.json"
    results = {mode: recorded(args, mode) for mode in MODES}  # every row recorded with these settings
    clean = results.get("defended", {}).get("clean", {}).get("pooled_auprc")
    absent = results.get("defended", {}).get("absent", {}).get("pooled_auprc")
    if clean and absent:
        print(f"\nWithout the attacker at all (its honest data lost too): {absent:.3f}, {absent - clean:+.3f} vs clean")
    print(f"\nPooled AUPRC on every bank's true holdout ({args.banks} banks, {args.rows:,} rows, bagging, "
          f"{args.rounds} rounds x {args.trees} trees, seed {args.seed}; attacker {args.attacker})")
    print("| attack | undefended | defended | defended − clean | named (defended) | champion (defended) "
          "| acceptance only | named (acceptance only) |")
    print("|---|---|---|---|---|---|---|---|")
    for attack in ATTACKS:
        if not any(attack in results.get(m, {}) for m in MODES):
            continue
        u, d = results.get("undefended", {}).get(attack), results.get("defended", {}).get(attack)
        gap = f"{d['pooled_auprc'] - clean:+.3f}" if d and d["outcome"] == "registered" and clean else "–"
        champ = (f"{d['champion']} ({d['promotion_reason']})" if d and d["outcome"] == "registered" else "–")
        a = results.get("acceptance_only", {}).get(attack)
        print(f"| {ATTACKS[attack]} | {cell(u)} | {cell(d)} | {gap} | {named(d, args.attacker)} | {champ} "
              f"| {cell(a)} | {named(a, args.attacker) if a else '–'} |")
    for masked, clear in (("defended", "defended_clear"), ("acceptance_only", "acceptance_clear")):
        if results.get(clear):  # masked acceptance (pooled at every bank) against the clear one (at the others)
            print(f"\n| attack | {masked} (masked acceptance) | named | {clear} | named |\n|---|---|---|---|---|")
            for attack in (a for a in ATTACKS if a in results[clear]):
                m, c = results.get(masked, {}).get(attack), results[clear][attack]
                print(f"| {ATTACKS[attack]} | {cell(m)} | {named(m, args.attacker) if m else '–'} | {cell(c)} "
                      f"| {named(c, args.attacker)} |")
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                               "setup": setup(args), "cpu_count": os.cpu_count(), "results": results},
                              indent=2, default=str))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
