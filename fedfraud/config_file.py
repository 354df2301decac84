"""Config files of the networked services: YAML with every unknown or missing key named; TLS folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file is missing, unreadable or names a key or file that is wrong."""


@dataclass(frozen=True)
class TLSFiles:
    """A participant's certificate folder as written by ``fedfraud provision``."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def parse(cls, raw: object, where: str) -> "TLSFiles":
        if not isinstance(raw, dict) or set(raw) != {"ca", "cert", "key"}:
            raise ConfigError(f"{where}: tls must have exactly ca, cert and key (paths)")
        files = cls(*(Path(raw[k]) for k in ("ca", "cert", "key")))
        missing = [str(p) for p in (files.ca, files.cert, files.key) if not p.is_file()]
        if missing:
            raise ConfigError(f"{where}: tls file(s) not found: {', '.join(missing)} (run `fedfraud provision`)")
        return files

    @classmethod
    def from_folder(cls, folder: str | Path) -> "TLSFiles":
        folder = Path(folder)
        return cls(folder / "ca.crt", folder / "cert.pem", folder / "key.pem")


def read_yaml(path: Path, known: set[str], required: set[str]) -> dict:
    """A YAML mapping with no unknown and no missing keys; each problem named."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config must be a YAML mapping")
    unknown, missing = sorted(set(raw) - known), sorted(required - set(raw))
    if unknown or missing:
        raise ConfigError(f"{path}: " + "; ".join(filter(None, [
            f"unknown key(s): {', '.join(unknown)}" if unknown else "",
            f"missing key(s): {', '.join(missing)}" if missing else ""])))
    return raw
