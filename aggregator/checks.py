"""Update checks: a named stage every update passes before it may be aggregated.

``screen`` first parses each bank's bytes through ``fedfraud.model_guard`` (size bounded before
parsing, strict JSON, every tree validated and rebuilt inside the consortium header, depth,
nodes, trees, bytes and |leaf| within the round's limits): a ``ModelRefused`` is a rejection
named by its check. The rebuilt update then meets the round checks below (one small class each,
``None`` = pass, else a detail). Nothing rejected, and nothing a bank wrote itself beyond its
trees' allowed fields, reaches a strategy.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from fedfraud.model_guard import ConsortiumHeader, ModelLimits, ModelRefused, parse_update_bytes
from fedfraud.wire import ModelUpdate


@dataclass(frozen=True)
class RoundContext:
    round_id: int
    contract_hash: str
    base_model_id: str
    expected_banks: frozenset[str]
    limits: ModelLimits  # one update's bounds (the plan's ``update_limits``)
    header: ConsortiumHeader  # the consortium's header (the plan's), never a bank's
    accepted_before: frozenset[str] = field(default_factory=frozenset)  # banks already in this round
    counts: dict = field(default_factory=dict)  # per bank, as its summary reported them at planning

    @classmethod
    def for_stage(cls, round_id: int, plan, stage: list[str], base_model_id: str,
                  accepted_before=()) -> "RoundContext":
        """What updates from ``stage``'s banks must match, with the plan's header and limits."""
        return cls(round_id=round_id, contract_hash=plan.contract_hash, base_model_id=base_model_id,
                   expected_banks=frozenset(stage), limits=plan.update_limits, header=plan.header,
                   accepted_before=frozenset(accepted_before), counts=plan.counts)


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
        return f"feature contract {str(update.contract_hash)[:12]} differs from the round's {ctx.contract_hash[:12]}"


class StaleBase(UpdateCheck):
    name = "stale_update"

    def __call__(self, update, ctx):
        if update.base_model_id == ctx.base_model_id:
            return None
        return f"trained on model {str(update.base_model_id)[:32]}, current global model is {ctx.base_model_id}"


class Duplicate(UpdateCheck):
    name = "duplicate_update"

    def __call__(self, update, ctx):
        return (
            f"{update.bank} already has an accepted update this round" if update.bank in ctx.accepted_before else None
        )


class PlannedCounts(UpdateCheck):
    """An update's counts must be the ones its bank reported at planning (they are never used:
    bagging weights come from the plan; a different claim is a lie, named)."""

    name = "counts_mismatch"

    def __call__(self, update, ctx):
        planned = ctx.counts.get(update.bank)
        if not planned:  # a plan written before counts were recorded
            return None
        claimed = update.counts if isinstance(update.counts, dict) else {}
        wrong = sorted(k for k, v in planned.items() if k in claimed and claimed[k] != v)
        if not wrong:
            return None
        return "; ".join(f"{k} {str(claimed[k])[:24]} != {planned[k]} at planning" for k in wrong)


DEFAULT_CHECKS: tuple[UpdateCheck, ...] = (ExpectedBank(), RoundId(), ContractHash(), StaleBase(), Duplicate(),
                                           PlannedCounts())


def screen(
    received: dict[str, bytes], ctx: RoundContext, checks: tuple[UpdateCheck, ...] = DEFAULT_CHECKS
) -> tuple[list[ModelUpdate], list[Rejection]]:
    """Parse, rebuild and check each bank's bytes; return (accepted rebuilt updates, named rejections)."""
    accepted: list[ModelUpdate] = []
    rejections: list[Rejection] = []
    seen = set(ctx.accepted_before)
    for sender in sorted(received):
        try:
            update = parse_update_bytes(received[sender], ctx.limits, ctx.header)
        except ModelRefused as refused:
            rejections.append(Rejection(sender, refused.check, refused.detail))
            continue
        ctx_now = dataclasses.replace(ctx, accepted_before=frozenset(seen))
        if update.bank != sender:
            failed = ("wrong_sender", f"update claims bank {str(update.bank)[:40]} but came from {sender}")
        else:
            failed = next(((c.name, d) for c in checks if (d := c(update, ctx_now))), None)
        if failed:
            rejections.append(Rejection(sender, *failed))
        else:
            accepted.append(update)
            seen.add(sender)
    return accepted, rejections
