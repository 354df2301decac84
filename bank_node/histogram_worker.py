"""The bank's side of histogram federation: one OS process that joins XGBoost's federated
communicator and grows the round's trees together with the other banks.

The bank's node (``BankNode.train_histogram``) writes the bank's binned training rows and a
job file into the bank's own work folder. It then starts this module as a process
(``python -m bank_node.histogram_worker JOB``), and the process reads only those files. What
leaves the bank while it trains is what XGBoost's row-split mode allreduces: per-node
gradient and hessian histograms, plus a few scalars. The histograms are summed at the
federated server. What leaves at the end is the update (the new trees, training statistics
scrubbed), as for every other strategy.

Cut points come from ``GlobalBins.reference_matrix`` (public: derived from the shared edges).
The process does not sketch its own rows, which XGBoost would share with every peer. A
watchdog ends the process when its deadline passes or its parent dies, so a lost peer or
server can never leave it hanging.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fedfraud.wire import WireMessage

EXIT_WATCHDOG = 3


@dataclass(frozen=True)
class HistogramSession(WireMessage):
    """How one bank joins one collective round: where the server is, its rank, the shared bins."""

    KIND: ClassVar[str] = "histogram session"

    bank: str
    round_id: int
    server_address: str
    world_size: int
    rank: int
    bins: dict[str, Any] = field(repr=False)
    tls: bool = False  # the server demands client certificates (the bank brings its own)
    timeout_s: float = 1800.0
    nthread: int = 1


def loopback(address: str) -> bool:
    return address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]")


def train_binned(dtrain, params: dict[str, Any], num_trees: int, base_model: dict | None, callbacks=()):
    """K trees on an already binned matrix, warm-started from ``base_model``.

    Same parameter handling as ``bank_node.training.train_trees``.
    """
    import xgboost as xgb

    from bank_node.training import BASE_PARAMS
    from fedfraud import model_json

    base = model_json.to_booster(base_model) if base_model else None
    params = {**BASE_PARAMS, **params}
    if base is not None:
        params.pop("base_score", None)  # the global model fixes it for every bank
    return xgb.train(params, dtrain, num_boost_round=num_trees, xgb_model=base, callbacks=list(callbacks))


def _watchdog(deadline: float, parent: int) -> None:
    while True:
        if time.monotonic() > deadline:
            print("histogram worker: deadline passed, exiting", file=sys.stderr, flush=True)
            os._exit(EXIT_WATCHDOG)
        if os.getppid() != parent:
            print("histogram worker: parent gone, exiting", file=sys.stderr, flush=True)
            os._exit(EXIT_WATCHDOG)
        time.sleep(0.5)


def run(job_path: Path) -> None:
    """Join the round's communicator, train, write the update; any failure exits at once."""
    import xgboost as xgb
    from xgboost import collective

    from aggregator.binning import GlobalBins, unbin_model
    from bank_node.training import build_update
    from fedfraud import model_json
    from fedfraud.wire import TrainTask

    job = json.loads(job_path.read_text())
    session = HistogramSession.from_bytes(json.dumps(job["session"]).encode())
    threading.Thread(target=_watchdog, args=(time.monotonic() + session.timeout_s, job["parent_pid"]),
                     daemon=True).start()
    task = TrainTask.from_bytes(Path(job["task"]).read_bytes())
    bins = GlobalBins.from_dict(session.bins)
    X = np.ascontiguousarray(np.load(job["x"]))
    y = np.load(job["y"])
    names = job["feature_names"]
    progress = Path(job["progress"])

    class Progress(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):
            progress.write_text(str(epoch + 1))
            return False

    args: dict[str, Any] = {"dmlc_communicator": "federated", "federated_server_address": session.server_address,
                            "federated_world_size": session.world_size, "federated_rank": session.rank,
                            **(job.get("tls") or {})}
    with collective.CommunicatorContext(**args):
        try:
            reference = xgb.DMatrix(bins.reference_matrix(), feature_names=names, missing=np.nan)
            dtrain = xgb.QuantileDMatrix(X, label=y, feature_names=names, missing=np.nan, max_bin=bins.max_bin,
                                         ref=reference, nthread=session.nthread)
            booster = train_binned(dtrain, {**task.params, "nthread": session.nthread}, task.num_trees,
                                   task.base_model, [Progress()])
            doc = unbin_model(model_json.to_doc(booster), bins)
            update = build_update(task, model_json.to_booster(doc), job["counts"], {})
            out = Path(job["out"])
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(update.to_bytes())
            tmp.replace(out)
        except BaseException:  # leave now: finalising the communicator could wait on dead peers
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bank_node.histogram_worker JOB.json", file=sys.stderr)
        raise SystemExit(2)
    try:
        run(Path(argv[0]))
    except BaseException:  # noqa: BLE001 - report, then leave without waiting on the communicator
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
