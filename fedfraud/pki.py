"""The consortium's PKI: one CA, and a certificate + key per participant for mutual TLS.

``provision`` writes, atomically (into a temp dir next to OUT, then renamed into place)::

    OUT/ca/ca.crt           the consortium CA certificate
    OUT/ca/ca.key           the CA private key (0600): keep it offline, never mount it into a container
    OUT/<name>/ca.crt       a copy of the CA certificate, to verify peers
    OUT/<name>/cert.pem     the participant's certificate: CN=<name>, O=<consortium>, OU=<role>
    OUT/<name>/key.pem      its private key (0600)
    OUT/participants.json   names, roles, expiry dates and the CA's SHA-256 fingerprint

Each participant gets only its own folder. The role in OU is what the aggregator authorises on:
the aggregator itself (server + client), a bank (client), an operator such as Airflow (client).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("aggregator", "bank", "operator")
AGGREGATOR = "aggregator"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOST_PATTERN = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")
RESERVED = {"ca", "participants.json"}  # names taken by the layout itself
CLOCK_SKEW = timedelta(minutes=5)


class ProvisionError(ValueError):
    """The consortium cannot be provisioned as asked; the message says why."""


def provision(consortium: str, participants: Sequence[str], out_dir: Path, days: int = 365,
              operators: Sequence[str] = ("airflow",), hosts: Sequence[str] = ("aggregator", "localhost", "127.0.0.1"),
              force: bool = False) -> dict[str, Path]:
    """Create the CA and every participant's certificate in ``out_dir``; return {name: its folder}."""
    roles = _roles(participants, operators)
    if not consortium.strip() or len(consortium) > 61:
        raise ProvisionError(f"consortium name must be 1 to 61 characters, got {consortium!r}")
    if days < 1:
        raise ProvisionError(f"days must be at least 1, got {days}")
    out_dir = Path(out_dir).resolve()  # "." and symlinks too: the staging dir is renamed onto the real path
    existing = (out_dir / "ca" / "ca.crt").exists()
    if existing and not force:
        raise ProvisionError(f"{out_dir} already holds a consortium; pass force to replace it (and all its keys)")
    if not existing and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ProvisionError(f"{out_dir} exists and is neither empty nor a consortium; refusing to write there")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        staging.chmod(0o755)
        now = datetime.now(timezone.utc)
        ca = _create_ca(consortium, staging / "ca", now - CLOCK_SKEW, now + timedelta(days=days + 365))
        listing = {}
        for name, role in roles.items():
            folder = issue(staging / "ca", name, role, staging, not_before=now - CLOCK_SKEW,
                           not_after=now + timedelta(days=days), hosts=hosts if role == AGGREGATOR else ())
            cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
            listing[name] = {"role": role, "not_after": cert.not_valid_after_utc.isoformat()}
        summary = {"consortium": consortium, "participants": listing,
                   "ca_fingerprint_sha256": ca.fingerprint(hashes.SHA256()).hex()}
        (staging / "participants.json").write_text(json.dumps(summary, indent=2) + "\n")
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: out_dir / name for name in roles}


def issue(ca_dir: Path, name: str, role: str, out_dir: Path, *, not_before: datetime | None = None,
          not_after: datetime | None = None, hosts: Sequence[str] = ()) -> Path:
    """Issue a certificate for ``name`` from the CA in ``ca_dir``; write out_dir/<name>/{ca.crt,cert.pem,key.pem}."""
    _check_name(name)
    if role not in ROLES:
        raise ProvisionError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    ca_dir = Path(ca_dir)
    ca_pem = (ca_dir / "ca.crt").read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    now = datetime.now(timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == AGGREGATOR:  # serverAuth for its API, clientAuth for its own healthcheck
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    consortium = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(consortium)),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        _builder(subject, ca.subject, key, not_before or now - CLOCK_SKEW, not_after or now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(_alt_names([name, *hosts])), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(ca_pem)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(folder / "key.pem", key)
    return folder


def identity(cert: x509.Certificate) -> tuple[str, str]:
    """(CN, OU) of a participant's certificate: its name and role. ValueError if either is missing."""
    values = []
    for oid, label in ((NameOID.COMMON_NAME, "CN"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "OU")):
        attributes = cert.subject.get_attributes_for_oid(oid)
        if len(attributes) != 1:
            raise ValueError(f"certificate subject {cert.subject.rfc4514_string()!r} needs exactly one {label}")
        values.append(str(attributes[0].value))
    return values[0], values[1]


def identity_from_der(der: bytes) -> tuple[str, str]:
    """(CN, OU) of a DER certificate, e.g. ``ssl_socket.getpeercert(binary_form=True)``."""
    return identity(x509.load_der_x509_certificate(der))


def _roles(participants: Sequence[str], operators: Sequence[str]) -> dict[str, str]:
    roles: dict[str, str] = {}
    for name in [*participants, *operators]:
        _check_name(name)
        if name.lower() in {seen.lower() for seen in roles}:
            raise ProvisionError(f"participant name {name!r} is given twice (names are case-insensitive)")
        roles[name] = AGGREGATOR if name == AGGREGATOR else "bank" if name in participants else "operator"
    if list(participants).count(AGGREGATOR) != 1:
        raise ProvisionError(f"exactly one participant must be named {AGGREGATOR!r}, got {list(participants)}")
    return roles


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name) or name.lower() in RESERVED:
        raise ProvisionError(f"invalid participant name {name!r}: use 1-63 of A-Z a-z 0-9 _ . -, starting "
                             f"with a letter or digit, and not {' or '.join(sorted(RESERVED))}")


def _alt_names(entries: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for entry in dict.fromkeys(entries):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            if not HOST_PATTERN.match(entry):
                raise ProvisionError(f"invalid host {entry!r}: not an IP address or DNS name") from None
            names.append(x509.DNSName(entry))
    return names


def _create_ca(consortium: str, folder: Path, not_before: datetime, not_after: datetime) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{consortium} CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium)])
    cert = (
        _builder(subject, subject, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(mode=0o700)
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(folder / "ca.key", key)
    return cert


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, not_before: datetime,
             not_after: datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _key_usage(digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # also when the file already existed
        handle.write(pem)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished staging dir to out_dir, replacing an old consortium only once the new one is complete."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.replace(staging, out_dir)  # rename(2) may replace an empty directory
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    os.replace(out_dir, retired / out_dir.name)
    try:
        os.replace(staging, out_dir)
    except OSError:
        os.replace(retired / out_dir.name, out_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)
