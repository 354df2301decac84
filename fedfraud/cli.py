"""The one ``fedfraud`` command line that people, Airflow tasks and containers all call."""

from __future__ import annotations

import math
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fraud detection for bank consortia.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)  # long paths and commands stay on one line (copy-paste, parsing)

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
        typer.echo(f"{name}\t{path}")  # one machine-readable line per bank, never wrapped


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
    out_dir: Path = typer.Option(..., "--out", help="Writes validation/, features/, feature_contract.json."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Validate and build point-in-time features in one job (features/ holds the valid rows too); the contract."""
    from pipelines.build import build_bank_features
    from pipelines.config import load_config
    from pipelines.spark import get_spark

    report = _run_gate(
        lambda: build_bank_features(get_spark("fedfraud-features"), input_path, out_dir, load_config(config))
    )
    _print_report(report)
    out.print(f"features: {report['features_path']}  contract: {report['feature_contract_hash'][:12]}")


def _parse_banks(specs: list[str]) -> dict[str, Path]:
    banks: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            _fail(f"--bank takes NAME=PATH, got {spec!r}")
        if name in banks:
            _fail(f"bank {name} is given twice")
        if not Path(path).exists():
            _fail(f"bank {name}: input not found: {path}")
        banks[name] = Path(path)
    return banks


@app.command()
def federate(
    bank: list[str] = typer.Option(..., "--bank", help="NAME=PATH of a bank's raw data (repeat per bank)."),
    rounds: int = typer.Option(5, "--rounds", min=1),
    strategy: str = typer.Option(
        "bagging", "--strategy", help="bagging, cyclic, histogram, local or centralized (benchmark only)."
    ),
    model_name: str = typer.Option(..., "--model-name", help="Registered model name in MLflow."),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI, else sqlite in the work dir."
    ),
    work_dir: Path = typer.Option(Path("work/federation"), "--work-dir"),
    seed: int = typer.Option(0, "--seed"),
    trees_per_round: int = typer.Option(20, "--trees-per-round", min=1),
    min_banks: int = typer.Option(1, "--min-banks", min=1, help="Quorum: accepted updates a round needs."),
    compaction: bool = typer.Option(False, "--compaction/--no-compaction",
                                    help="Bagging: drop the trees the banks' holdouts do not miss, every round."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Train a model across banks; the last stdout line is the registered model URI."""
    from aggregator.protocol.errors import RoundFailed
    from aggregator.drivers.embedded import STRATEGY_CHOICES, federate as run, prepare_consortium
    from fedfraud.settings import FederationSettings
    from pipelines.config import load_config

    if strategy not in STRATEGY_CHOICES:
        _fail(f"--strategy must be one of {', '.join(STRATEGY_CHOICES)}, got {strategy!r}")
    settings = FederationSettings(trees_per_round=trees_per_round, min_banks=min_banks, compaction=compaction)
    progress = lambda message: err.print(f"[dim]{message}[/]")  # noqa: E731 - stdout is for results
    consortium = _run_gate(
        lambda: prepare_consortium(_parse_banks(bank), work_dir, load_config(config), settings, progress)
    )
    try:
        results = run(consortium, strategy, rounds, model_name, tracking_uri, settings, seed, progress)
    except RoundFailed as exc:
        _fail(f"federation failed, nothing registered for the failed round: {exc}", code=4)
    for name, result in results.items():
        pooled = result.evaluation.pooled["auprc"]
        err.print(f"{name or 'pooled'}: AUPRC {pooled:.4f}")
        print(f"{name} {result.model_uri}" if name else result.model_uri)


@app.command()
def score(
    model: str = typer.Option(..., "--model", help="models:/NAME/VERSION or models:/NAME@champion"),
    input_path: Path = typer.Option(..., "--input"),
    output: Path = typer.Option(..., "--output", help="Parquet file with transaction_id, score."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Score every input row with a registered model (quarantined rows get a null score)."""
    from bank_node.scoring import score_transactions
    from pipelines.config import load_config
    from pipelines.spark import get_spark

    counts = _run_gate(
        lambda: score_transactions(
            get_spark("fedfraud-score"), model, input_path, output, load_config(config), tracking_uri
        )
    )
    out.print(f"scored {counts['scored']:,} rows, {counts['quarantined']:,} quarantined (null score) -> {output}")


@app.command()
def demo(
    work_dir: Path = typer.Option(Path("work/demo"), "--work-dir", help="Where the demo writes everything."),
    banks: int = typer.Option(5, "--banks", min=2),
    rows: int = typer.Option(300_000, "--rows", min=5000),
    rounds: int = typer.Option(5, "--rounds", min=1),
    seed: int = typer.Option(7, "--seed"),
) -> None:
    """Synthetic banks -> gate + features -> local-only vs federated (bagging, histogram) -> MLflow."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from aggregator.drivers.embedded import federate as run, prepare_consortium
    from fedfraud.settings import FederationSettings
    from aggregator.tracking import default_tracking_uri
    from pipelines.config import load_config
    from pipelines.synthetic import write_banks

    settings, model_name = FederationSettings(), "fedfraud-demo"
    uri = default_tracking_uri(work_dir)
    out.print(f"[bold]fedfraud demo[/]: {banks} synthetic banks, {rows:,} transactions, seed {seed}")
    paths = write_banks(work_dir / "raw", n_banks=banks, total_rows=rows, seed=seed)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=out, transient=True) as bar:
        task = bar.add_task("starting Spark")
        step = lambda message: bar.update(task, description=message)  # noqa: E731
        consortium = prepare_consortium(paths, work_dir, load_config(), settings, step)
        local = run(consortium, "local", rounds, model_name, uri, settings, seed, step)
        federated = {
            name: run(consortium, name, rounds, model_name, uri, settings, seed, step)[""]
            for name in ("bagging", "histogram")
        }
    _print_bank_table(consortium, local, federated)
    last = federated["histogram"]
    out.print(
        f"Registered: [bold]{last.model_uri}[/] (round {rounds} of the histogram federation); every round's "
        f"model is a version of {model_name}, and [bold]models:/{model_name}@champion[/] is the best so far."
    )
    out.print(
        f"Open it: [bold]{Path(sys.executable).parent}/mlflow ui --backend-store-uri {uri}[/] "
        "then http://127.0.0.1:5000"
    )


# ---- networked deployment: the consortium's PKI, the aggregator service, the bank's agent -----

node_app = typer.Typer(no_args_is_help=True, help="The bank's node agent: runs at the bank, connects out only.")
aggregator_app = typer.Typer(no_args_is_help=True, help="The consortium's aggregator service (HTTPS, mutual TLS).")
app.add_typer(node_app, name="node")
app.add_typer(aggregator_app, name="aggregator")
ServiceConfig = typer.Option(..., "--config", exists=True, dir_okay=False, help="The service's YAML config file.")


def _log_to_stderr() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def provision(
    consortium: str = typer.Option(..., "--consortium", help="The consortium's name (the CA's organisation)."),
    participants: str = typer.Option(..., "--participants", help="Comma-separated: aggregator,bankA,bankB,..."),
    operators: str = typer.Option("airflow", "--operators", help="Comma-separated operator identities (Airflow)."),
    hosts: str = typer.Option("aggregator,localhost,127.0.0.1", "--hosts",
                              help="Names and IPs the aggregator's certificate is valid for."),
    days: int = typer.Option(365, "--days", min=1, help="Validity of every participant's certificate."),
    out_dir: Path = typer.Option(..., "--out", help="One folder per participant is written here."),
    force: bool = typer.Option(False, "--force", help="Replace an existing consortium in --out."),
) -> None:
    """Create the consortium CA and a certificate + key per participant, one folder each."""
    from fedfraud.pki import ProvisionError, provision as run

    split = lambda text: [name.strip() for name in text.split(",") if name.strip()]  # noqa: E731
    try:
        written = run(consortium, split(participants), out_dir, days=days, operators=split(operators),
                      hosts=split(hosts), force=force)
    except ProvisionError as exc:
        _fail(str(exc))
    for name, folder in written.items():
        typer.echo(f"{name}\t{folder}")  # one machine-readable line per participant, never wrapped


@node_app.command("run")
def node_run(
    config: Path = ServiceConfig,
    once: bool = typer.Option(False, "--once", help="Stop when no task is waiting (tests, cron)."),
) -> None:
    """Poll the aggregator for this bank's tasks; validate, build features, train or evaluate; upload."""
    from bank_node.agent import AgentConfig, ConfigError, run_agent
    from fedfraud.transport import AggregatorUnreachable, ServiceRefused

    _log_to_stderr()
    try:
        run_agent(AgentConfig.load(config), once=once)
    except ConfigError as exc:
        _fail(str(exc))
    except AggregatorUnreachable as exc:  # the container's restart policy brings it back
        _fail(str(exc), code=1)
    except ServiceRefused as exc:  # e.g. this bank's certificate is not (or no longer) a participant's
        _fail(f"the aggregator refused this node: {exc}", code=1)


@node_app.command("health")
def node_health(
    config: Path = ServiceConfig,
    max_age: int = typer.Option(120, "--max-age", help="Seconds since the agent's last heartbeat."),
) -> None:
    """Exit 0 when the agent's heartbeat is fresh (container healthcheck)."""
    from bank_node.agent import AgentConfig, heartbeat_age

    age = heartbeat_age(AgentConfig.load(config))
    if age is None or age > max_age:
        _fail(f"no heartbeat within {max_age}s (last: {age if age is None else round(age)}s ago)", code=1)
    out.print(f"alive, heartbeat {age:.0f}s ago")


@aggregator_app.command("serve")
def aggregator_serve(config: Path = ServiceConfig) -> None:
    """Serve the aggregator's API over HTTPS with mutual TLS; state in the configured database."""
    from aggregator.service.config import ConfigError, ServiceConfig as Config
    from aggregator.service.app import serve

    _log_to_stderr()
    try:
        serve(Config.load(config))
    except ConfigError as exc:
        _fail(str(exc))


@aggregator_app.command("health")
def aggregator_health(config: Path = ServiceConfig) -> None:
    """Call the service's health endpoint with the aggregator's own certificate (container healthcheck)."""
    from aggregator.service.app import health
    from aggregator.service.config import ServiceConfig as Config

    try:
        out.print(health(Config.load(config)))
    except Exception as exc:
        _fail(f"aggregator not healthy: {exc}", code=1)


def _print_bank_table(consortium, local, federated: dict) -> None:
    table = Table(title="Holdout AUPRC per bank: local-only vs federated")
    for column in ("bank", "rows", "fraud rate", "local-only", *federated, "gain"):
        table.add_column(column, justify="left" if column == "bank" else "right")
    best = list(federated)[-1]
    for bank, node in consortium.nodes.items():
        report = node.report
        alone = local[bank].evaluation.per_bank.get(bank, {}).get("auprc", float("nan")) if bank in local else math.nan
        together = {
            name: r.evaluation.per_bank.get(bank, {}).get("auprc", float("nan")) for name, r in federated.items()
        }
        table.add_row(
            bank,
            f"{report['valid_rows']:,}",
            f"{report['fraud_rate']:.3%}",
            f"{alone:.3f}",
            *[f"{v:.3f}" for v in together.values()],
            f"{together[best] - alone:+.3f}",
        )
    table.add_row("pooled", "", "", "", *[f"{r.evaluation.pooled['auprc']:.3f}" for r in federated.values()], "")
    out.print(table)


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
