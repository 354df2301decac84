"""Update checks: a named stage every update passes before it may be aggregated.

Each check is one small class with one method that returns ``None`` (pass) or a detail
(reject). ``screen`` parses the bytes (bounded, JSON only), runs every check in order and
names each rejection; nothing rejected reaches a strategy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from fedfraud.settings import FederationSettings
from fedfraud import model_json
from fedfraud.wire import ModelUpdate, WireFormatError


@dataclass(frozen=True)
class RoundContext:
    round_id: int
    contract_hash: str
    base_model_id: str
    num_feature: int
    expected_banks: frozenset[str]
    max_trees: int
    max_bytes: int
    accepted_before: frozenset[str] = field(default_factory=frozenset)  # banks already in this round

    @classmethod
    def for_stage(cls, round_id: int, contract: dict, stage: list[str], base_model_id: str,
                  settings: FederationSettings, accepted_before=()) -> "RoundContext":
        """What updates from ``stage``'s banks must match, with the federation's limits."""
        return cls(round_id=round_id, contract_hash=contract["hash"], base_model_id=base_model_id,
                   num_feature=len(contract["names"]), expected_banks=frozenset(stage),
                   max_trees=settings.max_trees_per_update, max_bytes=settings.max_update_bytes,
                   accepted_before=frozenset(accepted_before))


@dataclass(frozen=True)
class Rejection:
    bank: str
    check: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"bank": self.bank, "check": self.check, "detail": self.detail}


class UpdateCheck(ABC):
    name: str

    @abstractmethod
    def __call__(self, update: ModelUpdate, ctx: RoundContext) -> str | None:
        """``None`` when the update passes, else what is wrong with it."""


class ExpectedBank(UpdateCheck):
    name = "unexpected_bank"

    def __call__(self, update, ctx):
        return None if update.bank in ctx.expected_banks else f"bank {update.bank} was not asked in this stage"


class RoundId(UpdateCheck):
    name = "wrong_round"

    def __call__(self, update, ctx):
        return (
            None if update.round_id == ctx.round_id else f"update for round {update.round_id}, round is {ctx.round_id}"
        )


class ContractHash(UpdateCheck):
    name = "feature_contract"

    def __call__(self, update, ctx):
        if update.contract_hash == ctx.contract_hash:
            return None
        return f"feature contract {update.contract_hash[:12]} differs from the round's {ctx.contract_hash[:12]}"


class StaleBase(UpdateCheck):
    name = "stale_update"

    def __call__(self, update, ctx):
        if update.base_model_id == ctx.base_model_id:
            return None
        return f"trained on model {update.base_model_id}, current global model is {ctx.base_model_id}"


class Duplicate(UpdateCheck):
    name = "duplicate_update"

    def __call__(self, update, ctx):
        return (
            f"{update.bank} already has an accepted update this round" if update.bank in ctx.accepted_before else None
        )


class TreeCount(UpdateCheck):
    name = "tree_count"

    def __call__(self, update, ctx):
        count = len(model_json.trees(update.model))
        return None if 1 <= count <= ctx.max_trees else f"{count} trees, allowed 1..{ctx.max_trees}"


class NumFeature(UpdateCheck):
    name = "num_feature"

    def __call__(self, update, ctx):
        found = model_json.num_feature(update.model)
        return None if found == ctx.num_feature else f"model has {found} features, contract has {ctx.num_feature}"


class FiniteLeaves(UpdateCheck):
    name = "non_finite_leaves"

    def __call__(self, update, ctx):
        return None if model_json.all_finite(model_json.leaf_values(update.model)) else "NaN or infinite leaf values"


DEFAULT_CHECKS: tuple[UpdateCheck, ...] = (
    ExpectedBank(),
    RoundId(),
    ContractHash(),
    StaleBase(),
    Duplicate(),
    TreeCount(),
    NumFeature(),
    FiniteLeaves(),
)


def screen(
    received: dict[str, bytes], ctx: RoundContext, checks: tuple[UpdateCheck, ...] = DEFAULT_CHECKS
) -> tuple[list[ModelUpdate], list[Rejection]]:
    """Parse and check each bank's bytes; return (accepted updates, named rejections)."""
    accepted: list[ModelUpdate] = []
    rejections: list[Rejection] = []
    seen = set(ctx.accepted_before)
    for sender in sorted(received):
        try:
            update = ModelUpdate.from_bytes(received[sender], max_bytes=ctx.max_bytes)
            if update.bank != sender:
                raise WireFormatError(f"update claims bank {update.bank} but came from {sender}")
            ctx_now = RoundContext(**{**ctx.__dict__, "accepted_before": frozenset(seen)})
            failed = next(((c.name, d) for c in checks if (d := _run(c, update, ctx_now))), None)
        except WireFormatError as exc:
            failed = ("wire_format", str(exc))
        if failed:
            rejections.append(Rejection(sender, *failed))
        else:
            accepted.append(update)
            seen.add(sender)
    return accepted, rejections


def _run(check: UpdateCheck, update: ModelUpdate, ctx: RoundContext) -> str | None:
    try:
        return check(update, ctx)
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # a malformed model document
        return f"malformed update ({exc.__class__.__name__}: {exc})"
