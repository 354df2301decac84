"""The federation's plan: decided once from the banks' summaries, parsed and validated once.

On disk (``plan.json``) and in the service's database it is the same JSON object as before
(plus ``counts``, each bank's row counts as recorded at planning, and ``label_sums``, the planned banks'
label counts summed under masking); everywhere in code it is a ``Plan``. The consortium header and the
model limits of every check follow from the plan alone.

A plan is *settled* once its banks' label counts are summed (``aggregator.protocol.secure_planning``):
``make_plan`` leaves ``consortium_params`` empty, and ``settled`` fills them from the decoded sums.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from aggregator.protocol.errors import RoundFailed
from fedfraud.model_guard import MAX_MODEL_BYTES, MAX_MODEL_TREES, ConsortiumHeader, ModelLimits, consortium_header
from fedfraud.protocol import StrategyName
from fedfraud.secagg.masking import MIN_PARTIES
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import CLEAR_COUNTS, MASKED_COUNTS

COUNT_KEYS = CLEAR_COUNTS  # what a summary carries in the clear; label counts are summed masked
MAX_COUNT = 10 ** 12  # rows a bank may claim (far above any bank; keeps the sums exact)
OPTIONAL_FIELDS = ("data_windows", "run_id", "counts", "label_sums")  # absent in plans written before they existed


def summary_problem(summary: Any) -> tuple[str, str] | None:
    """(check, detail) when a bank's summary is unusable: wrong types (``invalid_summary``) or
    counts that are not non-negative integers adding up (``invalid_counts``); else None."""
    if not isinstance(summary, dict):
        return "invalid_summary", f"a summary must be an object, not {type(summary).__name__}"
    kinds = {"bank": str, "contract_hash": str, "training_allowed": bool, "decline_reasons": list,
             "data_window": list}
    for key, kind in kinds.items():
        if not isinstance(summary.get(key), kind):
            return "invalid_summary", f"{key} must be a {kind.__name__}, got {type(summary.get(key)).__name__}"
    if not all(isinstance(r, str) for r in summary["decline_reasons"]):
        return "invalid_summary", "decline_reasons must be strings"
    problem = counts_problem(summary.get("counts"))
    return ("invalid_counts", problem) if problem else None


def counts_problem(counts: Any) -> str | None:
    """Why a summary's counts are unusable (None: exactly ``COUNT_KEYS``, non-negative integers). A label
    count in the clear is refused by name: it leaves a bank only masked."""
    if not isinstance(counts, dict):
        return f"counts must be an object, not {type(counts).__name__}"
    if extra := sorted(set(counts) - set(COUNT_KEYS)):
        clear = [k for k in extra if k in (*MASKED_COUNTS, "negatives")]
        return (f"counts.{str(extra[0])[:40]} is not a count a summary carries (only {list(COUNT_KEYS)})"
                + (f"; {clear} leave a bank only masked" if clear else ""))
    for key in COUNT_KEYS:
        value = counts.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            return f"counts.{key} = {str(value)[:24]!r} is not an integer in 0..{MAX_COUNT}"
    return None


def label_sums_problem(sums: Any, banks: list[str], counts: dict[str, dict[str, int]]) -> str | None:
    """Why a plan's ``label_sums`` are unusable (None: the banks' decoded sums, within their rows)."""
    if not isinstance(sums, dict) or set(sums) != {"banks", "sessions", *MASKED_COUNTS}:
        return "label_sums must hold banks, sessions, positives and holdout_positives"
    if sums["banks"] != sorted(banks):
        return f"label_sums are of {sums['banks']!r}, the plan's banks are {sorted(banks)}"
    if not all(b in counts for b in banks):
        return "label_sums without every bank's row counts"
    rows = {"positives": sum(counts[b]["train_rows"] for b in banks),
            "holdout_positives": sum(counts[b]["holdout_rows"] for b in banks)}
    for key in MASKED_COUNTS:
        value = sums[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= rows[key]:
            return f"label_sums.{key} = {str(value)[:24]!r} is not an integer in 0..{rows[key]} (the banks' rows)"
    return None


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
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per bank, row counts recorded at planning
    # the banks' label counts, summed under masking: banks, sessions, positives, holdout_positives
    label_sums: dict[str, Any] | None = None

    @property
    def is_settled(self) -> bool:
        """True once the banks' label counts are summed and the consortium parameters follow from them."""
        return self.label_sums is not None and self.label_sums["banks"] == sorted(self.banks)

    def settled(self, banks: list[str], positives: int, holdout_positives: int, sessions: list[str],
                left_out: dict[str, str]) -> "Plan":
        """This plan over ``banks`` (the banks whose masked counts were summed; ``left_out`` are named in
        ``excluded``), with the consortium parameters of the decoded sums."""
        banks = [b for b in self.banks if b in banks]
        negatives = sum(self.counts[b]["train_rows"] for b in banks) - positives
        # the sums join the id (as the clear counts did): relabelled rows are a new federation, not a retry
        key = json.dumps([self.federation_id, sorted(banks), positives, holdout_positives])
        plan = dataclasses.replace(
            self, banks=banks, excluded={**self.excluded, **left_out},
            federation_id=hashlib.sha256(key.encode()).hexdigest()[:16],
            counts={b: c for b, c in self.counts.items() if b in banks},
            data_windows={b: w for b, w in self.data_windows.items() if b in banks},
            consortium_params=consortium_params(self.settings, positives, negatives),
            label_sums={"banks": sorted(banks), "sessions": list(sessions), "positives": positives,
                        "holdout_positives": holdout_positives})
        plan.validate()
        return plan

    @property
    def header(self) -> ConsortiumHeader:
        """The header every model of this federation carries, decided here (never a bank's)."""
        return consortium_header(self.feature_names, self.consortium_params)

    @property
    def masking_quorum(self) -> int:
        """Banks every masked phase needs: ``MIN_PARTIES`` for masking, and the federation's ``min_banks``."""
        return max(MIN_PARTIES, self.settings.min_banks)

    @property
    def update_limits(self) -> ModelLimits:
        """Bounds of one bank's update: the round's depth, ``trees_per_round`` trees."""
        s = self.settings
        limits = ModelLimits.for_depth(s.max_depth, max_trees=min(s.trees_per_round, s.max_trees_per_update))
        return ModelLimits(**{**asdict(limits), "max_bytes": min(limits.max_bytes, s.max_update_bytes)})

    @property
    def model_limits(self) -> ModelLimits:
        """Bounds of the global model: every round's trees from every bank, never above what banks accept."""
        trees = self.rounds * len(self.banks) * self.settings.trees_per_round
        limits = ModelLimits.for_depth(self.settings.max_depth, max_trees=min(trees, MAX_MODEL_TREES))
        return ModelLimits(**{**asdict(limits), "max_bytes": min(limits.max_bytes, MAX_MODEL_BYTES)})

    @property
    def train_rows(self) -> dict[str, int]:
        """Each bank's training rows as its summary reported them at planning (bagging weights)."""
        return {bank: c["train_rows"] for bank, c in self.counts.items()}

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
        unknown, missing = set(raw) - names, {n for n in names - set(raw) if n not in OPTIONAL_FIELDS}
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
        for bank, counts in self.counts.items():
            if bank not in self.banks or (problem := counts_problem(counts)):
                raise ValueError(f"plan counts of {bank}: {problem or 'not a planned bank'}")
        if self.label_sums is not None and (problem := label_sums_problem(self.label_sums, self.banks, self.counts)):
            raise ValueError(f"plan label sums: {problem}")

    def bank_index(self, bank: str) -> int:
        return self.banks.index(bank)


def select_banks(summaries: dict[str, dict[str, Any]], contract_hash: str) -> tuple[list[str], dict[str, str]]:
    """Banks fit to join (ready, same feature contract) and the named reason for each one left out."""
    ready, excluded = [], {}
    for bank, s in sorted(summaries.items()):
        if problem := summary_problem(s):
            excluded[bank] = ": ".join(problem)
        elif s["contract_hash"] != contract_hash:
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
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_plan(summaries: dict[str, dict[str, Any]], missing: list[str], model_name: str, strategy: str, rounds: int,
              seed: int, settings: FederationSettings, contract: dict[str, Any], run_id: str | None) -> Plan:
    """The plan from the summaries of the banks that prepared; below quorum the federation fails. It is not
    settled: its consortium parameters follow from the masked label sums (``secure_planning``)."""
    ready, excluded = select_banks(summaries, contract["hash"])
    excluded.update({b: "did not prepare (its task failed or timed out)" for b in missing})
    if len(ready) < settings.min_banks:
        raise RoundFailed(f"only {len(ready)} bank(s) ready, quorum is {settings.min_banks}; excluded: {excluded}")
    trees = rounds * len(ready) * settings.trees_per_round
    if trees > MAX_MODEL_TREES:
        raise RoundFailed(f"model_too_large: {rounds} rounds x {len(ready)} banks x {settings.trees_per_round} trees "
                          f"= {trees} trees, banks accept at most {MAX_MODEL_TREES}")
    plan = Plan(model_name=model_name, strategy=strategy, rounds=rounds, seed=seed, settings=settings,
                contract_hash=contract["hash"], feature_names=list(contract["names"]), banks=ready, excluded=excluded,
                consortium_params={},
                federation_id=federation_id(model_name, strategy, rounds, seed, settings, summaries),
                data_windows={b: summaries[b]["data_window"] for b in ready}, run_id=run_id,
                counts={b: {k: summaries[b]["counts"][k] for k in COUNT_KEYS} for b in ready})
    plan.validate()
    return plan
