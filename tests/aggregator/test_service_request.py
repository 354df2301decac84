"""A federation request's options: each one a request may set reaches the plan; anything else is refused by name."""

from __future__ import annotations

import json

import pytest
from conftest import SERVICE_BANKS as BANKS, bank_summary as summary, federation_request as request, make_coordinator
from conftest import settle_counts

from aggregator.protocol.plan import Plan
from aggregator.service.app import _federation_request
from aggregator.service.intake import Refused
from fedfraud.settings import REQUEST_OPTIONS, FederationSettings


def parsed(**fields) -> dict:
    return _federation_request(json.dumps(request(**fields)).encode())


def refusal(**fields) -> str:
    with pytest.raises(Refused) as exc:
        parsed(**fields)
    assert exc.value.status == 422 and exc.value.check == "malformed"
    return str(exc.value)


def test_a_request_spells_out_every_option_so_a_retry_with_defaults_is_the_same_request():
    defaults = FederationSettings()
    assert {k: parsed()[k] for k in REQUEST_OPTIONS} == {k: getattr(defaults, k) for k in REQUEST_OPTIONS}
    assert parsed(acceptance_delta="auto") == parsed()
    assert parsed(acceptance_delta=0.05)["acceptance_delta"] == 0.05
    assert parsed(compaction=True, compaction_tolerance=0.001)["compaction_tolerance"] == 0.001


@pytest.mark.parametrize("fields, named", [
    ({"acceptance_detla": 0.05}, "acceptance_detla"),  # a typo is refused, never ignored
    ({"max_depth": 30}, "max_depth"),  # the consortium's tree parameters are not a request's to choose
    ({"acceptance_delta": 2}, "acceptance_delta"),
    ({"acceptance_delta": "strict"}, "acceptance_delta"),
    ({"acceptance_z": True}, "acceptance_z"),
    ({"crossval": "yes"}, "crossval"),
    ({"compaction_steps": 1.5}, "compaction_steps"),
    ({"compaction_max_fraction": 0}, "compaction_max_fraction"),
])
def test_an_unknown_option_or_a_value_out_of_range_is_refused_by_name(fields, named):
    assert named in refusal(**fields)


def test_the_requested_acceptance_and_compaction_reach_the_plan(tmp_path):
    c = make_coordinator(tmp_path)
    c.start_federation("f1", parsed(acceptance_delta=0.03, acceptance_z=3.0, compaction=True, crossval=False))
    tasks = {bank: c.next_task(bank)["id"] for bank in BANKS}
    for bank in BANKS:
        c.accept_result(bank, tasks[bank], summary(bank))
    assert c.plan_federation("f1")["state"] == "counting"
    assert settle_counts(c, "f1", tmp_path)["state"] == "planned"
    with c.Session() as s:
        settings = Plan.from_dict(c._federation(s, "f1").plan).settings
    assert (settings.acceptance_delta, settings.acceptance_z, settings.compaction, settings.crossval) == (
        0.03, 3.0, True, False)


def test_a_dag_run_passes_its_options_and_a_bad_one_fails_before_any_task():
    from aggregator.drivers.airflow_spec import RunSpec

    spec = RunSpec.from_params({"banks": {"a": "x"}, "model_name": "m", "acceptance_delta": 0.04, "compaction": True})
    assert (spec.settings.acceptance_delta, spec.settings.compaction) == (0.04, True)
    with pytest.raises(ValueError, match="acceptance_delta"):
        RunSpec.from_params({"banks": {"a": "x"}, "model_name": "m", "acceptance_delta": "0.04"})


def test_a_dag_run_reaches_every_other_option_through_options_and_each_is_checked_by_name():
    from aggregator.drivers.airflow_spec import RunSpec

    spec = RunSpec.from_params({"banks": {"a": "x"}, "model_name": "m", "compaction": True,
                                "options": {"crossval_masked": False, "acceptance_masked": False,
                                            "compaction_tolerance": 0.004}})
    settings = spec.settings
    chosen = (settings.crossval_masked, settings.acceptance_masked, settings.compaction_tolerance)
    assert chosen == (False, False, 0.004)
    with pytest.raises(ValueError, match="no_such_option"):
        RunSpec.from_params({"banks": {"a": "x"}, "model_name": "m", "options": {"no_such_option": 1}})
    with pytest.raises(ValueError, match="compaction"):
        RunSpec.from_params({"banks": {"a": "x"}, "model_name": "m", "options": {"compaction": True}})
