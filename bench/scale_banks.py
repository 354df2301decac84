"""Scale bench, part ``banks``: many simulated banks of equal size, one federation per case.

``generate`` writes ``n`` banks of ``rows`` rows each (``pipelines.synthetic``: the first ``n``
profiles of one seed, so the first 5 banks of 50 are the 5 banks of a 5-bank run; names are
distinct: ``alpine`` .. ``hudson``, then ``bank_09`` ..). ``prepare`` runs each bank's gate and
features once (Spark). ``run_case`` runs in a fresh process per (strategy, bank count): it loads
the first ``n`` prepared banks (no Spark), resets the process's peak RSS, runs the federation
through ``aggregator.drivers.embedded.federate`` and reports per-round wall time, memory and the
bytes each bank sent and received (``aggregator.protocol.traffic``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from proc_memory import TreeSampler, own_mib

MANIFEST = "manifest.json"


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_parquet(table: pa.Table, path: Path) -> None:
    from pipelines.io import write_bytes

    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_bytes(buffer.getvalue().to_pybytes(), path)


def generate(raw: Path, n_banks: int, rows: int, seed: int) -> dict[str, Path]:
    """``raw/<bank>/transactions.parquet`` for the first ``n_banks`` profiles, ``rows`` rows each (reused)."""
    from pipelines.synthetic import bank_profiles, generate_bank

    wanted = {"rows": rows, "seed": seed}
    paths = {}
    for profile in bank_profiles(n_banks, seed):
        path = raw / profile.name / "transactions.parquet"
        manifest = path.with_name(MANIFEST)
        if not (path.exists() and manifest.exists() and json.loads(manifest.read_text()) == wanted):
            write_parquet(generate_bank(profile, rows, seed), path)
            manifest.write_text(json.dumps(wanted))
        paths[profile.name] = path
    return paths


def nodes_for(work_dir: Path, paths: dict[str, Path]):
    """One ``BankNode`` per bank as ``prepare_consortium`` builds them (consortium certificate, shared metrics)."""
    from aggregator.drivers.embedded import embedded_credentials
    from bank_node.node import BankNode
    from fedfraud.settings import FederationSettings
    from pipelines.config import load_config

    settings, config = FederationSettings(), load_config()
    credentials = embedded_credentials(work_dir / "pki", list(paths))
    return {b: BankNode(b, p, work_dir / "banks" / b, config, settings.holdout_fraction, settings.alert_budget,
                        secagg=credentials[b], share_metrics=True) for b, p in paths.items()}, config


def prepare(work_dir: Path, n_banks: int, rows: int, seed: int) -> dict:
    """Generate and prepare (gate + features) every bank not yet current; one Spark session."""
    started = time.perf_counter()
    paths = generate(work_dir / "raw", n_banks, rows, seed)
    log(f"{n_banks} banks x {rows:,} rows generated in {time.perf_counter() - started:.0f}s")
    nodes, _ = nodes_for(work_dir, paths)
    todo = [n for n in nodes.values() if not n.is_prepared()]
    seconds = {}
    if todo:
        from pipelines.spark import get_spark

        spark = get_spark("fedfraud-scale-banks")
        for node in todo:
            began = time.perf_counter()
            node.prepare(spark)
            seconds[node.bank] = round(time.perf_counter() - began, 2)
            log(f"{node.bank}: gate + features {seconds[node.bank]:.1f}s")
        spark.stop()
    return {"banks": sorted(paths), "prepare_seconds": seconds}


def _timed(record: list, key: str, fn):
    """``fn`` that appends {key: seconds, "rss_after_mib": ...} to ``record`` on every call."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append({key: round(time.perf_counter() - began, 3), "rss_after_mib": round(own_mib("VmRSS"), 1)})
    return wrapper


BANK_CALLS = ("train", "score", "offer", "evaluate_masked", "evaluate", "local_model")  # what a driver asks a bank


def _time_banks(nodes: dict) -> dict[str, dict[str, float]]:
    """Wrap each node's answering methods to add up its seconds per method ({bank: {method: seconds}})."""
    spent: dict[str, dict[str, float]] = {b: {} for b in nodes}
    inside = threading.local()  # a call made inside another (evaluate_masked -> evaluate) counts once
    for bank, node in nodes.items():
        for name in BANK_CALLS:
            def timed(*args, _fn=getattr(node, name), _bank=bank, _name=name, **kwargs):
                if getattr(inside, "call", False):
                    return _fn(*args, **kwargs)
                inside.call, began = True, time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    inside.call = False
                    spent[_bank][_name] = spent[_bank].get(_name, 0.0) + time.perf_counter() - began
            setattr(node, name, timed)
    return spent


def _bank_time(spent: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> dict:
    """Bank seconds of one round: their sum (what this one process spent on banks, one after another) and,
    per method, the busiest bank's; their sum estimates the banks' part when each bank has its own machine."""
    delta = {b: {m: s - before.get(b, {}).get(m, 0.0) for m, s in calls.items()} for b, calls in spent.items()}
    methods = sorted({m for calls in delta.values() for m in calls})
    busiest = {m: max(calls.get(m, 0.0) for calls in delta.values()) for m in methods}
    return {"banks_seconds_sum": round(sum(sum(c.values()) for c in delta.values()), 2),
            "busiest_bank_seconds_by_call": {m: round(s, 2) for m, s in busiest.items()},
            "busiest_bank_seconds": round(sum(busiest.values()), 2)}


def run_case(work_dir: Path, strategy: str, n_banks: int, rows: int, rounds: int, trees: int, seed: int,
             options: dict | None = None, case_name: str | None = None) -> dict:
    """One federation of ``strategy`` over the first ``n_banks`` prepared banks, in this (fresh) process.

    The round driver's phases are wrapped only to read the clock and RSS around them (behaviour unchanged)."""
    from aggregator.drivers.embedded import Consortium, federate
    from aggregator.protocol import crossval, phases, traffic
    from aggregator.tracking import default_tracking_uri
    from fedfraud import model_json
    from fedfraud.settings import FederationSettings

    paths = generate(work_dir / "raw", n_banks, rows, seed)
    nodes, config = nodes_for(work_dir, paths)
    missing = [b for b, n in nodes.items() if not n.is_prepared()]
    if missing:
        raise SystemExit(f"banks not prepared: {missing}; run --parts banks without --case first")
    train_rows = sum(n.data.counts()["train_rows"] for n in nodes.values())  # every bank's matrices loaded now
    loaded_mib = own_mib("VmRSS")
    case_dir = work_dir / "cases" / (case_name or f"{strategy}-{n_banks}")
    shutil.rmtree(case_dir, ignore_errors=True)  # a fresh workspace and MLflow store per case
    consortium = Consortium(nodes, config, case_dir)
    settings = FederationSettings(trees_per_round=trees, **(options or {}))
    model_name = f"scale-{strategy}-{n_banks}"
    rounds_log: list[dict] = []
    stages_log: list[dict] = []
    crossval_log: list[dict] = []
    spent = _time_banks(nodes)
    run_round = _timed(rounds_log, "seconds", phases.run_round)

    def round_with_bank_time(*args, **kwargs):
        before = {b: dict(calls) for b, calls in spent.items()}
        try:
            return run_round(*args, **kwargs)
        finally:
            bank_time = _bank_time(spent, before)
            rounds_log[-1].update(bank_time, aggregator_seconds=round(rounds_log[-1]["seconds"]
                                                                        - bank_time["banks_seconds_sum"], 2))
    phases.run_round = round_with_bank_time
    phases.run_stages = _timed(stages_log, "training_seconds", phases.run_stages)
    crossval.run = _timed(crossval_log, "seconds", crossval.run)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak below is the federation's
    started = time.perf_counter()
    with TreeSampler() as sampler:
        result = federate(consortium, strategy, rounds, model_name, default_tracking_uri(case_dir), settings, seed,
                          log)[""]
    total = time.perf_counter() - started
    peak_mib = own_mib("VmHWM")
    wire = traffic.over_rounds(case_dir / "federations" / model_name, rounds)
    final = case_dir / "federations" / model_name / f"round-{rounds}" / "model.json"  # the last round's model
    per_round = [{**r, **s} for r, s in zip(rounds_log, stages_log[-len(rounds_log):])]
    return {
        "strategy": strategy, "banks": n_banks, "rows_per_bank": rows, "rounds": rounds, "trees_per_round": trees,
        "options": dict(options or {}),
        "seed": seed, "train_rows": train_rows,
        "federation_seconds": round(total, 2), "crossval_seconds": crossval_log[0]["seconds"] if crossval_log else None,
        "rounds_detail": per_round,
        "round_seconds_mean": round(sum(r["seconds"] for r in per_round) / len(per_round), 2),
        "memory": {"rss_banks_loaded_mib": round(loaded_mib, 1), "process_peak_rss_mib": round(peak_mib, 1),
                   "federation_increment_mib": round(peak_mib - loaded_mib, 1), **sampler.as_dict()},
        "wire_bytes": wire, "excluded": dict(result.excluded),
        "rejections": len(result.rejections), "pooled_auprc": result.evaluation.pooled.get("auprc"),
        "model_uri": result.model_uri,
        "model_id": model_json.model_id(json.loads(final.read_bytes())) if final.exists() else None,
        "tracking_uri": default_tracking_uri(case_dir),
        "load_average_after": os.getloadavg(),
    }
