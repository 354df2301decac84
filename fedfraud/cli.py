"""The one ``fedfraud`` command line that people, Airflow tasks and containers all call."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fraud detection for bank consortia.")
err = Console(stderr=True)
out = Console()

ConfigOption = typer.Option(None, "--config", help="Pipeline config YAML (default: the packaged consortium config).")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _run_gate(action):
    """Run a gate action, turning contract and input problems into a clear error and exit code."""
    from pipelines.config import ConfigError
    from pipelines.conform import ContractError
    from pipelines.io import InputError
    from pipelines.validation import GateError

    try:
        return action()
    except (ContractError, InputError, ConfigError) as exc:
        _fail(str(exc), code=2)
    except GateError as exc:
        _fail(f"validation gate inconsistency: {exc}", code=3)


@app.command()
def generate(
    out_dir: Path = typer.Option(..., "--out", help="Directory for one dataset per bank."),
    banks: int = typer.Option(5, "--banks", min=1, help="Number of synthetic banks."),
    rows: int = typer.Option(200_000, "--rows", min=100, help="Total rows over all banks."),
    seed: int = typer.Option(7, "--seed", help="Random seed; the same seed gives the same data."),
    days: int = typer.Option(60, "--days", min=1, help="Days of history per bank."),
    unlabelled_days: int = typer.Option(0, "--unlabelled-days", min=0, help="Last days left unlabelled."),
) -> None:
    """Write synthetic, non-IID banks in the raw-transaction contract (Parquet)."""
    from pipelines.synthetic import write_banks

    paths = write_banks(out_dir, n_banks=banks, total_rows=rows, seed=seed, days=days, unlabelled_days=unlabelled_days)
    for name, path in paths.items():
        out.print(f"{name}\t{path}")


@app.command()
def validate(
    input_path: Path = typer.Option(..., "--input", help="Parquet file or directory, or CSV with a header."),
    out_dir: Path = typer.Option(..., "--out", help="Writes valid/, quarantine/, report.json, gx/ here."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Run the bank's validation gate: valid rows pass, bad rows are quarantined with a reason."""
    from pipelines.config import load_config
    from pipelines.spark import get_spark
    from pipelines.validation import validate as run_validation

    report = _run_gate(lambda: run_validation(get_spark("fedfraud-validate"), input_path, out_dir, load_config(config)))
    _print_report(report)


@app.command()
def features(
    input_path: Path = typer.Option(..., "--input", help="Parquet file or directory, or CSV with a header."),
    out_dir: Path = typer.Option(..., "--out", help="Writes validation/, features/, feature_contract.json here."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Validate, then build point-in-time features and the feature contract."""
    from pipelines.build import build_bank_features
    from pipelines.config import load_config
    from pipelines.spark import get_spark

    report = _run_gate(lambda: build_bank_features(get_spark("fedfraud-features"), input_path, out_dir, load_config(config)))
    _print_report(report)
    out.print(f"features: {report['features_path']}  contract: {report['feature_contract_hash'][:12]}")


@app.command()
def demo(
    work_dir: Path = typer.Option(Path("work/demo"), "--work-dir", help="Where the demo writes everything."),
    banks: int = typer.Option(5, "--banks", min=1),
    rows: int = typer.Option(200_000, "--rows", min=1000),
    seed: int = typer.Option(7, "--seed"),
) -> None:
    """Generate synthetic banks and run each one's gate and feature pipeline; print a summary."""
    from rich.progress import Progress

    from pipelines.build import build_bank_features
    from pipelines.config import load_config
    from pipelines.spark import get_spark
    from pipelines.synthetic import write_banks

    config = load_config()
    out.print(f"[bold]fedfraud demo[/]: {banks} synthetic banks, {rows:,} transactions, seed {seed}")
    paths = write_banks(work_dir / "raw", n_banks=banks, total_rows=rows, seed=seed)
    spark = get_spark("fedfraud-demo")
    reports = {}
    with Progress(console=out, transient=True) as progress:
        task = progress.add_task("validate + features", total=len(paths))
        for name, path in paths.items():
            progress.update(task, description=f"{name}: validate + features")
            reports[name] = build_bank_features(spark, path, work_dir / "banks" / name, config)
            progress.advance(task)
    table = Table(title="Per-bank data path")
    for column in ("bank", "input", "valid", "quarantined", "labelled", "fraud rate", "may train", "contract"):
        table.add_column(column, justify="right" if column not in ("bank", "contract") else "left")
    for name, r in reports.items():
        rate = f"{r['fraud_rate']:.3%}" if r["fraud_rate"] is not None else "-"
        table.add_row(name, f"{r['input_rows']:,}", f"{r['valid_rows']:,}", f"{r['quarantined_rows']:,}",
                      f"{r['labelled_rows']:,}", rate, "yes" if r["training_allowed"] else "no",
                      r["feature_contract_hash"][:12])
    out.print(table)
    out.print(f"Outputs under {work_dir}/banks/<bank>/ (validation/report.json, features/, feature_contract.json).")


def _print_report(report: dict) -> None:
    keys = ("input_rows", "valid_rows", "quarantined_rows", "labelled_rows", "fraud_rate", "training_allowed")
    for key in keys:
        out.print(f"{key}: {report[key]}")
    reasons = {k: v for k, v in report["quarantine_reasons"].items() if v}
    if reasons:
        out.print("quarantined by reason: " + json.dumps(reasons))
    for reason in report["decline_reasons"]:
        out.print(f"[yellow]declines to train:[/] {reason}")
    out.print(f"data docs: {report['data_docs']}")


def main() -> None:  # pragma: no cover - console-script shim
    app(prog_name="fedfraud")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
