"""The acceptance gate on hand-made score answers: a δ scaled to the evaluators' frauds, and the second
leave-one-out pass after a refusal (``aggregator/protocol/acceptance.py``).

Each of five banks answers with reports on a holdout of 18 frauds in 2,000 rows (90 pooled, the
README bench's scale). A variant's AUPRC is set by how many frauds it ranks in the top bin alone.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import TOY_FEATURES

from aggregator.protocol import acceptance, records
from aggregator.protocol.errors import PhaseRerun
from aggregator.protocol.plan import Plan
from aggregator.protocol.state import RoundState
from aggregator.protocol.workspace import Workspace
from fedfraud import crosscheck
from fedfraud.crosscheck import ScoreAnswer, ScoreQuestion
from fedfraud.scores import BINS
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import EvaluationReport

BANKS = ["alpine", "baltic", "celtic", "danube", "elbe"]
FRAUDS, LEGIT = 18, 1982
PARAMS = {**consortium_params(FederationSettings(max_depth=3), 50, 500), "seed": 1}


def report(bank: str, top: float) -> EvaluationReport:
    """A holdout report whose share ``top`` of the frauds score above every legitimate row."""
    pos, neg = [0] * BINS, [0] * BINS
    pos[-1] = round(top * FRAUDS)
    pos[0], neg[0] = FRAUDS - pos[-1], LEGIT
    return EvaluationReport(bank, "m", FRAUDS, LEGIT, {}, pos, neg)


def round_state(tmp_path, settings: FederationSettings) -> RoundState:
    counts = {b: {"train_rows": 10_000, "holdout_rows": FRAUDS + LEGIT} for b in BANKS}
    settings = dataclasses.replace(settings, acceptance_masked=False)  # clear reports (masked: test_acceptance_round)
    plan = Plan(model_name="m", strategy="bagging", rounds=1, seed=1, settings=settings, contract_hash="h",
                feature_names=TOY_FEATURES, banks=list(BANKS), excluded={}, consortium_params=PARAMS,
                federation_id="fed0", counts=counts)
    return RoundState(Workspace(tmp_path / "aggregator", "m"), plan, 1)


def stage(tmp_path, variants: dict[str, float], settings=FederationSettings(), paired: bool = True,
          honest_default: float = 0.5) -> RoundState:
    """A stage in which every bank's update (one tree each) passed the checks and every bank answered:
    ``variants`` gives a variant's top share at every holdout (absent variants score as with_all). Pair
    variants are answered only when the gate asks its second question (``gate``, below)."""
    r = round_state(tmp_path, settings)
    labels = [acceptance.WITH_ALL] + [acceptance._without(b) for b in BANKS]
    question = ScoreQuestion(1, "accept", {label: {"model": "candidate", "drop": []} for label in labels},
                             {"candidate": {}})
    r.ws.write_json({"participants": BANKS, "rejections": [], "stage_accepted": BANKS}, r.path("checks"))
    r.ws.write_json({"banks": BANKS, "trees": {b: [i] for i, b in enumerate(BANKS)}, "total": len(BANKS),
                     "second_pass": paired, "shares": variants, "default": honest_default},
                    acceptance.judged_path(r))
    acceptance.question_path(r).parent.mkdir(parents=True, exist_ok=True)
    acceptance.question_path(r).write_bytes(question.to_bytes())
    answer_all(r, labels, acceptance.answer_path)
    return r


def answer_all(r: RoundState, labels: list[str], where) -> None:
    """Every bank answers ``labels`` with the stage's shares."""
    judged = r.ws.read_json(acceptance.judged_path(r))
    shares, default = judged["shares"], judged["shares"].get(acceptance.WITH_ALL, judged["default"])
    for bank in BANKS:
        answer = ScoreAnswer(bank, 1, "accept", {label: dataclasses.asdict(report(bank, shares.get(label, default)))
                                                 for label in labels})
        where(r, bank).parent.mkdir(parents=True, exist_ok=True)
        where(r, bank).write_bytes(answer.to_bytes())


def gate(r: RoundState) -> bool:
    """The gate, as a driver runs it: a second question is answered by every bank, then the gate runs again.
    True when the second question was asked."""
    try:
        acceptance.gate(r)
        return False
    except PhaseRerun as rerun:
        assert rerun.phase == "accept"
        question = ScoreQuestion.from_bytes(acceptance.pairs_question_path(r).read_bytes())
        answer_all(r, sorted(question.variants), acceptance.pairs_answer_path)
        acceptance.gate(r)
        return True


def refused(r: RoundState) -> list[str]:
    return sorted(x["bank"] for x in r.ws.read_json(r.path("checks"))["rejections"]
                  if x["check"] == acceptance.REFUSED)


def rows(r: RoundState) -> dict[str, dict]:
    return records.read_acceptance(r.ws, 1)["stages"][0]["banks"]


# ---- the allowed drop ----------------------------------------------------------------------------


def test_auto_delta_is_z_standard_errors_of_the_drop_on_the_pooled_frauds():
    settings = FederationSettings()  # the default: "auto", z = 2, floor 0.01
    assert settings.acceptance_delta == "auto"
    delta = acceptance.allowed_drop(settings, 0.45, 0.50, 72)
    assert delta == pytest.approx(2 * math.sqrt((0.45 * 0.55 + 0.5 * 0.5) / 72))
    assert 0.16 < delta < 0.17  # ~90 frauds, four evaluators of five: far above a fixed 0.05
    assert acceptance.allowed_drop(settings, 0.45, 0.50, 7200) == pytest.approx(delta / 10)  # shrinks as 1/sqrt(n)
    assert acceptance.allowed_drop(settings, 0.999, 1.0, 10 ** 6) == 0.01  # the floor
    assert acceptance.allowed_drop(dataclasses.replace(settings, acceptance_z=3.0), 0.45, 0.5, 72) == \
        pytest.approx(1.5 * delta)


def test_fixed_and_off_deltas_and_nothing_to_judge():
    assert acceptance.allowed_drop(FederationSettings(acceptance_delta=0.05), 0.4, 0.9, 72) == 0.05
    assert acceptance.allowed_drop(FederationSettings(acceptance_delta=None), 0.4, 0.9, 72) is None
    assert acceptance.allowed_drop(FederationSettings(), 0.4, 0.9, 0) is None  # no frauds: nothing judged
    assert acceptance.allowed_drop(FederationSettings(), math.nan, 0.9, 72) is None


# ---- the gate --------------------------------------------------------------------------------------


def test_auto_delta_keeps_an_honest_bank_a_fixed_0_05_refused_and_still_refuses_a_destructive_update(tmp_path):
    # alpine's trees move the others' AUPRC by 0.06 (the noise of ~90 frauds); baltic's by 0.40
    variants = {acceptance.WITH_ALL: 0.5, acceptance._without("alpine"): 0.56, acceptance._without("baltic"): 0.9}
    fixed = stage(tmp_path / "fixed", variants, FederationSettings(acceptance_delta=0.05), paired=False)
    gate(fixed)
    assert refused(fixed) == ["alpine", "baltic"]
    auto = stage(tmp_path / "auto", variants)
    gate(auto)
    assert refused(auto) == ["baltic"]
    row = rows(auto)["alpine"]
    assert row["others_positives"] == 4 * FRAUDS
    assert row["allowed_drop"] == pytest.approx(acceptance.allowed_drop(
        FederationSettings(), row["others_with"], row["others_without"], 4 * FRAUDS))
    assert row["others_without"] - row["others_with"] < row["allowed_drop"]
    checks = auto.ws.read_json(auto.path("checks"))
    assert "baltic" not in checks["stage_accepted"] and "baltic" not in checks["participants"]
    detail = next(x["detail"] for x in checks["rejections"] if x["bank"] == "baltic")
    assert "first pass" in detail and "72 frauds" in detail and "allowed drop" in detail


def test_the_second_pass_rejudges_the_others_without_the_worst_bank(tmp_path):
    # with the poisoner baltic in the pool, alpine's trees look degrading (0.40 -> 0.70 without them);
    # without baltic, alpine's trees help (0.85 with, 0.78 without)
    variants = {acceptance.WITH_ALL: 0.4, acceptance._without("baltic"): 0.85, acceptance._without("alpine"): 0.7,
                acceptance._without("alpine", "baltic"): 0.78}
    for b in BANKS[2:]:
        variants[acceptance._without(b, "baltic")] = 0.85
    one_pass = stage(tmp_path / "one", variants, paired=False)
    gate(one_pass)
    assert refused(one_pass) == ["alpine", "baltic"]  # the first pass alone refuses the honest bank too
    r = stage(tmp_path / "two", variants)
    assert gate(r)  # the pairs are asked only now, of the banks that answered
    assert refused(r) == ["baltic"]
    asked = r.ws.read_json(acceptance.judged_path(r))["pairs"]
    assert asked == {"without": "baltic", "asked": BANKS}
    pairs = ScoreQuestion.from_bytes(acceptance.pairs_question_path(r).read_bytes())
    assert sorted(pairs.variants) == sorted([acceptance._without("baltic")] + [
        acceptance._without(b, "baltic") for b in BANKS if b != "baltic"])
    assert pairs.variants[acceptance._without("alpine", "baltic")]["drop"] == [0, 1]
    second = rows(r)["alpine"]["second_pass"]
    assert second["without"] == "baltic" and second["evaluators"] == ["celtic", "danube", "elbe"]
    assert second["others_positives"] == 3 * FRAUDS and second["allowed_drop"] > 0
    assert second["others_with"] > second["others_without"]
    assert "second_pass" not in rows(r)["baltic"]
    assert records.read_acceptance(r.ws, 1)["stages"][0]["refused"] == ["baltic"]


def test_the_second_pass_still_refuses_a_second_degrading_bank(tmp_path):
    variants = {acceptance.WITH_ALL: 0.3, acceptance._without("baltic"): 0.7, acceptance._without("celtic"): 0.6,
                acceptance._without("baltic", "celtic"): 1.0}
    for b in ("alpine", "danube", "elbe"):
        variants[acceptance._without(b, "baltic")] = 0.7
    r = stage(tmp_path, variants)
    gate(r)
    assert refused(r) == ["baltic", "celtic"]
    details = {x["bank"]: x["detail"] for x in r.ws.read_json(r.path("checks"))["rejections"]}
    assert details["baltic"].startswith("first pass") and details["celtic"].startswith("second pass, without baltic")


def test_without_refusals_there_is_no_second_pass_and_contributions_are_recorded(tmp_path):
    variants = {acceptance.WITH_ALL: 0.6, acceptance._without("alpine"): 0.5}
    r = stage(tmp_path, variants)
    assert not gate(r)  # no second question
    assert not acceptance.pairs_question_path(r).exists()
    assert refused(r) == [] and not r.ws.read_json(r.path("checks"))["rejections"]
    assert all("second_pass" not in row and row["allowed_drop"] > 0 for row in rows(r).values())
    assert records.contributions(r.ws, 1)["alpine"] == pytest.approx(
        crosscheck.auprc([report(b, 0.6) for b in BANKS]) - crosscheck.auprc([report(b, 0.5) for b in BANKS]))


def test_delta_off_measures_only(tmp_path):
    r = stage(tmp_path, {acceptance.WITH_ALL: 0.2, acceptance._without("baltic"): 0.9},
              FederationSettings(acceptance_delta=None), paired=False)
    gate(r)
    assert refused(r) == [] and rows(r)["baltic"]["allowed_drop"] is None
    assert rows(r)["baltic"]["contribution"] < -0.5


def test_a_rerun_gate_gives_the_same_verdict(tmp_path):
    variants = {acceptance.WITH_ALL: 0.3, acceptance._without("baltic"): 0.7, acceptance._without("celtic"): 0.6,
                acceptance._without("baltic", "celtic"): 1.0}
    r = stage(tmp_path, variants)
    gate(r)
    first = r.ws.read_json(r.path("checks"))
    gate(r)  # e.g. the aggregator restarted after the gate wrote its verdict
    assert r.ws.read_json(r.path("checks")) == first
    assert len(records.read_acceptance(r.ws, 1)["stages"]) == 1


@pytest.mark.parametrize("field, value", [
    ("acceptance_delta", "bogus"), ("acceptance_delta", -0.1), ("acceptance_delta", 1.5),
    ("acceptance_delta", True), ("acceptance_delta", math.nan),
    ("acceptance_z", 0), ("acceptance_z", "2"), ("acceptance_z", math.inf), ("acceptance_z", False),
    ("acceptance_delta_floor", -0.01), ("acceptance_delta_floor", 1.0), ("acceptance_delta_floor", None),
])
def test_acceptance_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        FederationSettings(**{field: value})
