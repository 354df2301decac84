"""Pipeline configuration: the consortium-wide YAML, loaded into typed, frozen objects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).with_name("config.yaml")


@dataclass(frozen=True)
class ValidationConfig:
    fraud_rate_min: float
    fraud_rate_max: float
    min_labelled_rows: int


@dataclass(frozen=True)
class FeatureConfig:
    version: int
    base_currency: str
    rates_to_base: dict[str, float]
    windows_seconds: dict[str, int]
    small_amount_base: float
    burst_window_seconds: int
    burst_min_count: int
    merchant_categories: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """Canonical, JSON-ready form (sorted rates) used in the feature-contract hash."""
        return {
            "version": self.version,
            "base_currency": self.base_currency,
            "rates_to_base": dict(sorted(self.rates_to_base.items())),
            "windows_seconds": dict(self.windows_seconds),
            "small_amount_base": self.small_amount_base,
            "burst_window_seconds": self.burst_window_seconds,
            "burst_min_count": self.burst_min_count,
            "merchant_categories": list(self.merchant_categories),
        }


@dataclass(frozen=True)
class PipelineConfig:
    validation: ValidationConfig
    features: FeatureConfig


class ConfigError(ValueError):
    """The configuration file is missing a key or holds a value of the wrong kind."""


def load_config(path: str | Path | None = None) -> PipelineConfig:
    """Load the pipeline config from ``path`` (default: the packaged ``config.yaml``)."""
    source = Path(path) if path else DEFAULT_CONFIG_PATH
    raw = yaml.safe_load(source.read_text())
    try:
        validation = ValidationConfig(
            fraud_rate_min=float(raw["validation"]["fraud_rate_min"]),
            fraud_rate_max=float(raw["validation"]["fraud_rate_max"]),
            min_labelled_rows=int(raw["validation"]["min_labelled_rows"]),
        )
        feats = raw["features"]
        features = FeatureConfig(
            version=int(feats["version"]),
            base_currency=str(feats["base_currency"]),
            rates_to_base={str(k): float(v) for k, v in feats["rates_to_base"].items()},
            windows_seconds={str(k): int(v) for k, v in feats["windows_seconds"].items()},
            small_amount_base=float(feats["small_amount_base"]),
            burst_window_seconds=int(feats["burst_window_seconds"]),
            burst_min_count=int(feats["burst_min_count"]),
            merchant_categories=tuple(str(c) for c in feats["merchant_categories"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: invalid pipeline config ({exc!r})") from exc
    if features.base_currency not in features.rates_to_base:
        raise ConfigError(f"{source}: base_currency {features.base_currency} has no rate")
    return PipelineConfig(validation=validation, features=features)
