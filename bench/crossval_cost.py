"""Bench: what masking the cross-evaluation costs, against its clear reports, on the same generated banks.

Prepares ``--banks`` generated banks once (Spark), then runs the whole cross-evaluation (``crossval.run``:
local models, then scoring) over real ``BankNode``s, masked and in the clear in turn, ``--repeats`` times
each, on fresh aggregator workspaces. Per run: wall seconds, seconds inside each bank call (local model,
key offer, scoring), the bytes every bank sent in its answers, and the exclusions (none expected).

    .venv/bin/python bench/crossval_cost.py --rows 160000 --banks 4 --work-dir work/bench/crossval
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path


class Timed:
    """A node whose calls are timed and whose answers are counted (bytes), per method."""

    def __init__(self, node, seconds: dict, sent: dict):
        self.node, self.bank, self.seconds, self.sent = node, node.bank, seconds, sent

    def __getattr__(self, name):
        attribute = getattr(self.node, name)
        if name not in ("local_model", "offer", "score"):
            return attribute

        def timed(data: bytes) -> bytes:
            start = time.perf_counter()
            try:
                body = attribute(data)
            finally:
                self.seconds[name] += time.perf_counter() - start
            self.sent[name] += len(body)
            return body
        return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=160_000)
    parser.add_argument("--banks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("work/bench/crossval"))
    args = parser.parse_args()

    from aggregator.drivers.embedded import prepare_consortium
    from aggregator.protocol import crossval, phases
    from aggregator.protocol.workspace import Workspace
    from fedfraud.settings import FederationSettings
    from pipelines.config import load_config
    from pipelines.synthetic import write_banks

    settings = FederationSettings(trees_per_round=15)
    paths = write_banks(args.work_dir / "raw", n_banks=args.banks, total_rows=args.rows, seed=5)
    consortium = prepare_consortium(paths, args.work_dir, load_config(), settings, on_progress=lambda m: None)
    print(json.dumps({"rows": args.rows, "banks": sorted(consortium.nodes), "load": os.getloadavg()}), flush=True)
    for repeat in range(args.repeats):
        for mode in ("clear", "masked"):
            seconds, sent = defaultdict(float), defaultdict(int)
            nodes = {b: Timed(n, seconds, sent) for b, n in consortium.nodes.items()}
            ws = Workspace(args.work_dir / "runs" / f"{mode}-{repeat}", "bench")
            for node in consortium.nodes.values():
                phases.summarize(ws, node.summary())
            mode_settings = FederationSettings(trees_per_round=15, crossval_masked=mode == "masked")
            plan = phases.plan_federation(ws, "bench", "bagging", 3, 3, mode_settings, consortium.contract,
                                          sorted(nodes))
            start = time.perf_counter()
            kept = crossval.run(ws, plan, nodes)
            print(json.dumps({"mode": mode, "repeat": repeat, "seconds": round(time.perf_counter() - start, 2),
                              "in_banks_s": {k: round(v, 2) for k, v in seconds.items()}, "sent_bytes": dict(sent),
                              "excluded": kept.excluded, "load": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
