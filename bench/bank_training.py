"""A bank's local training on its prepared features: seconds, peak RSS and the models (one fresh process per run).

    .venv/bin/python bench/bank_training.py BANK_DIR                       # this checkout
    .venv/bin/python bench/bank_training.py BANK_DIR --repo /work/old      # another checkout (e.g. before)
    .venv/bin/python bench/bank_training.py BANK_DIR --matrix external     # always ExtMemQuantileDMatrix

``BANK_DIR`` is a prepared bank's work dir (``features/``, ``feature_contract.json``, the validation report),
e.g. the scale bench's ``work/bench/scale/bank-1000000``. What a bank runs in a round, through ``BankNode``:
load its matrices (``node.data``), ``fit_local`` (``--trees`` trees, the consortium's parameters), then
``train`` a round-2 task warm-started from that model (``share_metrics``: its holdout is scored too), then
``evaluate`` the result on the holdout. Prints one JSON line: seconds and peak RSS (``VmHWM``) after each
step, and the models' ids, which must agree between checkouts (``--repo``) when the models are the same.
No Spark runs in this process, so its baseline is lower than the scale bench's (~350 MiB there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path

def peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)

bank_dir, trees, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
from bank_node.node import BankNode
from fedfraud import model_json
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import ModelUpdate, TrainTask
from pipelines.config import load_config

settings = FederationSettings(trees_per_round=trees)
node = BankNode("alpine", bank_dir / "none", bank_dir, load_config(), settings.holdout_fraction,
                settings.alert_budget, share_metrics=True)
if hasattr(node, "external_memory_rows") and mode != "default":  # the node's own choice unless told
    node.external_memory_rows = 0 if mode == "external" else None
out, began = {"baseline_rss_mib": peak()}, time.perf_counter()
data = node.data
counts = data.counts()
out["load"] = {"seconds": round(time.perf_counter() - began, 1), "peak_rss_mib": peak()}
params = {**consortium_params(settings, counts["positives"], counts["negatives"]), "seed": 7}
began = time.perf_counter()
first = node.fit_local(params, trees)
out["fit_local"] = {"seconds": round(time.perf_counter() - began, 1), "peak_rss_mib": peak(),
                    "rows_per_s": round(counts["train_rows"] / (time.perf_counter() - began))}
doc = model_json.to_doc(first)
task = TrainTask(bank="alpine", round_id=2, base_model_id=model_json.model_id(doc), contract_hash=node.contract["hash"],
                 num_trees=trees, params={**params, "seed": 8}, base_model=doc)
began = time.perf_counter()
update = ModelUpdate.from_bytes(node.train(task.to_bytes()))
out["warm_train"] = {"seconds": round(time.perf_counter() - began, 1), "peak_rss_mib": peak()}
began = time.perf_counter()
report = json.loads(node.evaluate(model_json.to_bytes(model_json.append_trees(doc, update.model))))
out["evaluate"] = {"seconds": round(time.perf_counter() - began, 1), "peak_rss_mib": peak()}
out.update(train_rows=counts["train_rows"], holdout_rows=counts["holdout_rows"], first_model=model_json.model_id(doc),
           update_model=model_json.model_id(update.model), update_metrics=update.metrics,
           holdout_auprc=report["metrics"].get("auprc"))
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bank_dir", type=Path)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--trees", type=int, default=10)
    parser.add_argument("--matrix", choices=("default", "external", "memory"), default="default",
                        help="the node's choice (external_memory_rows), or always pages on disk, or always in memory")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.repo.resolve())}
    command = [sys.executable, "-c", CHILD, str(args.bank_dir.resolve()), str(args.trees), args.matrix]
    result = subprocess.run(command, cwd=args.repo, env=env, check=True, capture_output=True, text=True)
    line = json.loads(result.stdout.strip().splitlines()[-1])
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True, text=True)
    print(json.dumps({"repo": str(args.repo), "commit": rev.stdout.strip(), "matrix": args.matrix,
                      "load_average": os.getloadavg(), **line}))


if __name__ == "__main__":
    main()
