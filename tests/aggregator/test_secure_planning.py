"""The masked planning counts over real nodes: summaries carry row counts only, the banks' label counts are summed
as pairwise-masked words, the consortium parameters equal those of the plaintext sums; a bank missing after
masking re-runs the exchange with the others (or fails it by name), two banks are refused on both sides."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import TOY_FEATURES, four_toy_banks, with_toy_data

from aggregator.drivers.embedded import embedded_credentials
from aggregator.protocol import secure_planning
from aggregator.protocol.errors import RoundFailed
from aggregator.protocol.plan import make_plan, summary_problem
from aggregator.protocol.state import RoundState
from aggregator.protocol.workspace import Workspace
from bank_node.node import BankNode
from fedfraud.secagg.masking import TooFewParties, words_from_text, words_to_text
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import MaskedCounts, MaskedCountsTask

BANKS = ["alpha", "beta", "delta", "gamma"]
REPORT = {"training_allowed": True, "decline_reasons": [], "event_time_min": "2026-01-01T00:00:00",
          "event_time_max": "2026-03-01T00:00:00"}


@pytest.fixture(scope="module")
def data(toy_banks):
    return four_toy_banks(toy_banks)


@pytest.fixture
def nodes(data, tmp_path):
    credentials = embedded_credentials(tmp_path / "pki", BANKS)
    found = {}
    for bank in BANKS:
        work = tmp_path / "banks" / bank
        (work / "validation").mkdir(parents=True)
        (work / "validation" / "report.json").write_text(json.dumps(REPORT))
        found[bank] = with_toy_data(BankNode(bank, work, work, config=None, secagg=credentials[bank]), *data[bank])
    return found


class Dropping:
    """A node that offers its key, then fails its masked counts (gone after masking began)."""

    def __init__(self, node):
        self.node, self.bank = node, node.bank

    def __getattr__(self, name):
        return getattr(self.node, name)

    def masked_counts(self, task_bytes: bytes) -> bytes:
        raise ConnectionError(f"{self.bank} is gone")


def planned(tmp_path, nodes, banks=BANKS, settings=FederationSettings()):
    ws = Workspace(tmp_path / "aggregator", "m")
    summaries = {b: nodes[b].summary() for b in banks}
    plan = make_plan(summaries, [], "m", "bagging", 1, 3, settings, {"hash": "h", "names": TOY_FEATURES}, None)
    return ws, plan


def plaintext_params(nodes, banks, settings=FederationSettings()):
    y = np.concatenate([nodes[b].data.y_train for b in banks])
    return consortium_params(settings, int(y.sum()), int(len(y) - y.sum()))


def test_a_summary_holds_row_counts_only_and_a_clear_label_count_is_refused(nodes):
    summary = nodes["alpha"].summary()
    assert set(summary["counts"]) == {"train_rows", "holdout_rows"}
    assert summary_problem(summary) is None
    for label_count in ("positives", "negatives", "holdout_positives"):
        leaky = {**summary, "counts": {**summary["counts"], label_count: 3}}
        check, detail = summary_problem(leaky)
        assert check == "invalid_counts" and f"counts.{label_count}" in detail and "only masked" in detail


def test_the_consortium_params_are_those_of_the_plaintext_sums(tmp_path, nodes):
    ws, plan = planned(tmp_path, nodes)
    assert plan.consortium_params == {} and not plan.is_settled
    with pytest.raises(RoundFailed, match="plan_unsettled"):
        RoundState(ws, plan, 1)
    settled = secure_planning.run(ws, plan, nodes)
    assert settled.is_settled and settled.banks == BANKS and settled.excluded == {}
    assert settled.consortium_params == plaintext_params(nodes, BANKS)
    assert settled.label_sums["holdout_positives"] == sum(int(nodes[b].data.y_holdout.sum()) for b in BANKS)
    assert json.loads(ws.plan_path.read_text())["consortium_params"] == settled.consortium_params
    # the aggregator holds random words only: no bank's counts appear in what it received
    folder = ws.root / "planning" / secure_planning.exchange_name(BANKS) / "attempt-1"
    for bank in BANKS:
        answer = MaskedCounts.from_bytes((folder / "answers" / f"{bank}.json").read_bytes())
        words = words_from_text(answer.words, 2).view(np.int64)
        counts = nodes[bank].data.counts()
        assert not np.array_equal(words, [counts["positives"], counts["holdout_positives"]])
        assert str(counts["positives"]) not in (folder / "answers" / f"{bank}.json").read_text().split('"')
    asked = []
    again = secure_planning.run_with(ws, plan, lambda exchanges: asked.append(exchanges))  # re-run: read back
    assert asked == [] and again.consortium_params == settled.consortium_params


def test_a_bank_missing_after_masking_reruns_with_the_others_under_fresh_keys(tmp_path, nodes):
    ws, plan = planned(tmp_path, nodes)
    dropping = {**nodes, "beta": Dropping(nodes["beta"])}
    settled = secure_planning.run(ws, plan, dropping)
    others = [b for b in BANKS if b != "beta"]
    assert settled.banks == others and settled.consortium_params == plaintext_params(nodes, others)
    assert settled.excluded["beta"].startswith("planning_counts_missing")
    assert len(settled.label_sums["sessions"]) == 2 and len(set(settled.label_sums["sessions"])) == 2
    record = json.loads((ws.root / "planning" / secure_planning.exchange_name(BANKS) / "attempts.json").read_text())
    assert record["attempt"] == 2 and record["banks"] == others and record["history"][0]["masking"] == BANKS


def test_a_bank_missing_with_three_fails_by_name_never_a_wrong_sum(tmp_path, nodes):
    banks = BANKS[:3]
    ws, plan = planned(tmp_path, nodes, banks)
    with pytest.raises(RoundFailed, match=r"masked_counts_incomplete: \['beta'\]"):
        secure_planning.run(ws, plan, {**nodes, "beta": Dropping(nodes["beta"])})
    assert not plan.is_settled and not ws.plan_path.exists()  # nothing settled, nothing written


def test_two_banks_are_refused_on_both_sides(tmp_path, nodes):
    ws, plan = planned(tmp_path, nodes, ["alpha", "beta"])
    with pytest.raises(RoundFailed, match="too_few_parties"):
        secure_planning.run(ws, plan, nodes)
    ws, plan = planned(tmp_path / "three", nodes, BANKS[:3])
    secure_planning.run(ws, plan, nodes)
    folder = ws.root / "planning" / secure_planning.exchange_name(BANKS[:3]) / "attempt-1"
    task = MaskedCountsTask.from_bytes((folder / "task.json").read_bytes())
    two = dataclasses.replace(task, banks=["alpha", "beta"], offers={b: task.offers[b] for b in ["alpha", "beta"]})
    with pytest.raises(TooFewParties, match="too_few_parties"):
        nodes["alpha"].masked_counts(two.to_bytes())


def test_a_sum_beyond_the_banks_rows_fails_by_name(tmp_path, nodes):
    ws, plan = planned(tmp_path, nodes, BANKS[:3])

    class Lying(Dropping):
        def masked_counts(self, task_bytes: bytes) -> bytes:
            answer = MaskedCounts.from_bytes(self.node.masked_counts(task_bytes))
            words = words_from_text(answer.words, 2)
            words[0] += np.uint64(10 ** 6)  # a million positives more than any bank has rows
            return dataclasses.replace(answer, words=words_to_text(words)).to_bytes()

    with pytest.raises(RoundFailed, match="masked_sum_invalid"):
        secure_planning.run(ws, plan, {**nodes, "beta": Lying(nodes["beta"])})


def test_the_bank_answers_the_same_words_again_and_never_other_counts_under_the_same_masks(tmp_path, nodes):
    ws, plan = planned(tmp_path, nodes, BANKS[:3])
    secure_planning.run(ws, plan, nodes)
    folder = ws.root / "planning" / secure_planning.exchange_name(BANKS[:3]) / "attempt-1"
    task = (folder / "task.json").read_bytes()
    assert nodes["alpha"].masked_counts(task) == (folder / "answers" / "alpha.json").read_bytes()
    data = nodes["alpha"].data
    nodes["alpha"].__dict__["data"] = dataclasses.replace(data, y_train=1 - data.y_train)  # other counts
    with pytest.raises(Exception, match="mask_reuse"):
        nodes["alpha"].masked_counts(task)


def test_the_federation_id_follows_the_sums_so_relabelled_rows_are_no_retry(tmp_path, nodes):
    ws, plan = planned(tmp_path / "first", nodes, BANKS[:3])
    first = secure_planning.run(ws, plan, nodes)
    ws, plan = planned(tmp_path / "again", nodes, BANKS[:3])
    assert secure_planning.run(ws, plan, nodes).federation_id == first.federation_id  # a retry is recognised
    data = nodes["alpha"].data
    nodes["alpha"].__dict__["data"] = dataclasses.replace(data, y_train=1 - data.y_train)  # same rows, new labels
    ws, plan = planned(tmp_path / "relabelled", nodes, BANKS[:3])
    assert secure_planning.run(ws, plan, nodes).federation_id != first.federation_id
