"""A registered model's raw XGBoost JSON, read from its MLflow artifacts without loading it.

``mlflow.xgboost.load_model`` hands the file straight to XGBoost, which trusts it (an
out-of-range split index segfaults). Both ends read the bytes here instead and pass them through
``fedfraud.model_guard`` before anything is loaded. Only the xgboost flavor's JSON file, inside
the downloaded folder, regular and bounded, is read.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from fedfraud.model_guard import ModelRefused


def model_json_bytes(folder: Path, max_bytes: int) -> bytes:
    """The xgboost flavor's model file of a downloaded MLflow model folder, as bytes."""
    try:
        flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["xgboost"]
        data, model_format = str(flavor["data"]), flavor.get("model_format", "json")
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise ModelRefused("malformed", f"no xgboost flavor in the logged model ({exc.__class__.__name__})") from None
    if model_format != "json":
        raise ModelRefused("malformed", f"the logged model is {str(model_format)[:16]!r}, only JSON is read")
    path = (folder / data).resolve()
    if folder.resolve() not in path.parents or path.is_symlink() or not path.is_file():
        raise ModelRefused("malformed", f"model file {data[:80]!r} is not a regular file inside the model folder")
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelRefused("too_large", f"logged model of {size} bytes > {max_bytes}")
    return path.read_bytes()


def download_model_json(artifact_uri: str, max_bytes: int, tracking_uri: str | None = None) -> bytes:
    """Download a logged model's folder (``models:/…`` or an artifact URI) and return its JSON bytes."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="fedfraud-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp,
                                                    tracking_uri=tracking_uri)
        return model_json_bytes(Path(local), max_bytes)
