"""The feature contract: ordered names, types and a version hash shared by every bank.

What is fitted on a bank's data stays at the bank; what is shared is this explicit artifact.
Two banks under the same config get the same hash; a round refuses a bank whose hash differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipelines.config import FeatureConfig
from pipelines.features import feature_types


class ContractMismatch(ValueError):
    """A bank's feature contract differs from the one the round expects."""


def feature_contract(cfg: FeatureConfig) -> dict[str, Any]:
    """The contract for ``cfg``: names, types, the config they depend on, and its hash."""
    types = feature_types(cfg)
    body = {"names": list(types), "types": list(types.values()), "config": cfg.as_dict()}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"version": cfg.version, **body, "hash": digest}


def load_contract(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def require_same_contract(expected_hash: str, contract: dict[str, Any], bank: str) -> None:
    """Raise ``ContractMismatch`` naming ``bank`` unless its contract hash is ``expected_hash``."""
    if contract.get("hash") != expected_hash:
        raise ContractMismatch(
            f"bank {bank}: feature contract {str(contract.get('hash'))[:12]} differs from the round's "
            f"{expected_hash[:12]}; run the consortium's pipeline config"
        )
