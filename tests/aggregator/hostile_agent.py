"""A hostile bank for the network test: a real agent process (``python hostile_agent.py CONFIG
ATTACKS_JSON``) whose answers are tampered. ``ATTACKS_JSON`` maps ``kind:round`` (``summary:0``,
``train:1``, ``evaluate:2``, …) to an attack below; every other task is answered honestly.

A summary attack is a lie first, then the truth (so the bank still joins and can attack later);
the first training attack is preceded by bytes the intake must refuse (NaN, deep nesting).
"""

from __future__ import annotations

import json
import logging
import sys

from bank_node.agent import Agent, AgentConfig
from fedfraud.transport import ServiceRefused

log = logging.getLogger("fedfraud.hostile")


def _tree0(update: dict) -> dict:
    return update["model"]["learner"]["gradient_booster"]["model"]["trees"][0]


def _inner(tree: dict) -> list[int]:
    return [n for n, child in enumerate(tree["left_children"]) if child != -1]


def split_index(u):
    _tree0(u)["split_indices"][_inner(_tree0(u))[0]] = 10 ** 6


def cycle(u):
    tree = _tree0(u)
    node = next(n for n in _inner(tree) if n != 0)
    tree["left_children"][node] = node  # a node that is its own child


def leaf_1e39(u):
    tree = _tree0(u)
    tree["split_conditions"][tree["left_children"].index(-1)] = 1e39  # finite in float64, inf in float32


def foreign_header(u):
    learner = u["model"]["learner"]
    learner["learner_model_param"]["base_score"] = "[9.99E-1]"
    learner["objective"]["name"] = "binary:logitraw"


def huge(u):
    trees = u["model"]["learner"]["gradient_booster"]["model"]["trees"]
    size = len(json.dumps(trees))
    u["model"]["learner"]["gradient_booster"]["model"]["trees"] = trees * max(1, 25 * 1024 * 1024 // size)


def claimed_rows(u):
    u["counts"]["train_rows"] *= 10 ** 6


def forged_report(r):
    """A masked evaluation replayed into another session, claiming a perfect AUPRC (a bank that forges its
    masked words instead cannot be told apart: the sum is refused and the round fails by name)."""
    r["session"] = r["session"].rsplit("/", 1)[0] + "/replayed"
    r["metrics"] = {"auprc": 1.0}


def wrong_model(r):
    r["model_id"] = "f" * 16


def clear_positives(s):
    """A label count in the clear (it leaves a bank only masked): the intake refuses it (``invalid_counts``)."""
    s["counts"]["positives"] = 40


ATTACKS = {f.__name__: f for f in (split_index, cycle, leaf_1e39, foreign_header, huge, claimed_rows, forged_report,
                                   wrong_model, clear_positives)}
INTAKE_PROBES = (b'{"bank": "%s", "round_id": 1, "metrics": {"auprc": NaN}}', b"[" * 100_000)


class HostileAgent(Agent):
    def __init__(self, config: AgentConfig, attacks: dict[str, str]):
        super().__init__(config)
        self.attacks, self.probed = attacks, False
        self._attack: str | None = None

    def handle(self, task: dict) -> None:
        self._attack = self.attacks.get(f"{task['kind']}:{task['round']}")
        if self._attack == "clear_positives" and not self.ledger.closed(task["id"]):
            self._try(task["id"], self.compute(task["kind"], b""))  # the lie first; the truth follows
            self._attack = None
        if self._attack and task["kind"] == "train" and not self.probed:
            self.probed = True
            for probe in INTAKE_PROBES:
                self._try(task["id"], probe.replace(b"%s", self.config.bank.encode()))
        super().handle(task)

    def _try(self, tid: str, body: bytes) -> None:
        try:
            self.client.upload_result(tid, body)
            log.warning("%s: crafted upload accepted by the intake", self.config.bank)
        except ServiceRefused as exc:
            log.warning("%s: crafted upload refused: %s %s", self.config.bank, exc.status, exc.check)

    def compute(self, kind: str, data: bytes) -> bytes:
        body = super().compute(kind, data)
        if not self._attack:
            return body
        message = json.loads(body)
        ATTACKS[self._attack](message)
        log.warning("%s: %s answered with %s", self.config.bank, kind, self._attack)
        return json.dumps(message).encode()


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    HostileAgent(AgentConfig.load(argv[0]), json.loads(argv[1])).run()


if __name__ == "__main__":
    main(sys.argv[1:])
