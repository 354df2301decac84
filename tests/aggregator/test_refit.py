"""Compaction's leaf refit, in process with real bank nodes and a real consortium PKI: the cut model's leaves move
by damped Newton steps on the banks' masked per-leaf sums, the pooled training loss falls, the aggregator never
holds one bank's sums; malformed or impossible sums are refused by name and the round keeps its uncut model;
the same inputs give the same model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import TOY_FEATURES, assert_masked, four_toy_banks, masked_toy_nodes, toy_counts, toy_label_sums

from aggregator.protocol import refit
from aggregator.protocol.errors import PhaseRerun
from aggregator.protocol.plan import Plan
from aggregator.protocol.state import RoundState
from aggregator.protocol.workspace import Workspace
from bank_node import masked_refit
from bank_node.training import dmatrix
from fedfraud import leaf_refit, model_json
from fedfraud.model_guard import ModelLimits, consortium_header, rebuild_model
from fedfraud.secagg.keys import KeyAgreementRefused
from fedfraud.secagg.masking import MaskReuse, encode, words_from_text
from fedfraud.settings import FederationSettings, consortium_params
from fedfraud.wire import KeyRequest, MaskedRefitSums, ModelUpdate, RefitTask, TrainTask

PARAMS = {**consortium_params(FederationSettings(max_depth=3), 50, 500), "seed": 1}
BANKS = ["alpha", "beta", "delta", "gamma"]
SETTINGS = FederationSettings(trees_per_round=4, compaction_refit=True, compaction_refit_every=1,
                              compaction_refit_keep=0.5, compaction_refit_steps=4)


@pytest.fixture(scope="module")
def data(toy_banks):
    return four_toy_banks(toy_banks)


@pytest.fixture
def nodes(data, tmp_path):
    return masked_toy_nodes(data, tmp_path, BANKS)


def bagged(nodes) -> tuple[dict, list]:
    """Every bank's 4 trees, scaled by 1/4 and appended (bagging's round 1), and their provenance."""
    docs = []
    for bank in BANKS:
        task = TrainTask(bank=bank, round_id=1, base_model_id="none", contract_hash="h", num_trees=4, params=PARAMS)
        docs.append(model_json.scale_leaves(ModelUpdate.from_bytes(nodes[bank].train(task.to_bytes())).model, 0.25))
    doc = model_json.append_trees(model_json.empty_like(docs[0]), *docs)
    return rebuild_model(doc, ModelLimits.for_depth(3), consortium_header(TOY_FEATURES, PARAMS)), \
        [[1, bank, 0.25] for bank in BANKS for _ in range(4)]


def round_state(root, nodes, settings=SETTINGS) -> RoundState:
    plan = Plan(model_name="m", strategy="bagging", rounds=1, seed=1, settings=settings, contract_hash="h",
                feature_names=TOY_FEATURES, banks=list(BANKS), excluded={}, consortium_params=PARAMS,
                federation_id="fed0", counts=toy_counts(nodes, BANKS), label_sums=toy_label_sums(nodes, BANKS))
    r = RoundState(Workspace(root, "m"), plan, 1)
    doc, origins = bagged(nodes)
    for kind in ("model", "working"):
        r.ws.write_json(doc, r.path(kind))
    r.ws.write_json(origins, r.path("provenance"))
    r.ws.write_json({"trees_before": 16, "trees_after": 16, "chosen": "full"}, r.path("compaction"))
    return r


def run_refit(r, nodes):
    refit.open_session(r)
    refit.keys(r, nodes)
    refit.relay(r)
    while True:
        refit.refit(r, nodes)
        try:
            return refit.step(r)
        except PhaseRerun as rerun:
            assert rerun.phase == "refit"


def pooled_loss(nodes, doc) -> float:
    weight, total, rows = leaf_refit.pos_weight(doc), 0.0, 0
    for node in nodes.values():
        matrix = dmatrix(node.data.X_train, None, TOY_FEATURES)
        margin = model_json.to_booster(doc).predict(matrix, output_margin=True).astype(np.float64)
        total += leaf_refit.loss_sum(margin, node.data.y_train.astype(np.float64), weight)
        rows += len(margin)
    return total / rows


def test_the_refit_cuts_each_block_and_lowers_the_pooled_training_loss(tmp_path, nodes):
    r = round_state(tmp_path / "aggregator", nodes)
    summary = run_refit(r, nodes)
    doc = r.ws.read_json(r.path("model"))
    assert len(model_json.trees(doc)) == 8 and summary["trees_after"] == 8 and summary["step"] == 4
    assert r.ws.read_json(r.path("working")) == doc
    assert [o[1] for o in r.ws.read_json(r.path("provenance"))] == [b for b in BANKS for _ in range(2)]
    cut = r.ws.read_json(r.ws.round_dir(1) / "refit" / "start.json")
    losses = summary["loss"]  # the pooled loss before each step, as the banks' masked sums gave it
    assert losses[0] == pytest.approx(pooled_loss(nodes, cut), rel=1e-6)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert pooled_loss(nodes, doc) < losses[-1] < losses[0]
    record = r.ws.read_json(r.path("compaction"))
    assert record["refit"] == summary and record["chosen"] == "full"
    # the aggregator never holds one bank's sums: each answer is uniformly random words
    stored = b"".join(p.read_bytes() for p in (tmp_path / "aggregator").rglob("*") if p.is_file())
    for bank in BANKS:
        G, H, loss = masked_refit.leaf_sums(cut, nodes[bank].data.X_train, nodes[bank].data.y_train, TOY_FEATURES)
        answer = MaskedRefitSums.from_bytes(
            (r.ws.round_dir(1) / "refit" / "step-0" / f"{bank}.answer.json").read_bytes())
        words = words_from_text(answer.words, 2 * len(G) + 1)
        assert_masked(words, encode(np.concatenate([G, H, [loss]]), leaf_refit.FRAC_BITS))
        assert json.dumps(round(float(H[0]), 6)).encode() not in stored
    assert "x25519" not in " ".join(p.name for p in (tmp_path / "aggregator").rglob("*"))


def test_the_same_inputs_give_the_same_model(tmp_path, nodes):
    first, second = round_state(tmp_path / "one", nodes), round_state(tmp_path / "two", nodes)
    run_refit(first, nodes)
    run_refit(second, nodes)  # another session: other masks, the same sums
    assert first.path("model").read_bytes() == second.path("model").read_bytes()
    assert (first.ws.read_json(first.ws.round_dir(1) / "refit" / "state.json")["session"]
            != second.ws.read_json(second.ws.round_dir(1) / "refit" / "state.json")["session"])


class Lying:
    """A node whose per-leaf sums are tampered with before masking (it masks correctly: the sum decodes)."""

    def __init__(self, node, tamper):
        self.node, self.bank, self.tamper = node, node.bank, tamper

    def __getattr__(self, name):
        return getattr(self.node, name)

    def refit_sums(self, task_bytes: bytes) -> bytes:
        honest = masked_refit.leaf_sums
        masked_refit.leaf_sums = lambda *a: self.tamper(*honest(*a))
        try:
            return masked_refit.masked_refit_sums(self.node, task_bytes)
        finally:
            masked_refit.leaf_sums = honest


def negative_hessian(G, H, loss):
    H = H.copy()
    H[1] = -1e3
    return G, H, loss


def shifted_gradient(G, H, loss):
    G = G.copy()
    G[0] += 5.0  # one tree's totals no longer match the others'
    return G, H, loss


def too_large(G, H, loss):
    return G * 1e6, H * 1e6, loss


class Silent:
    def __init__(self, node):
        self.node, self.bank = node, node.bank

    def __getattr__(self, name):
        return getattr(self.node, name)

    def refit_sums(self, task_bytes: bytes) -> bytes:
        raise ConnectionError(f"{self.bank} is gone")


class ShortWords(Silent):
    def refit_sums(self, task_bytes: bytes) -> bytes:
        answer = MaskedRefitSums.from_bytes(self.node.refit_sums(task_bytes))
        return dataclasses.replace(answer, words=answer.words[:-12]).to_bytes()


@pytest.mark.parametrize("liar, named", [
    (lambda n: Lying(n, negative_hessian), "refit_sums_negative_hessian"),
    (lambda n: Lying(n, shifted_gradient), "refit_sums_inconsistent"),
    (lambda n: Lying(n, too_large), "refit_sums_out_of_range"),
    (Silent, "sent no refit sums"),
    (ShortWords, "masked_words"),
])
def test_impossible_or_missing_sums_are_named_and_the_round_keeps_its_uncut_model(tmp_path, nodes, liar, named):
    r = round_state(tmp_path / "aggregator", nodes)
    before = r.path("model").read_bytes()
    assert run_refit(r, {**nodes, "beta": liar(nodes["beta"])}) is None
    assert r.path("model").read_bytes() == before and len(model_json.trees(json.loads(before))) == 16
    skipped = r.ws.read_json(r.path("compaction"))["refit"]["skipped"]
    assert named in skipped and skipped.startswith("step 0:"), skipped


def test_outside_a_refit_round_or_without_provenance_nothing_changes(tmp_path, nodes):
    r = round_state(tmp_path / "a", nodes, dataclasses.replace(SETTINGS, compaction_refit_every=2))
    before = r.path("model").read_bytes()
    assert run_refit(r, nodes) is None and r.path("model").read_bytes() == before
    assert "refit" not in r.ws.read_json(r.path("compaction"))
    r = round_state(tmp_path / "b", nodes)
    r.path("provenance").unlink()
    assert run_refit(r, nodes) is None and r.path("model").read_bytes() == before
    assert "no provenance" in r.ws.read_json(r.path("compaction"))["refit"]["skipped"]


def test_the_bank_refuses_a_bad_step_a_private_bank_and_mask_reuse(tmp_path, nodes):
    r = round_state(tmp_path / "aggregator", nodes)
    refit.open_session(r)
    refit.keys(r, nodes)
    refit.relay(r)
    task = RefitTask.from_bytes(refit.refit_exchanges(r, "alpha")[0].question.read_bytes())
    with pytest.raises(KeyAgreementRefused, match="refit_step_invalid"):
        nodes["alpha"].refit_sums(dataclasses.replace(task, step=masked_refit.MAX_STEPS).to_bytes())
    with pytest.raises(KeyAgreementRefused, match="session_unknown"):
        nodes["alpha"].refit_sums(dataclasses.replace(task, session="fed0/round-1/refit/other").to_bytes())
    first = nodes["alpha"].refit_sums(task.to_bytes())
    assert nodes["alpha"].refit_sums(task.to_bytes()) == first  # the same question: the same answer
    other = model_json.scale_leaves(task.model, 0.5)
    with pytest.raises(MaskReuse, match="mask_reuse"):
        nodes["alpha"].refit_sums(dataclasses.replace(task, model=other).to_bytes())
    private = nodes["beta"]
    private.__dict__["privacy"] = type("Private", (), {"enabled": True})()
    with pytest.raises(KeyAgreementRefused, match="refit_private"):
        private.refit_sums(task.to_bytes())
    assert KeyRequest.from_bytes(r.ws.round_dir(1).joinpath("refit", "request.json").read_bytes()).banks == BANKS


def test_refit_settings_are_checked_by_name():
    for name, value in (("compaction_refit_keep", 0), ("compaction_refit_keep", 1.5), ("compaction_refit_steps", 0),
                        ("compaction_refit_every", True), ("compaction_refit_eta", 0), ("compaction_refit_lambda", -1),
                        ("compaction_refit", 1)):
        with pytest.raises(ValueError, match=name):
            FederationSettings(**{name: value})
    assert FederationSettings().compaction_refit is False  # off by default
