"""A logged model's JSON is read as bytes (never loaded): only the xgboost flavor's JSON file,
inside the folder, bounded."""

from __future__ import annotations

import pytest
import yaml

from fedfraud.logged_model import model_json_bytes
from fedfraud.model_guard import ModelRefused


def folder(tmp_path, data="model.json", model_format="json", body=b'{"learner": {}}'):
    (tmp_path / "MLmodel").write_text(yaml.safe_dump({"flavors": {"xgboost": {"data": data,
                                                                              "model_format": model_format}}}))
    (tmp_path / "model.json").write_bytes(body)
    return tmp_path


def test_reads_the_flavor_file(tmp_path):
    assert model_json_bytes(folder(tmp_path), 100) == b'{"learner": {}}'


@pytest.mark.parametrize("kwargs, max_bytes, check", [
    ({"data": "../../etc/passwd"}, 100, "malformed"),
    ({"model_format": "ubj"}, 100, "malformed"),
    ({}, 5, "too_large"),
])
def test_refusals_are_named(tmp_path, kwargs, max_bytes, check):
    with pytest.raises(ModelRefused) as refused:
        model_json_bytes(folder(tmp_path, **kwargs), max_bytes)
    assert refused.value.check == check


def test_no_flavor(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors: {}")
    with pytest.raises(ModelRefused, match="no xgboost flavor"):
        model_json_bytes(tmp_path, 100)
