"""The histogram strategy's grid counts under secure aggregation, on real toy BankNodes with consortium
certificates: the aggregator decodes the pooled counts only, and they give the plaintext path's edges; a single
bank's upload is random words; two banks are refused on both sides; a bank that drops after masking costs a new
attempt under fresh keys, or the round fails by name; a sum that is not counts fails by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_histogram import FEATURES, SETTINGS, TOY_BANKS, certify, make_strategy, toy_node, toy_rows

from aggregator.drivers.embedded import train_round
from aggregator.protocol.errors import RoundFailed
from aggregator.strategies import histogram_bins
from bank_node.policy import TaskRefused
from fedfraud.binning import BinCounts, GlobalBins, count_cells
from fedfraud.grid_counts import GridCountTask, GridLayout, MaskedGridCounts
from fedfraud.secagg.masking import (
    MaskReuse, TooFewParties, decode_counts, encode_counts, unmasked_sum, words_to_text,
)
from fedfraud.wire import KeyRequest


@pytest.fixture
def toy(tmp_path):
    rng = np.random.default_rng(17)
    contract = {"names": FEATURES, "hash": "c" * 64}
    nodes = {bank: toy_node(tmp_path, bank, *toy_rows(rng, rows, shift), contract) for bank, rows, shift in TOY_BANKS}
    certify(nodes, tmp_path / "pki")
    return nodes, contract


class Recorded:
    """A bank whose grid-count answers are kept; ``drop`` makes it fail its grid counts (after its key offer)
    in the attempts listed; ``lie`` adds a mask no peer cancels (as if masked with other keys)."""

    def __init__(self, node, drop=(), lie=False):
        self.node, self.bank, self.drop, self.lie = node, node.bank, set(drop), lie
        self.tasks: list[GridCountTask] = []
        self.answers: list[bytes] = []

    def __getattr__(self, name):
        return getattr(self.node, name)

    def bin_counts(self, task_bytes: bytes) -> bytes:
        task = GridCountTask.from_bytes(task_bytes)
        self.tasks.append(task)
        if len(self.tasks) in self.drop:
            raise ConnectionError(f"{self.bank} went away after masking")
        answer = self.node.bin_counts(task_bytes)
        if self.lie:
            parsed = json.loads(answer)
            words = MaskedGridCounts(**parsed).word_array(GridLayout().words_per_feature)
            other_mask = np.random.default_rng(0).integers(0, 2**64, len(words), dtype=np.uint64)
            answer = MaskedGridCounts(self.bank, parsed["session"], words_to_text(words + other_mask)).to_bytes()
        self.answers.append(answer)
        return answer


def plaintext_bins(nodes, banks, max_bin=SETTINGS.max_bin) -> GlobalBins:
    """Today's plaintext path: sparse grid counts of each bank, pooled."""
    return GlobalBins.from_counts([BinCounts(b, 7, count_cells(nodes[b].data.X_train)) for b in banks], max_bin)


def test_the_aggregator_decodes_the_pooled_counts_only_and_derives_the_plaintext_edges(toy):
    nodes, _ = toy
    recorded = {b: Recorded(n) for b, n in nodes.items()}
    strategy = make_strategy(nodes)
    bins = strategy.shared_bins(recorded, sorted(nodes))
    assert bins.digest == plaintext_bins(nodes, sorted(nodes)).digest
    layout = strategy.grid_layout
    uploads = []
    for bank, node in recorded.items():
        [task], [answer] = node.tasks, node.answers
        assert task.banks == sorted(nodes) and task.session.startswith("grid:") and ":a1:" in task.session
        words = MaskedGridCounts.from_bytes(answer).word_array(layout.words_per_feature)
        plain = encode_counts(layout.dense_counts(nodes[bank].data.X_train).reshape(-1))
        assert len(words) == layout.words(len(FEATURES)) and not np.array_equal(words, plain)
        ones = float(np.unpackbits(np.frombuffer(words.astype("<u8").tobytes(), np.uint8)).mean())
        assert abs(ones - 0.5) < 0.003, (bank, ones)  # uniformly random words; the plaintext is mostly zero bits
        uploads.append(words)
    pooled = decode_counts(unmasked_sum(uploads)).reshape(len(FEATURES), -1)
    assert np.array_equal(pooled, sum(layout.dense_counts(n.data.X_train) for n in nodes.values()))
    # the same task again gets the same answer; another layout in the same session is refused
    alpha = recorded["alpha"]
    assert nodes["alpha"].bin_counts(alpha.tasks[0].to_bytes()) == alpha.answers[0]
    other = GridCountTask(alpha.tasks[0].session, alpha.tasks[0].banks, alpha.tasks[0].offers,
                          GridLayout(exponent_min=-8).to_dict())
    with pytest.raises(MaskReuse, match="mask_reuse"):
        nodes["alpha"].bin_counts(other.to_bytes())


def test_two_banks_are_refused_by_the_aggregator_and_by_each_bank(toy):
    nodes, _ = toy
    two = {b: nodes[b] for b in ("alpha", "beta")}
    with pytest.raises(RoundFailed, match="too_few_parties: 2 bank\\(s\\) left for masked grid counts"):
        make_strategy(two).shared_bins(two, sorted(two))
    with pytest.raises(TooFewParties, match="too_few_parties"):  # a bank makes no key offer for two
        nodes["alpha"].offer(KeyRequest("grid:t:r1:a1:00", ["alpha", "beta"]).to_bytes())
    session, banks = "grid:t:r1:a1:01", ["alpha", "beta", "gamma"]
    offers = {b: json.loads(nodes[b].offer(KeyRequest(session, banks).to_bytes())) for b in banks}
    pair = {b: offers[b] for b in ("alpha", "beta")}
    with pytest.raises(TooFewParties, match="too_few_parties"):  # nor masks for two
        nodes["alpha"].bin_counts(GridCountTask(session, ["alpha", "beta"], pair, GridLayout().to_dict()).to_bytes())
    huge = GridLayout(mantissa_bits=10, exponent_min=-100, exponent_max=100).to_dict()
    with pytest.raises(TaskRefused, match="grid_too_large"):
        nodes["alpha"].bin_counts(GridCountTask(session, banks, offers, huge).to_bytes())


def test_a_bank_that_drops_after_masking_costs_an_attempt_under_fresh_keys(toy):
    nodes, _ = toy
    recorded = {b: Recorded(n, drop={1} if b == "beta" else ()) for b, n in nodes.items()}
    strategy = make_strategy(nodes)
    bins = strategy.shared_bins(recorded, sorted(nodes))
    survivors = ["alpha", "delta", "gamma"]
    assert strategy.grid_banks == survivors
    assert [(f["bank"], f["check"]) for f in strategy.grid_faults] == [("beta", "masked_grid_counts_missing")]
    assert bins.digest == plaintext_bins(nodes, survivors).digest  # the survivors' counts, exactly
    first, second = recorded["alpha"].tasks
    assert ":a1:" in first.session and ":a2:" in second.session and second.banks == survivors
    assert first.offers["alpha"]["public_key"] != second.offers["alpha"]["public_key"]  # fresh keys
    assert len(recorded["beta"].tasks) == 1  # not asked again


def test_too_few_survivors_or_too_many_attempts_fail_by_name(toy, monkeypatch):
    nodes, _ = toy
    two_drop = {b: Recorded(n, drop={1} if b in ("beta", "gamma") else ()) for b, n in nodes.items()}
    with pytest.raises(RoundFailed, match="too_few_parties: 2 bank\\(s\\) left") as failed:
        make_strategy(nodes).shared_bins(two_drop, sorted(nodes))
    assert "beta" in str(failed.value) and "gamma" in str(failed.value)
    monkeypatch.setattr(histogram_bins, "MAX_ATTEMPTS", 1)
    one_drop = {b: Recorded(n, drop={1} if b == "delta" else ()) for b, n in nodes.items()}
    with pytest.raises(RoundFailed, match="grid_counts_incomplete: a bank dropped in each of 1 attempts") as failed:
        make_strategy(nodes).shared_bins(one_drop, sorted(nodes))
    assert "delta" in str(failed.value)


def test_a_sum_that_is_not_counts_fails_by_name(toy):
    nodes, _ = toy
    lying = {b: Recorded(n, lie=b == "gamma") for b, n in nodes.items()}
    with pytest.raises(RoundFailed, match="grid_sum_invalid"):
        make_strategy(nodes).shared_bins(lying, sorted(nodes))


def test_a_key_offer_for_another_session_leaves_the_bank_out(toy):
    nodes, _ = toy

    class WrongSession(Recorded):
        def offer(self, request_bytes):
            request = json.loads(request_bytes)
            return self.node.offer(KeyRequest(request["session"] + "x", request["banks"]).to_bytes())

    banks = {**{b: Recorded(n) for b, n in nodes.items()}, "gamma": WrongSession(nodes["gamma"])}
    strategy = make_strategy(nodes)
    bins = strategy.shared_bins(banks, sorted(nodes))
    assert strategy.grid_banks == ["alpha", "beta", "delta"] and banks["gamma"].tasks == []
    assert [(f["bank"], f["check"]) for f in strategy.grid_faults] == [("gamma", "grid_key_offer_missing")]
    assert bins.digest == plaintext_bins(nodes, ["alpha", "beta", "delta"]).digest


def test_a_bank_left_out_of_the_grid_counts_is_left_out_of_the_round(toy):
    nodes, contract = toy
    banks = {b: Recorded(n, drop={1} if b == "gamma" else ()) for b, n in nodes.items()}
    strategy = make_strategy(nodes)
    doc, participants, rejections = train_round(banks, strategy, sorted(nodes), 1, None, contract, SETTINGS)
    assert participants == {"alpha", "beta", "delta"}
    assert [(r.bank, r.check) for r in rejections] == [("gamma", "masked_grid_counts_missing")]
    assert strategy.bins.digest == plaintext_bins(nodes, ["alpha", "beta", "delta"]).digest
