"""Compaction's leaf refit (bagging, ``settings.compaction_refit``): a smaller model whose leaves the banks refit.

Dropping trees alone cannot halve a bagged model without losing AUPRC (README "Compaction"); here each
bank's block of trees keeps its first ``compaction_refit_keep`` share and every kept leaf moves, in
``compaction_refit_steps`` damped Newton steps, to absorb what the dropped trees carried. Phases
(declared in ``phases.ROUND`` after ``candidate``; nothing happens outside a refit round):

* ``refit_session`` (aggregator): the cut model (``start.json``), a session, a key request to every bank;
* ``refit_keys`` (bank): a signed key offer (``TaskKind.KEYS``, unchanged);
* ``refit_relay`` (aggregator): the well-formed offers and the cut model into the first ``RefitTask``;
* ``refit`` (bank, ``bank_node.masked_refit``): the model's per-leaf gradient and hessian sums (and loss)
  on the bank's training rows, as pairwise-masked words;
* ``refit_step`` (aggregator): the wrapping sum decoded, checked (``leaf_refit.check_sums``: shape, finite,
  hessians >= 0, every tree's totals equal, totals within the banks' rows), one step applied to every
  leaf; the next step's task and ``PhaseRerun("refit")`` until the last, then the model checks and the
  refitted model replaces the round's candidate.

The aggregator learns the pooled per-leaf sums only. A bank missing, a malformed or refused answer, too
few banks: the round keeps its uncut candidate and ``compaction.json`` says why (never a wrong sum).
"""

from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path

import numpy as np

from aggregator.protocol.errors import PhaseRerun
from aggregator.protocol.registry import tracked_round
from aggregator.protocol.secure_evaluation import relayed_offers
from aggregator.protocol.state import Exchange, Node, RoundState, answer_tolerantly
from fedfraud import leaf_refit, model_json
from fedfraud.model_guard import ModelRefused, rebuild_model
from fedfraud.model_json import Doc
from fedfraud.protocol import StrategyName, TaskKind
from fedfraud.secagg.masking import SecureAggregationError, decode, unmasked_sum, words_from_text
from fedfraud.wire import KeyRequest, MaskedRefitSums, RefitTask, WireFormatError
from pipelines.io import write_bytes

log = logging.getLogger("fedfraud.rounds")


def _folder(r: RoundState) -> Path:
    return r.ws.round_dir(r.round_id) / "refit"


def _state(r: RoundState) -> dict:
    path = _folder(r) / "state.json"
    return r.ws.read_json(path) if path.exists() else {}


def _save(r: RoundState, state: dict) -> None:
    r.ws.write_json(state, _folder(r) / "state.json")


def applies(r: RoundState) -> bool:
    s = r.plan.settings
    return (s.compaction_refit and r.plan.strategy == StrategyName.BAGGING
            and r.round_id % s.compaction_refit_every == 0)


def kept_trees(origins: list, keep: int) -> list[int]:
    """Indices of the trees each bank's block (consecutive trees of one round and bank) keeps: its first ``keep``."""
    kept, position, previous = [], 0, None
    for index, (round_id, bank, _) in enumerate(origins):
        position = position + 1 if (round_id, bank) == previous else 0
        previous = (round_id, bank)
        if position < keep:
            kept.append(index)
    return kept


def _skip(r: RoundState, reason: str) -> None:
    state = {**_state(r), "skipped": reason, "done": True}
    _save(r, state)
    _record(r, {"skipped": reason})
    log.warning("round %s: leaf refit skipped: %s", r.round_id, reason)


def _record(r: RoundState, refit: dict) -> None:
    """The refit's outcome into the round's ``compaction.json`` (written by ``compact`` before)."""
    path = r.path("compaction")
    record = r.ws.read_json(path) if path.exists() else {}
    record["refit"] = refit
    r.ws.write_json(record, path)


def open_session(r: RoundState) -> None:
    """A refit round: the candidate cut to each block's first trees, and a key request to every bank."""
    import shutil

    shutil.rmtree(_folder(r), ignore_errors=True)
    if not applies(r) or not r.path("model").exists():
        return
    s, model = r.plan.settings, r.ws.read_json(r.path("model"))
    origins = r.ws.read_json(r.path("provenance")) if r.path("provenance").exists() else None
    if origins is None or len(origins) != len(model_json.trees(model)):
        _skip(r, "no provenance for the round's trees (which bank and round each came from)")
        return
    keep = max(1, math.ceil(s.trees_per_round * s.compaction_refit_keep))
    kept = kept_trees(origins, keep)
    cut = model_json.append_trees(model_json.empty_like(model), _only(model, kept))
    session = f"{r.plan.federation_id}/round-{r.round_id}/refit/{secrets.token_hex(8)}"
    r.ws.write_json(cut, _folder(r) / "start.json")
    r.ws.write_json([origins[i] for i in kept], _folder(r) / "provenance.json")
    _save(r, {"session": session, "banks": sorted(r.banks), "step": 0, "trees_before": len(origins),
              "trees_after": len(kept), "keep_per_block": keep, "loss": []})
    write_bytes(KeyRequest(session, sorted(r.banks)).to_bytes(), _folder(r) / "request.json")


def _only(doc: Doc, indices: list[int]) -> Doc:
    out = model_json.empty_like(doc)
    out["learner"]["gradient_booster"]["model"]["trees"] = [model_json.trees(doc)[i] for i in indices]
    return out


def keys_banks(r: RoundState) -> list[str]:
    state = _state(r)
    return [] if not state or state.get("done") or "masking" in state else list(state["banks"])


def keys_exchanges(r: RoundState, bank: str) -> list[Exchange]:
    folder = _folder(r)
    return [Exchange(TaskKind.KEYS, bank, folder / "request.json", folder / "offers" / f"{bank}.json", "refit")]


def keys(r: RoundState, nodes: dict[str, Node]) -> None:
    answer_tolerantly(r, nodes, keys_banks, keys_exchanges, "offer a refit key")


def _task_path(r: RoundState, step: int) -> Path:
    return _folder(r) / f"step-{step}" / "task.json"


def _write_task(r: RoundState, state: dict, model: Doc) -> None:
    offers = r.ws.read_json(_folder(r) / "offers.json")
    task = RefitTask(r.round_id, state["step"], state["session"], state["masking"], offers, model)
    write_bytes(task.to_bytes(), _task_path(r, state["step"]))


def relay(r: RoundState) -> None:
    """The well-formed offers into the first task; fewer than the masking quorum: no refit."""
    state = _state(r)
    if not state or state.get("done"):
        return
    offers, faults = relayed_offers(_folder(r), state["banks"], state["session"])
    if len(offers) < r.plan.masking_quorum or sorted(offers) != state["banks"]:
        _skip(r, f"key offers from {sorted(offers)} of {state['banks']}; every bank's sums are needed "
                 f"(quorum {r.plan.masking_quorum}); faults: {faults}")
        return
    r.ws.write_json(offers, _folder(r) / "offers.json")
    state["masking"] = sorted(offers)
    _save(r, state)
    _write_task(r, state, r.ws.read_json(_folder(r) / "start.json"))


def refit_banks(r: RoundState) -> list[str]:
    state = _state(r)
    return list(state["masking"]) if state.get("masking") and not state.get("done") else []


def refit_exchanges(r: RoundState, bank: str) -> list[Exchange]:
    step = _state(r)["step"]
    return [Exchange(TaskKind.REFIT, bank, _task_path(r, step), _task_path(r, step).parent / f"{bank}.answer.json",
                     f"step-{step}")]


def refit(r: RoundState, nodes: dict[str, Node]) -> None:
    answer_tolerantly(r, nodes, refit_banks, refit_exchanges, "send refit sums")


def decoded_sums(r: RoundState, state: dict, leaves: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The step's answers summed and decoded: (G, H, loss); a bank missing or malformed raises ``WireFormatError``."""
    uploads = []
    for bank in state["masking"]:
        path = refit_exchanges(r, bank)[0].answer
        if not path.exists():
            raise WireFormatError(f"{bank} sent no refit sums")
        answer = MaskedRefitSums.from_bytes(path.read_bytes())
        if answer.bank != bank or answer.session != state["session"]:
            raise WireFormatError(f"{bank}'s refit sums name {str(answer.bank)[:40]}/{str(answer.session)[:80]}")
        try:
            uploads.append(words_from_text(answer.words, 2 * leaves + 1))
        except SecureAggregationError as exc:
            raise WireFormatError(f"{bank}'s refit sums: {exc}") from None
    values = decode(unmasked_sum(uploads), leaf_refit.FRAC_BITS)
    return values[:leaves], values[leaves:2 * leaves], float(values[-1])


def step(r: RoundState) -> dict | None:
    """Sum the step's answers, check them, move every leaf; the next step, or the refitted candidate."""
    state = _state(r)
    if not state.get("masking") or state.get("done"):
        return None
    s = r.plan.settings
    model = r.ws.read_json(_task_path(r, state["step"]))["model"]
    leaves = leaf_refit.leaf_count(model)
    rows = sum(int(r.plan.counts.get(b, {}).get("train_rows", 0)) for b in state["masking"])
    try:
        G, H, loss = decoded_sums(r, state, leaves)
        leaf_refit.check_sums(model, G, H, rows)
    except (WireFormatError, leaf_refit.RefitError) as exc:
        _skip(r, f"step {state['step']}: {str(exc)[:300]}")
        return None
    state["loss"].append(loss / max(rows, 1))
    stepped = leaf_refit.newton_step(model, G, H, s.compaction_refit_lambda,
                                     s.compaction_refit_eta / max(1, len(model_json.trees(model))))
    state["step"] += 1
    if state["step"] < s.compaction_refit_steps:
        _save(r, state)
        _write_task(r, state, stepped)
        raise PhaseRerun("refit", f"leaf refit step {state['step'] + 1} of {s.compaction_refit_steps}")
    try:
        refitted = rebuild_model(stepped, r.plan.model_limits, r.plan.header)
    except ModelRefused as refused:
        _skip(r, f"the refitted model is refused by {refused.check}: {refused.detail}")
        return None
    state["done"] = True
    _save(r, state)
    write_bytes(model_json.to_bytes(refitted), r.path("working"))
    write_bytes(model_json.to_bytes(refitted), r.path("model"))
    r.ws.write_json(r.ws.read_json(_folder(r) / "provenance.json"), r.path("provenance"))
    summary = {key: state[key] for key in ("trees_before", "trees_after", "keep_per_block", "step", "loss")}
    summary.update(banks=state["masking"], eta=s.compaction_refit_eta, lam=s.compaction_refit_lambda)
    _record(r, summary)
    log.info("round %s: leaf refit %s -> %s trees, %s steps, training loss %.5f -> %.5f", r.round_id,
             state["trees_before"], state["trees_after"], state["step"], state["loss"][0], state["loss"][-1])
    if r.tracker is not None:
        with tracked_round(r):
            r.tracker.log_metrics(r.round_id, {"compaction.refit_trees_after": state["trees_after"],
                                               "compaction.refit_loss_first": state["loss"][0],
                                               "compaction.refit_loss_last": state["loss"][-1]})
    return summary
