"""Bytes on the wire: one record per exchange under its round, summed per bank and direction."""

from __future__ import annotations

from aggregator.protocol import traffic


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
