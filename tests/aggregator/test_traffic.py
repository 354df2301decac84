"""Bytes on the wire: one record per exchange under its round, summed per bank and direction."""

from __future__ import annotations

import dataclasses
import json

import pytest

from aggregator.protocol import traffic
from aggregator.service.intake import Refused, screen_upload
from fedfraud.model_guard import ModelLimits, ModelRefused, parse_update_bytes
from fedfraud.protocol import TaskKind
from fedfraud.wire import ModelUpdate


def test_exchanges_are_summed_per_bank_and_direction(tmp_path):
    round_dir = tmp_path / "federations" / "m" / "round-3"
    traffic.record(round_dir / "updates" / "alpha.json", "alpha", received=1000, sent=200)
    traffic.record(round_dir / "evaluations" / "alpha.json", "alpha", received=500, sent=30)
    traffic.record(round_dir / "acceptance" / "stage-0" / "answers" / "alpha.json", "alpha", received=7, sent=9)
    traffic.record(round_dir / "compaction" / "answers" / "alpha.json", "alpha", received=11, sent=13)
    traffic.record(round_dir / "evaluations" / "beta.json", "beta", received=500, sent=40)
    traffic.record(round_dir / "evaluations" / "beta.json", "beta", received=500, sent=40)  # fetched twice
    counted = traffic.totals(round_dir)
    assert counted == {"alpha": {"received": 1518, "sent": 252}, "beta": {"received": 1000, "sent": 80}}
    assert traffic.metrics(counted) == {"bytes.alpha.received": 1518.0, "bytes.alpha.sent": 252.0,
                                        "bytes.beta.received": 1000.0, "bytes.beta.sent": 80.0,
                                        "bytes.received": 2518.0, "bytes.sent": 332.0}


def test_only_a_rounds_exchanges_are_counted(tmp_path):
    traffic.record(tmp_path / "federations" / "m" / "summaries" / "alpha.json", "alpha", received=1, sent=2)
    assert not list(tmp_path.rglob("traffic"))
    assert traffic.totals(tmp_path / "federations" / "m" / "round-1") == {}


def test_a_federations_rounds_are_summed_per_bank(tmp_path):
    root = tmp_path / "federations" / "m"
    traffic.record(root / "round-1" / "updates" / "alpha.json", "alpha", received=10, sent=1)
    traffic.record(root / "round-2" / "updates" / "alpha.json", "alpha", received=20, sent=2)
    traffic.record(root / "round-3" / "updates" / "alpha.json", "alpha", received=40, sent=4)  # past ``rounds``
    traffic.record(root / "round-2" / "updates" / "beta.json", "beta", received=5, sent=5)
    assert traffic.over_rounds(root, 2) == {"alpha": {"received": 30, "sent": 3}, "beta": {"received": 5, "sent": 5}}


def test_a_banks_collective_bytes_are_recorded_once_as_its_own_exchange(tmp_path):
    round_dir = tmp_path / "federations" / "m" / "round-2"
    traffic.record(round_dir / "updates" / "alpha.json", "alpha", received=100, sent=50)
    for _ in range(2):  # a check run again reads the same report: recorded once
        traffic.reported_collectives(round_dir / traffic.COLLECTIVES / "alpha.json", "alpha",
                                     {"sent": 70_000, "received": 90_000})
    traffic.reported_collectives(round_dir / traffic.COLLECTIVES / "beta.json", "beta", None)  # unmasked: none
    assert traffic.totals(round_dir) == {"alpha": {"received": 90_100, "sent": 70_050}}
    assert sorted(p.name for p in (round_dir / traffic.FOLDER).iterdir()) == ["collectives__alpha.json",
                                                                             "updates__alpha.json"]


@pytest.mark.parametrize("counted", [
    {"sent": -1, "received": 0}, {"sent": True, "received": 0}, {"sent": 1.5, "received": 0},
    {"sent": "5", "received": 0}, {"sent": 0, "received": (1 << 40) + 1}, {"sent": 0}, [1, 2], 7,
    {"sent": 0, "received": 0, "words": 1}, {"sent": 10 ** 400, "received": 0},
])
def test_a_malformed_collective_bytes_report_refuses_the_update_by_name(counted):
    good = ModelUpdate("alpha", 1, "none", "h", 0, {}, {}, {"learner": {}},
                       collective_bytes={"sent": 1 << 40, "received": 0})
    assert ModelUpdate.from_bytes(good.to_bytes()).collective_bytes == {"sent": 1 << 40, "received": 0}
    assert "collective_bytes" not in json.loads(dataclasses.replace(good, collective_bytes=None).to_bytes())
    body = json.dumps({**json.loads(good.to_bytes()), "collective_bytes": counted}).encode()
    with pytest.raises(ModelRefused) as refused:  # as ``check`` screens an update (every driver)
        parse_update_bytes(body, ModelLimits.accepted(), None)
    assert refused.value.check == "collective_bytes_malformed", refused.value.detail
    with pytest.raises(Refused) as upload:  # as the service screens an upload
        screen_upload(TaskKind.HISTOGRAM, body, "alpha", 1, 1 << 20)
    assert upload.value.check == "collective_bytes_malformed" and upload.value.status == 400
