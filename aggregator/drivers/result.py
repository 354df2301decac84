"""What an in-process federation (or baseline) hands back to the CLI, the demo and the benches."""

from __future__ import annotations

from dataclasses import dataclass, field

from aggregator.evaluation import FederatedEvaluation


@dataclass
class FederationResult:
    model_uri: str
    version: int
    federation_id: str
    evaluation: FederatedEvaluation
    history: list[dict[str, float]] = field(default_factory=list)
    rejections: list[dict[str, str]] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
