"""Numbers are typed and checked: summary counts at intake and planning, evaluation reports
before they are combined, hostile JSON at the service's intake (a named refusal, never a 500)."""

from __future__ import annotations

import json

import pytest
from conftest import bank_summary

from aggregator.evaluation import screen_reports
from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.plan import make_plan, summary_problem
from aggregator.service.intake import Refused, screen_upload
from fedfraud.scores import BINS
from fedfraud.settings import FederationSettings
from fedfraud.wire import EvaluationReport

COUNTS = {"train_rows": 7000, "holdout_rows": 2040}  # row counts only: label counts are summed masked


def summary(bank="alpha", **counts):
    return {**json.loads(bank_summary(bank)), "counts": {**COUNTS, **counts}}


@pytest.mark.parametrize("counts, check", [
    ({"train_rows": -5}, "invalid_counts"),
    ({"holdout_rows": 40.0}, "invalid_counts"),
    ({"train_rows": True}, "invalid_counts"),
    ({"train_rows": 7000 * 10 ** 12}, "invalid_counts"),  # beyond any bank
    ({"positives": 40}, "invalid_counts"),  # a label count in the clear: it leaves a bank only masked
    ({"holdout_positives": 12}, "invalid_counts"),
])
def test_bad_counts_are_refused_by_name_at_intake_and_at_planning(counts, check):
    bad = summary(**counts)
    assert summary_problem(bad)[0] == check
    with pytest.raises(Refused) as refused:
        screen_upload("summary", json.dumps(bad).encode(), "alpha", 0, 1 << 20)
    assert (refused.value.status, refused.value.check) == (422, check)
    contract = {"hash": bad["contract_hash"], "names": ["a", "b"]}
    plan = make_plan({"alpha": bad, "beta": summary("beta")}, [], "m", "bagging", 2, 0,
                     FederationSettings(min_banks=1), contract, None)
    assert plan.banks == ["beta"] and plan.excluded["alpha"].startswith(check)
    assert plan.counts == {"beta": COUNTS} and plan.train_rows == {"beta": 7000}
    with pytest.raises(RoundFailed, match="quorum"):  # never a math-domain error
        make_plan({"alpha": bad}, [], "m", "bagging", 2, 0, FederationSettings(min_banks=1), contract, None)


@pytest.mark.parametrize("body", [
    b"[" * 50_000,
    b'{"bank": "alpha", "counts": ' + b"9" * 5000 + b"}",
    b'{"bank": "alpha", "counts": {"positives": NaN}}',
    b"\xff\xfe",
])
def test_hostile_json_is_a_named_refusal_at_intake(body):
    for kind in ("summary", "train", "evaluate"):
        with pytest.raises(Refused) as refused:
            screen_upload(kind, body, "alpha", 1, 1 << 20)
        assert (refused.value.status, refused.value.check) == (400, "malformed")


def report(bank="alpha", model_id="m1", pos=12, neg=2028, **changes):
    hist_pos, hist_neg = [0] * BINS, [0] * BINS
    hist_pos[900], hist_neg[10] = pos, neg
    fields = dict(bank=bank, model_id=model_id, positives=pos, negatives=neg, metrics={"auprc": 0.5},
                  hist_pos=hist_pos, hist_neg=hist_neg)
    return json.dumps({**fields, **changes}).encode()


@pytest.mark.parametrize("data, check", [
    (report(model_id="other"), "wrong_model"),
    (report(bank="beta"), "wrong_sender"),
    (report(pos=12_000), "report_totals"),  # a forged report: more rows than its holdout has
    (report(hist_pos=[1] * 10), "report_shape"),
    (report(hist_neg=[-1] + [0] * (BINS - 1)), "report_shape"),
    (report(hist_neg=[0.5] * BINS), "report_shape"),
    (report(positives=-12), "report_counts"),
    (report(positives=13), "report_totals"),
    (report(pos=13, neg=2027), "passes"),  # rows as planned: its positives are not in the clear to compare
    (report(metrics={"auprc": 7.0}), "report_metrics"),
    (b'{"bank": "alpha"', "malformed_report"),
])
def test_each_bad_evaluation_report_is_excluded_by_name(data, check):
    good, rejections = screen_reports({"alpha": data, "beta": report("beta")}, "m1", {"alpha": COUNTS, "beta": COUNTS})
    if check == "passes":
        assert [r.bank for r in good] == ["alpha", "beta"] and rejections == []
        return
    assert [r.bank for r in good] == ["beta"]
    assert [(x["bank"], x["check"]) for x in rejections] == [("alpha", check)]


def test_a_sound_report_is_combined():
    good, rejections = screen_reports({"alpha": report()}, "m1", {"alpha": COUNTS})
    assert rejections == [] and isinstance(good[0], EvaluationReport)
    good, rejections = screen_reports({"gamma": report("gamma")}, "m1", {"alpha": COUNTS})
    assert rejections[0]["check"] == "unexpected_bank"
