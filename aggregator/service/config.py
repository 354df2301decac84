"""The aggregator service's config: one YAML file; secrets (the database URL) from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fedfraud.config_file import ConfigError, TLSFiles, read_yaml

__all__ = ["ConfigError", "ServiceConfig", "TLSFiles"]


@dataclass(frozen=True)
class ServiceConfig:
    tls: TLSFiles
    banks: tuple[str, ...]
    operators: tuple[str, ...] = ("airflow",)
    consortium: str = "fedfraud"
    host: str = "127.0.0.1"
    port: int = 8443
    database_url: str = "sqlite:///work/aggregator/state.db"
    tracking_uri: str | None = None
    work_dir: Path = Path("work/aggregator")
    federated_host: str = "127.0.0.1"  # how banks reach XGBoost's federated server (histogram)
    max_update_bytes: int = 32 * 1024 * 1024
    deadline_seconds: float = 1800.0  # per phase of a round: training, then evaluation
    tick_seconds: float = 0.5
    liveness_seconds: float = 90.0  # a bank not heard from for this long: not ready, its open tasks given up
    fields: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path) -> "ServiceConfig":
        known = set(cls.__dataclass_fields__) - {"fields"}
        raw = read_yaml(Path(path), known, {"tls", "banks"})
        raw["tls"] = TLSFiles.parse(raw["tls"], str(path))
        for key in ("banks", "operators"):
            if key in raw:
                if not isinstance(raw[key], list) or not all(isinstance(b, str) and b for b in raw[key]):
                    raise ConfigError(f"{path}: {key} must be a list of participant names")
                raw[key] = tuple(raw[key])
        if "work_dir" in raw:
            raw["work_dir"] = Path(raw["work_dir"])
        raw["database_url"] = os.environ.get("FEDFRAUD_DATABASE_URL") or raw.get("database_url", cls.database_url)
        raw["tracking_uri"] = os.environ.get("MLFLOW_TRACKING_URI") or raw.get("tracking_uri")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    @property
    def participants(self) -> dict[str, str]:
        """name -> role, for everyone who may call the API (the aggregator checks its own health)."""
        roles = {"aggregator": "aggregator", **dict.fromkeys(self.banks, "bank")}
        return {**roles, **dict.fromkeys(self.operators, "operator")}
