"""MLflow tracking for federations: a parent run per federation, a child run per round,
round metrics/artifacts, and exactly-once model registration with champion/challenger aliases.

Every call goes through an ``MlflowClient`` bound to this tracker's URI. Only
``mlflow.xgboost.log_model`` needs mlflow's global (fluent) state; it is pointed at this
tracker's URI for the duration of that call and restored afterwards (not thread-safe).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import xgboost
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import (
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from aggregator import plots
from fedfraud import model_json
from fedfraud.protocol import Tag

PARENT_RUN_TAG = "mlflow.parentRunId"
CHAMPION, CHALLENGER = "champion", "challenger"
_URI_ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def zero_example(feature_names: list[str]) -> pd.DataFrame:
    """The input example logged with a model: one all-zero row, so no bank's row is ever logged."""
    return pd.DataFrame([[0.0] * len(feature_names)], columns=feature_names)


def default_tracking_uri(work_dir: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a sqlite store ``<work_dir>/mlflow.db``."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{work_dir / 'mlflow.db'}"


def _default_artifact_root(tracking_uri: str) -> str | None:
    """``file://`` URI of ``mlartifacts`` beside a sqlite file; None for other stores."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or tracking_uri == prefix + ":memory:":
        return None
    return (Path(tracking_uri[len(prefix):]).resolve().parent / "mlartifacts").as_uri()


def _quoted(value: str) -> str:
    """A value for an MLflow filter string (which has no escape for quotes)."""
    if "'" in value:
        raise ValueError(f"quotes are not allowed in ids used for lookup: {value!r}")
    return f"'{value}'"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _is(error: MlflowException, code: int) -> bool:
    return error.error_code == ErrorCode.Name(code)


@contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """Point mlflow's global tracking and registry URIs at ``uri``; restore them afterwards."""
    saved = {name: os.environ.get(name) for name in _URI_ENV_VARS}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        # Both setters also export env vars; re-setting from the saved env restores the same
        # effective URIs (an explicitly set URI is always mirrored in the env var).
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def render_report_markdown(round_id: int, report: dict[str, Any]) -> str:
    """Readable markdown for a round report: scalars as a list, mappings/records as tables."""
    lines = [f"# Round {round_id} report", ""]
    scalars = {k: v for k, v in report.items() if not isinstance(v, (dict, list, tuple))}
    lines += [f"- **{key}**: {_cell(value)}" for key, value in scalars.items()]
    for key, value in report.items():
        if key in scalars:
            continue
        lines += ["", f"## {key}", ""]
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            lines += _table([{"": name, **row} for name, row in value.items()])
        elif isinstance(value, dict):
            lines += [f"- **{k}**: {_cell(v)}" for k, v in value.items()] or ["_(empty)_"]
        elif value and all(isinstance(v, dict) for v in value):
            lines += _table(list(value))
        else:
            lines += [f"- {_cell(v)}" for v in value] or ["_(none)_"]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


class FederationTracker:
    """Tracks federations, rounds and round models in one MLflow experiment and registered model."""

    def __init__(self, tracking_uri: str, model_name: str, experiment: str = "fedfraud",
                 artifact_root: str | None = None):
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.experiment_id = self._ensure_experiment(experiment, artifact_root or _default_artifact_root(tracking_uri))
        self._federation_id: str | None = None
        self._parent_run_id: str | None = None
        self._round_runs: dict[int, str] = {}

    def _ensure_experiment(self, name: str, artifact_location: str | None) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException as error:  # created concurrently
                if not _is(error, RESOURCE_ALREADY_EXISTS):
                    raise
                experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _find_run(self, filter_string: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], filter_string, max_results=1,
                                       order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    @contextmanager
    def _tracked_run(self, run_id: str) -> Iterator[str]:
        try:
            yield run_id
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    @contextmanager
    def federation(self, federation_id: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[str]:
        """Parent run for one federation (yields its run_id), resumed if the federation is retried.

        Params are logged once; a retry with a *different* value for a logged param raises
        ValueError. The run ends FINISHED, or FAILED if an exception escapes.
        """
        if self._parent_run_id is not None:
            raise RuntimeError(f"federation {self._federation_id!r} is already active")
        run_tags = {**tags, Tag.FEDERATION_ID: federation_id, Tag.RUN_KIND: "federation"}
        run_id = self._find_run(f"tags.`{Tag.FEDERATION_ID}` = {_quoted(federation_id)} "
                                f"and tags.`{Tag.RUN_KIND}` = 'federation'")
        if run_id is None:
            run_id = self.client.create_run(self.experiment_id, tags=run_tags, run_name=federation_id).info.run_id
            logged: dict[str, str] = {}
        else:
            logged = self.client.get_run(run_id).data.params
            self.client.update_run(run_id, status="RUNNING")
        new = {key: str(value) for key, value in params.items()}
        changed = sorted(key for key, value in new.items() if key in logged and logged[key] != value)
        if changed:
            raise ValueError(f"federation {federation_id!r} was started with other values for {changed}")
        new = [Param(key, value) for key, value in new.items() if key not in logged]
        for start in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[start:start + 100])
        self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in run_tags.items()])
        self._federation_id, self._parent_run_id, self._round_runs = federation_id, run_id, {}
        try:
            with self._tracked_run(run_id):
                yield run_id
        finally:
            self._federation_id, self._parent_run_id, self._round_runs = None, None, {}

    @contextmanager
    def round(self, round_id: int) -> Iterator[str]:
        """Child run ``round-{round_id}`` of the active federation, resumed on retry; yields run_id."""
        parent = self._require_parent()
        run_id = self._find_run(f"tags.`{PARENT_RUN_TAG}` = '{parent}' and tags.`{Tag.ROUND}` = '{round_id}'")
        if run_id is None:
            tags = {PARENT_RUN_TAG: parent, Tag.ROUND: str(round_id), Tag.FEDERATION_ID: self._federation_id,
                    Tag.RUN_KIND: "round"}
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=f"round-{round_id}").info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self._round_runs[round_id] = run_id
        with self._tracked_run(run_id):
            yield run_id

    def _require_parent(self) -> str:
        if self._parent_run_id is None:
            raise RuntimeError("no active federation: use `with tracker.federation(...)`")
        return self._parent_run_id

    def _round_run(self, round_id: int) -> str:
        self._require_parent()
        if round_id not in self._round_runs:
            raise RuntimeError(f"round {round_id} was not started: use `with tracker.round({round_id})`")
        return self._round_runs[round_id]

    def _log_metrics(self, round_id: int, values: dict[str, float]) -> None:
        """Log ``values`` at step ``round_id`` into the round run and the parent run.

        A retried round re-logs nothing it already logged with the same value (the round run
        only holds step ``round_id``, so its latest values are exactly what was logged).
        """
        round_run = self._round_run(round_id)
        logged = self.client.get_run(round_run).data.metrics
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, round_id) for key, value in values.items()
                   if logged.get(key) != float(value)]
        for run_id in (round_run, self._require_parent()):
            for start in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[start:start + 1000])

    def log_round_metrics(self, round_id: int, per_bank: dict[str, dict[str, float]], pooled: dict[str, float]) -> None:
        """``{bank}.{metric}`` and ``pooled.{metric}`` at step=round_id, in round and parent runs."""
        values = {f"{bank}.{name}": value for bank, metrics in per_bank.items() for name, value in metrics.items()}
        values.update({f"{plots.POOLED}.{name}": value for name, value in pooled.items()})
        self._log_metrics(round_id, values)

    def log_metrics(self, round_id: int, values: dict[str, float]) -> None:
        """A phase's own figures (compaction, bytes on the wire) at step=round_id, in round and parent runs."""
        self._log_metrics(round_id, values)

    def log_rejections(self, round_id: int, rejections: list[dict[str, str]]) -> None:
        """rejected_updates.json + tag fedfraud.rejected_banks (round run); count metric (round + parent)."""
        run_id = self._round_run(round_id)
        self.client.log_dict(run_id, list(rejections), "rejected_updates.json")
        self.client.set_tag(run_id, Tag.REJECTED_BANKS, ",".join(sorted({r["bank"] for r in rejections})))
        self._log_metrics(round_id, {"rejected_updates": len(rejections)})

    def log_round_artifacts(self, round_id: int, histograms: dict[str, tuple[np.ndarray, np.ndarray]],
                            history: list[dict[str, float]], booster: xgboost.Booster, feature_names: list[str],
                            report: dict[str, Any]) -> None:
        """Charts (PR curves, metrics by round, feature importance) and the round report (json + md)."""
        run_id = self._round_run(round_id)
        with tempfile.TemporaryDirectory(prefix="fedfraud-round-") as tmp:
            out = Path(tmp)
            plots.pr_curves_png(histograms, out / "pr_curves.png")
            plots.metrics_by_round_png(history, out / "metrics_by_round.png")
            plots.feature_importance_png(booster, feature_names, out / "feature_importance.png")
            (out / "round_report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
            (out / "round_report.md").write_text(render_report_markdown(round_id, report))
            self.client.log_artifacts(run_id, tmp)

    def register_round_model(self, booster: xgboost.Booster, federation_id: str, round_id: int,
                             input_example: pd.DataFrame, tags: dict[str, str]) -> int:
        """Log and register the round's model exactly once per (federation_id, round_id); return its version."""
        round_key = f"{federation_id}:{round_id}"
        existing = self.client.search_model_versions(
            f"name = {_quoted(self.model_name)} and tags.`{Tag.ROUND_KEY}` = {_quoted(round_key)}")
        if existing:
            return min(int(version.version) for version in existing)
        if federation_id != self._federation_id:
            raise RuntimeError(f"federation {federation_id!r} is not the active one ({self._federation_id!r})")
        run_id = self._round_run(round_id)
        features = xgboost.DMatrix(input_example.to_numpy(), feature_names=booster.feature_names)
        signature = infer_signature(input_example, booster.predict(features))
        status = self.client.get_run(run_id).info.status
        with _fluent_uri(self.tracking_uri):
            # log_model needs an active run (it also takes the LoggedModel's experiment from it).
            mlflow.start_run(run_id=run_id, nested=True)
            try:
                info = mlflow.xgboost.log_model(
                    xgb_model=booster, name="model", signature=signature, input_example=input_example,
                    model_format="json", pip_requirements=[f"xgboost=={xgboost.__version__}"])
            finally:
                mlflow.end_run(status=status)  # pops the fluent run without finishing the round run
            try:
                self.client.create_registered_model(self.model_name)
            except MlflowException as error:
                if not _is(error, RESOURCE_ALREADY_EXISTS):
                    raise
            # Still inside _fluent_uri: the sqlite registry resolves a models:/<model_id> source
            # through the *global* tracking URI, not this client's.
            version = self.client.create_model_version(
                self.model_name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                tags={**tags, Tag.ROUND_KEY: round_key, Tag.RUN_ID: run_id})
        return int(version.version)

    def _alias_version(self, alias: str) -> int | None:
        # (get_model_version_by_alias reports a missing alias as INVALID_PARAMETER_VALUE)
        try:
            aliases = self.client.get_registered_model(self.model_name).aliases
        except MlflowException as error:
            if _is(error, RESOURCE_DOES_NOT_EXIST):
                return None
            raise
        return int(aliases[alias]) if alias in aliases else None

    def promote(self, version: int, candidate_auprc: float, champion_auprc: float | None,
                champion_stale: bool = False, best_local: tuple[str, float] | None = None) -> bool:
        """``challenger`` -> version; ``champion`` -> version if there is none yet, the candidate's
        AUPRC is >= the champion's, or the champion is stale (another feature contract: it cannot
        score today's features). An existing champion with unknown AUPRC otherwise stays.
        The champion gate: with no champion yet, ``best_local`` ((bank, pooled AUPRC) of the best
        single-bank local model) must be beaten, else the version stays challenger, the reason
        tagged (``fedfraud.promotion_reason``). Returns whether ``version`` is now champion."""
        current = self._alias_version(CHAMPION)
        self.client.set_registered_model_alias(self.model_name, CHALLENGER, str(version))
        if current == version:
            moved, reason = True, "already_champion"
        elif current is None and best_local is not None and candidate_auprc <= best_local[1]:
            moved, reason = False, "below_best_local_model"
        elif current is None:
            moved, reason = True, "first_champion" if best_local is None else "beats_best_local_model"
        elif champion_stale:
            moved, reason = True, "champion_stale"
        elif champion_auprc is not None and candidate_auprc >= champion_auprc:
            moved, reason = True, "not_worse_than_champion"
        else:
            moved, reason = False, "worse_than_champion" if champion_auprc is not None else "champion_unevaluated"
        if moved:
            self.client.set_registered_model_alias(self.model_name, CHAMPION, str(version))
        champion_text = "none" if champion_auprc is None else f"{champion_auprc:.6f}"
        local_text = "none" if best_local is None else f"{best_local[1]:.6f}({best_local[0]})"
        detail = (f"candidate_auprc={candidate_auprc:.6f} champion_auprc={champion_text} "
                  f"champion_version={current} champion_stale={champion_stale} best_local_auprc={local_text}")
        for key, value in ((Tag.PROMOTION, CHAMPION if moved else CHALLENGER), (Tag.PROMOTION_DETAIL, detail),
                           (Tag.PROMOTION_REASON, reason)):
            self.client.set_model_version_tag(self.model_name, str(version), key, value)
        return moved

    def log_contributions(self, round_id: int, contributions: dict[str, float]) -> None:
        """``contribution.<bank>``: pooled AUPRC with minus without its update, at step=round_id."""
        if contributions:
            self._log_metrics(round_id, {f"contribution.{bank}": value for bank, value in contributions.items()})

    def champion_version(self) -> int | None:
        return self._alias_version(CHAMPION)

    def champion_model(self, limits=None, feature_names: list[str] | None = None) -> tuple[int, dict[str, Any]] | None:
        """(version, model document) at alias ``champion``, or None. The logged JSON is read as bytes,
        validated and rebuilt (``fedfraud.model_guard``, its header checked against ``feature_names``,
        else its own names) before anything loads it; a refusal raises ``ModelRefused``."""
        from fedfraud.logged_model import download_model_json
        from fedfraud.model_guard import ModelLimits, ModelRefused, parse_received_model
        from fedfraud.wire import WireFormatError, loads_strict

        version = self._alias_version(CHAMPION)
        if version is None:
            return None
        limits = limits or ModelLimits.accepted()
        location = self.client.get_model_version_download_uri(self.model_name, str(version))
        with _fluent_uri(self.tracking_uri):  # e.g. mlflow-artifacts:/ locations resolve via the global URI
            data = download_model_json(location, limits.max_bytes)
        if feature_names is None:
            try:
                feature_names = loads_strict(data, "model")["learner"]["feature_names"]
            except (WireFormatError, KeyError, TypeError) as exc:
                raise ModelRefused("malformed", f"the logged model has no feature names ({exc})") from None
        if not isinstance(feature_names, list):
            raise ModelRefused("wrong_type", "feature_names must be a list")
        return version, parse_received_model(data, limits, feature_names)

    def champion(self) -> tuple[int, xgboost.Booster] | None:
        """(version, booster) at alias ``champion``, or None; validated before it is loaded."""
        found = self.champion_model()
        return None if found is None else (found[0], model_json.to_booster(found[1]))

    def version_tags(self, version: int) -> dict[str, str]:
        return dict(self.client.get_model_version(self.model_name, str(version)).tags)

    def model_uri(self, version: int) -> str:
        return f"models:/{self.model_name}/{version}"
