"""The training half of a round: configure -> train at banks -> check -> aggregate -> candidate.

The first four run once per stage (cyclic: once per bank's turn). Between phases everything
lives in the round's workspace folder: tasks/, updates/, failures/, ``checks.json`` (accepted
banks and named rejections so far), updates-checked/ (each accepted update as ``check`` rebuilt
it: the only bytes a strategy aggregates), ``working.json`` (the model aggregated so far,
rebuilt within the plan's model limits) and ``working-rebuilt.json`` (that file's sha256 and tree
count: the next stage rebuilds only its own trees).
"""

from __future__ import annotations

import hashlib
import logging

from aggregator.checks import Rejection, RoundContext, screen
from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.registry import tracked_round
from aggregator.protocol import model_refs, traffic
from aggregator.protocol.state import Exchange, Node, RoundState, store_carried
from fedfraud import model_json
from fedfraud.model_guard import ModelLimits, ModelRefused, rebuild_model
from fedfraud.protocol import TaskKind, Tag
from fedfraud.wire import ModelUpdate, TrainTask
from pipelines.io import write_bytes

log = logging.getLogger("fedfraud.rounds")


def configure(r: RoundState) -> None:
    """Every bank of the stage gets its task: trees on top of the round's working model."""
    base = r.ws.working_model(r.round_id)
    for bank in r.stage:
        task = r.strategy.configure(r.round_id, bank, r.plan.bank_index(bank), base, r.plan.contract_hash)
        write_bytes(task.to_bytes(), r.path("tasks", bank))


def train_banks(r: RoundState) -> list[str]:
    return list(r.stage)


def train_exchanges(r: RoundState, bank: str) -> list[Exchange]:
    return [Exchange(TaskKind.TRAIN, bank, r.path("tasks", bank), r.path("updates", bank))]


def train(r: RoundState, nodes: dict[str, Node]) -> None:
    """The stage's banks train (each alone, or all together for a collective strategy); a bank that
    fails is recorded by name and does not sink the stage."""
    sent = {b: r.path("tasks", b).read_bytes() for b in r.stage}  # as ``configure`` wrote them: sent as they are
    if r.strategy.collective:  # the stage's banks build every tree together
        tasks = {b: TrainTask.from_bytes(data) for b, data in sent.items()}
        received, left_out = r.strategy.train_collective(nodes, tasks, r.round_id, r.on_progress)
        for bank, data in received.items():
            if traffic.in_process(nodes[bank]):  # task and session in, update out (the service counts its tasks)
                traffic.record(r.path("updates", bank), bank, received=getattr(r.strategy, "asked", {}).get(bank, 0),
                               sent=len(data))
            write_bytes(data, r.path("updates", bank))
        for rejection in left_out:
            r.ws.write_json(rejection.as_dict(), r.path("failures", rejection.bank))
        if getattr(r.strategy, "last_timings", None):  # where the stage's time went; a kept or a new world
            r.ws.write_json(r.strategy.last_timings, r.path("collective"))
        store_carried(r.ws, r.plan, r.strategy)  # a strategy built per round (Airflow) bins as this one did
        return
    for bank, task_bytes in sent.items():
        r.on_progress(f"round {r.round_id}: {bank} trains {r.strategy.settings.trees_per_round} trees")
        try:
            update, received = model_refs.ask(r, TaskKind.TRAIN, bank, task_bytes, nodes[bank].train)
            if traffic.in_process(nodes[bank]):
                traffic.record(r.path("updates", bank), bank, received=received, sent=len(update))
            write_bytes(update, r.path("updates", bank))
        except Exception as exc:  # a bank failing must not sink the round while quorum holds
            log.warning("bank %s failed in round %s: %s", bank, r.round_id, exc)
            failure = Rejection(bank, "bank_failed", f"{exc.__class__.__name__}: {exc}")
            r.ws.write_json(failure.as_dict(), r.path("failures", bank))


def checks(r: RoundState) -> dict:
    """The round's verdicts so far: ``participants`` (accepted), ``rejections``, ``stage_accepted``."""
    path = r.path("checks")
    return r.ws.read_json(path) if path.exists() else {"participants": [], "rejections": [], "stage_accepted": []}


def check(r: RoundState) -> None:
    """Screen every update not judged yet by the named checks; a stage bank without one is named too."""
    verdict = checks(r)
    decided = set(verdict["participants"]) | {x["bank"] for x in verdict["rejections"]}
    received = {b: data for b, data in r.ws.messages(r.round_id, "updates").items() if b not in decided}
    base_id = r.ws.working_model_id(r.round_id)
    ctx = RoundContext.for_stage(r.round_id, r.plan, r.stage, base_id, verdict["participants"])
    accepted, rejections = screen(received, ctx)
    for update in accepted:  # as rebuilt: aggregation never re-reads what a bank sent
        write_bytes(update.to_bytes(), r.path(CHECKED, update.bank))
        if r.strategy.collective:  # the bank's own count of its round's collectives (traffic.py)
            traffic.reported_collectives(r.path(traffic.COLLECTIVES, update.bank), update.bank, update.collective_bytes)
    for bank in (b for b in r.stage if b not in received and b not in decided):
        failure = r.path("failures", bank)
        rejections.append(Rejection(**r.ws.read_json(failure)) if failure.exists() else _missing(bank))
    for x in rejections:
        log.warning("round %s: %s rejected by %s: %s", r.round_id, x.bank, x.check, x.detail)
    r.ws.write_json({"participants": sorted(verdict["participants"] + [u.bank for u in accepted]),
                     "rejections": verdict["rejections"] + [x.as_dict() for x in rejections],
                     "stage_accepted": sorted(u.bank for u in accepted)}, r.path("checks"))


def aggregate(r: RoundState) -> None:
    """The stage's accepted updates (as ``check`` rebuilt them) join the working model through the
    strategy; the result is rebuilt within the plan's model limits, else the round fails by name."""
    accepted = [ModelUpdate.from_bytes(r.path(CHECKED, b).read_bytes(), max_bytes=r.plan.model_limits.max_bytes)
                for b in checks(r)["stage_accepted"]]
    if accepted:
        base = r.ws.working_model(r.round_id)
        doc = r.strategy.aggregate(base, accepted, r.banks)
        try:
            doc = rebuild_model(doc, r.plan.model_limits, r.plan.header, _rebuilt_here(r, base, doc))
        except ModelRefused as refused:
            raise RoundFailed(f"round {r.round_id}: the aggregated model is refused by {refused.check}: "
                              f"{refused.detail}") from None
        raw = model_json.to_bytes(doc)
        write_bytes(raw, r.path("working"))
        r.ws.write_json({"sha256": hashlib.sha256(raw).hexdigest(), "trees": len(model_json.trees(doc))},
                        r.path(REBUILT))


def _rebuilt_here(r: RoundState, base: dict | None, doc: dict) -> int:
    """How many leading trees of ``doc`` are the working model's as this phase rebuilt and wrote it at the
    last stage (its record names the file's sha256), unchanged: those need no second rebuild, so a cyclic
    turn rebuilds its own trees only. 0 when anything else wrote the working model (compaction, a refit)."""
    record, working = r.path(REBUILT), r.path("working")
    if base is None or not record.exists() or not working.exists():
        return 0
    mine = r.ws.read_json(record)
    if mine.get("sha256") != hashlib.sha256(working.read_bytes()).hexdigest():
        return 0
    kept, before, after = mine.get("trees", 0), model_json.trees(base), model_json.trees(doc)
    if not (isinstance(kept, int) and kept == len(before) <= len(after)
            and all(a is b for a, b in zip(before, after))):
        return 0
    return kept


def publish_candidate(r: RoundState) -> dict:
    """Quorum check, then the candidate (and the champion to compare with) for the banks to evaluate."""
    verdict = checks(r)
    participants, rejections = verdict["participants"], verdict["rejections"]
    r.path("model").unlink(missing_ok=True)
    outcome = {"participants": participants, "rejections": rejections, "accepted": False}
    r.ws.write_json(outcome, r.path("outcome"))
    if len(participants) < r.plan.settings.min_banks or not r.path("working").exists():
        with tracked_round(r):  # a failed round's rejections go to MLflow too
            r.tracker.log_rejections(r.round_id, rejections)
        raise RoundFailed(f"round {r.round_id}: {len(participants)} accepted update(s), quorum is "
                          f"{r.plan.settings.min_banks}; rejected: {rejections}")
    stale = False
    r.path("champion").unlink(missing_ok=True)
    version = r.tracker.champion_version()
    if version is not None:
        stale = r.tracker.version_tags(version).get(Tag.FEATURE_CONTRACT_HASH) != r.plan.contract_hash
        if not stale:  # validated against this federation's contract and rebuilt before anyone loads it
            try:
                _, doc = r.tracker.champion_model(ModelLimits.accepted(), r.plan.feature_names)
                write_bytes(model_json.to_bytes(doc), r.path("champion"))
            except ModelRefused as refused:
                log.warning("round %s: champion v%s refused by %s: %s", r.round_id, version, refused.check,
                            refused.detail)
                outcome["champion_refused"] = f"{refused.check}: {refused.detail}"
                stale = True  # a champion that cannot be loaded safely cannot hold its place
    outcome["champion_stale"], outcome["accepted"] = stale, True
    r.ws.write_json(outcome, r.path("outcome"))
    write_bytes(r.path("working").read_bytes(), r.path("model"))  # last: banks may now evaluate
    return outcome


CHECKED = "updates-checked"
REBUILT = "working-rebuilt"  # the working model's sha256 and trees, as ``aggregate`` rebuilt and wrote it


def _missing(bank: str) -> Rejection:
    return Rejection(bank, "no_update", "no update arrived (the bank's task failed or timed out)")
