"""The federation's plan: decided once from the banks' summaries, parsed and validated once.

On disk (``plan.json``) and in the service's database it is the same JSON object as before;
everywhere in code it is a ``Plan``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from aggregator.protocol.errors import RoundFailed
from fedfraud.protocol import StrategyName
from fedfraud.settings import FederationSettings, consortium_params


@dataclass(frozen=True)
class Plan:
    model_name: str
    strategy: str
    rounds: int
    seed: int
    settings: FederationSettings
    contract_hash: str
    feature_names: list[str]
    banks: list[str]
    excluded: dict[str, str]
    consortium_params: dict[str, Any]
    federation_id: str
    data_windows: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None

    @property
    def contract(self) -> dict[str, Any]:
        return {"hash": self.contract_hash, "names": list(self.feature_names)}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "settings": asdict(self.settings)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Plan":
        """Parse a stored plan; a missing, unknown or mistyped field is refused by name."""
        if isinstance(raw, Plan):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"a plan must be a JSON object, not {type(raw).__name__}")
        names = {f.name for f in fields(cls)}
        unknown, missing = set(raw) - names, {n for n in names - set(raw) if n not in ("data_windows", "run_id")}
        if unknown or missing:
            raise ValueError(f"plan fields: unknown {sorted(unknown)}, missing {sorted(missing)}")
        settings = FederationSettings(**raw["settings"])
        plan = cls(**{**raw, "settings": settings})
        plan.validate()
        return plan

    def validate(self) -> None:
        if self.strategy not in StrategyName.FEDERATED:
            raise ValueError(f"plan strategy {self.strategy!r} is not one of {StrategyName.FEDERATED}")
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise ValueError(f"plan rounds must be a positive integer, not {self.rounds!r}")
        if not all(isinstance(b, str) for b in self.banks) or len(set(self.banks)) != len(self.banks):
            raise ValueError(f"plan banks must be distinct names: {self.banks!r}")
        if not all(isinstance(n, str) for n in self.feature_names):
            raise ValueError("plan feature names must be strings")

    def bank_index(self, bank: str) -> int:
        return self.banks.index(bank)


def select_banks(summaries: dict[str, dict[str, Any]], contract_hash: str) -> tuple[list[str], dict[str, str]]:
    """Banks fit to join (ready, same feature contract) and the named reason for each one left out."""
    ready, excluded = [], {}
    for bank, s in sorted(summaries.items()):
        if s["contract_hash"] != contract_hash:
            excluded[bank] = f"feature contract {s['contract_hash'][:12]} differs from {contract_hash[:12]}"
        elif not s["training_allowed"]:
            excluded[bank] = "declined to train: " + "; ".join(s["decline_reasons"])
        else:
            ready.append(bank)
    return ready, excluded


def federation_id(model_name: str, strategy: str, rounds: int, seed: int, settings: FederationSettings,
                  summaries: dict[str, dict[str, Any]]) -> str:
    """Same banks, data windows, settings and seed -> same id, so a retry is recognised."""
    key = {"model": model_name, "strategy": strategy, "rounds": rounds, "seed": seed,
           "settings": settings.as_params(),
           "banks": {b: [s["contract_hash"], s["data_window"], s["counts"]] for b, s in sorted(summaries.items())}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(summaries: dict[str, dict[str, Any]], missing: list[str], model_name: str, strategy: str, rounds: int,
              seed: int, settings: FederationSettings, contract: dict[str, Any], run_id: str | None) -> Plan:
    """The plan from the summaries of the banks that prepared; below quorum the federation fails."""
    ready, excluded = select_banks(summaries, contract["hash"])
    excluded.update({b: "did not prepare (its task failed or timed out)" for b in missing})
    if len(ready) < settings.min_banks:
        raise RoundFailed(f"only {len(ready)} bank(s) ready, quorum is {settings.min_banks}; excluded: {excluded}")
    positives = sum(summaries[b]["counts"]["positives"] for b in ready)
    negatives = sum(summaries[b]["counts"]["negatives"] for b in ready)
    plan = Plan(model_name=model_name, strategy=strategy, rounds=rounds, seed=seed, settings=settings,
                contract_hash=contract["hash"], feature_names=list(contract["names"]), banks=ready, excluded=excluded,
                consortium_params=consortium_params(settings, positives, negatives),
                federation_id=federation_id(model_name, strategy, rounds, seed, settings, summaries),
                data_windows={b: summaries[b]["data_window"] for b in ready}, run_id=run_id)
    plan.validate()
    return plan
