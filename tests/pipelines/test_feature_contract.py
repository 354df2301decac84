"""Feature contract: stable hash under the same config, a different hash when it changes."""

from __future__ import annotations

import dataclasses

import pytest

from pipelines.config import load_config
from pipelines.feature_contract import ContractMismatch, feature_contract, require_same_contract

# Pinned on purpose: a change here means every bank must re-run features with the new version.
PINNED_HASH = "1e510120f6addf24ecc88f5620895829f7401be328eca629d3060c41aa63207a"


def test_same_config_gives_the_same_contract(config):
    first, second = feature_contract(config.features), feature_contract(load_config().features)
    assert first == second
    assert first["names"][0] == "amount_base" and len(first["names"]) == len(first["types"])


def test_hash_is_pinned(config):
    assert feature_contract(config.features)["hash"] == PINNED_HASH


@pytest.mark.parametrize(
    "change",
    [
        {"version": 99},
        {"small_amount_base": 4.0},
        {"merchant_categories": ("grocery",)},
        {"rates_to_base": {"EUR": 1.0}},
    ],
)
def test_any_feature_setting_changes_the_hash(config, change):
    changed = dataclasses.replace(config.features, **change)
    assert feature_contract(changed)["hash"] != feature_contract(config.features)["hash"]


def test_a_bank_with_another_contract_is_refused(config):
    contract = feature_contract(config.features)
    require_same_contract(contract["hash"], contract, "alpine")
    other = feature_contract(dataclasses.replace(config.features, version=config.features.version + 1))
    with pytest.raises(ContractMismatch, match="bank alpine"):
        require_same_contract(contract["hash"], other, "alpine")
