"""Scale bench, parts ``bank`` and ``scoring``: one large bank, and scoring with the champion.

``run_bank`` (one fresh process per size): one bank of ``rows`` rows (``pipelines.synthetic``,
profile ``alpine``) through what it runs before and during a round: ``BankNode.prepare`` (the
gate and the feature pipeline, i.e. ``fedfraud features``, in Spark) and then ``fit_local``
(``trees`` trees on its training rows, XGBoost in this Python process). It reports rows/s of each
step and the peak RSS of Spark's driver JVM (local mode: every Spark task runs in it) and of the
Python process, each step's peak read separately (the Python peak is reset between steps).

``run_scoring``: ``bank_node.scoring.score_transactions`` (what ``fedfraud score`` runs: gate,
features over the whole input, then the model) with a registered champion on one bank's input,
and the model alone on that bank's already built features (rows/s of ``Booster.predict``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from proc_memory import TreeSampler, own_mib
from scale_banks import log, write_parquet

BANK = "alpine"


def bank_input(work_dir: Path, rows: int, seed: int) -> Path:
    """``work_dir/input-<rows>/<bank>/transactions.parquet``, generated once, in a child process: the
    generator holds the whole table, and memory a process frees is not always given back, so generating
    here would count in the steps' peak RSS below."""
    path = work_dir / f"input-{rows}" / BANK / "transactions.parquet"
    if not path.exists():
        began = time.perf_counter()
        code = "import sys; from scale_bank import write_input; write_input(*sys.argv[1:])"
        subprocess.run([sys.executable, "-c", code, str(path.resolve()), str(rows), str(seed)], check=True,
                       cwd=Path(__file__).parent)
        log(f"{rows:,} rows generated in {time.perf_counter() - began:.0f}s")
    return path


def write_input(path: str, rows: str, seed: str) -> None:
    from pipelines.synthetic import bank_profiles, generate_bank

    write_parquet(generate_bank(bank_profiles(1, int(seed))[0], int(rows), int(seed)), Path(path))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def run_bank(work_dir: Path, rows: int, trees: int, seed: int) -> dict:
    """Gate + features, then training, of one bank of ``rows`` rows; rows/s and peak RSS per step."""
    import shutil

    from bank_node.node import BankNode
    from fedfraud.settings import FederationSettings, consortium_params
    from pipelines.config import load_config
    from pipelines.spark import get_spark

    path = bank_input(work_dir, rows, seed)
    out = work_dir / f"bank-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    settings = FederationSettings(trees_per_round=trees)
    node = BankNode(BANK, path, out, load_config(), settings.holdout_fraction, settings.alert_budget)
    spark = get_spark("fedfraud-scale-bank")  # JVM start-up is not timed
    spark.range(1).count()
    steps = {}
    _reset_peak()
    with TreeSampler() as prep:
        began = time.perf_counter()
        report = node.prepare(spark)
        seconds = time.perf_counter() - began
    steps["gate_features"] = {"seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
                              "python_peak_rss_mib": round(own_mib(), 1), **prep.as_dict()}
    spark.stop()
    _reset_peak()
    began = time.perf_counter()
    data = node.data
    read_seconds = time.perf_counter() - began
    counts = data.counts()
    params = consortium_params(settings, counts["positives"], counts["negatives"])
    began = time.perf_counter()
    node.fit_local(params, trees)
    seconds = time.perf_counter() - began
    steps["training"] = {"read_features_seconds": round(read_seconds, 2), "seconds": round(seconds, 2),
                         "train_rows": counts["train_rows"], "rows_per_s": round(counts["train_rows"] / seconds),
                         "python_peak_rss_mib": round(own_mib(), 1)}
    jvm = steps["gate_features"]["children_peak_hwm_mib_by_command"].get("java")
    return {"rows": rows, "trees": trees, "seed": seed, "valid_rows": report.get("valid_rows"),
            "steps": steps, "driver_jvm_peak_rss_mib": jvm,
            "python_peak_rss_mib": max(s["python_peak_rss_mib"] for s in steps.values())}


def champion_uri(tracking_uri: str, model_name: str) -> str:
    """``models:/NAME@champion`` if the federation promoted one, else its latest version (said so)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    aliases = client.get_registered_model(model_name).aliases
    if "champion" in aliases:
        return f"models:/{model_name}@champion"
    latest = max(int(v.version) for v in client.search_model_versions(f"name='{model_name}'"))
    log(f"{model_name} has no champion: scoring its latest version {latest}")
    return f"models:/{model_name}/{latest}"


def run_scoring(work_dir: Path, rows: int, tracking_uri: str, model_name: str, seed: int) -> dict:
    """``score_transactions`` end to end on ``rows`` rows of one bank, and the model alone on built features."""

    from bank_node.dataset import feature_rows
    from bank_node.policy import TrainingPolicy
    from bank_node.scoring import resolve_model, score_transactions
    from bank_node.training import dmatrix
    from fedfraud import model_json
    from fedfraud.model_guard import parse_received_model
    from pipelines.build import CONTRACT_FILE, FEATURES_DIR
    from pipelines.config import load_config
    from pipelines.feature_contract import load_contract
    from pipelines.spark import get_spark

    path = bank_input(work_dir, rows, seed)
    uri = champion_uri(tracking_uri, model_name)
    spark = get_spark("fedfraud-scale-score")
    spark.range(1).count()
    output = work_dir / f"scores-{rows}.parquet"
    _reset_peak()
    with TreeSampler() as sampler:
        began = time.perf_counter()
        counts = score_transactions(spark, uri, path, output, load_config(), tracking_uri)
        seconds = time.perf_counter() - began
    spark.stop()
    result = {"rows": rows, "model_uri": uri, "tracking_uri": tracking_uri, **counts,
              "end_to_end": {"seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
                             "python_peak_rss_mib": round(own_mib(), 1), **sampler.as_dict()}}
    built = work_dir / f"bank-{rows}"  # the bank part's features of the same input, if it ran
    if (built / FEATURES_DIR).exists():
        limits = TrainingPolicy().received_limits()
        names = load_contract(built / CONTRACT_FILE)["names"]
        booster = model_json.to_booster(parse_received_model(resolve_model(uri, tracking_uri, limits.max_bytes)[0],
                                                             limits, names))
        X = feature_rows(built / FEATURES_DIR, names)[1]
        began = time.perf_counter()
        booster.predict(dmatrix(X, None, names))
        seconds = time.perf_counter() - began
        result["model_only"] = {"rows": len(X), "trees": booster.num_boosted_rounds(), "seconds": round(seconds, 3),
                                "rows_per_s": round(len(X) / seconds)}
    return result
