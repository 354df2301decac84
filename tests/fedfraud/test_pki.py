"""The consortium PKI: the files it writes, real mutual-TLS handshakes with them, and what it refuses."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import stat
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from fedfraud.cli import app
from fedfraud.pki import ProvisionError, identity, identity_from_der, issue, provision

PARTICIPANTS = ["aggregator", "bankA", "bankB"]


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "consortium"
    written = provision("nordic", PARTICIPANTS, out, days=30)
    assert written == {name: out.resolve() / name for name in [*PARTICIPANTS, "airflow"]}
    return out


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("foreign") / "consortium"
    provision("rogue", PARTICIPANTS, out)
    return out


def test_layout_modes_and_summary(pki):
    assert sorted(p.name for p in pki.iterdir()) == sorted(["ca", "participants.json", *PARTICIPANTS, "airflow"])
    assert sorted(p.name for p in (pki / "ca").iterdir()) == ["ca.crt", "ca.key"]
    keys = [pki / "ca" / "ca.key", *(pki / name / "key.pem" for name in [*PARTICIPANTS, "airflow"])]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    summary = json.loads((pki / "participants.json").read_text())
    ca = load(pki / "ca" / "ca.crt")
    assert summary["consortium"] == "nordic"
    assert summary["ca_fingerprint_sha256"] == ca.fingerprint(hashes.SHA256()).hex()
    assert {name: entry["role"] for name, entry in summary["participants"].items()} == {
        "aggregator": "aggregator", "bankA": "bank", "bankB": "bank", "airflow": "operator"}
    not_after = datetime.fromisoformat(summary["participants"]["bankA"]["not_after"])
    assert not_after == load(pki / "bankA" / "cert.pem").not_valid_after_utc


def test_ca_certificate(pki):
    ca = load(pki / "ca" / "ca.crt")
    assert ca.subject.rfc4514_string() == "O=nordic,CN=nordic CA"
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert abs(lifetime - timedelta(days=30 + 365, minutes=5)) < timedelta(seconds=5)
    ca.verify_directly_issued_by(ca)


@pytest.mark.parametrize(
    "name, role, usages, alt_names",
    [
        ("aggregator", "aggregator", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
         ["aggregator", "localhost", ipaddress.ip_address("127.0.0.1")]),
        ("bankA", "bank", [ExtendedKeyUsageOID.CLIENT_AUTH], ["bankA"]),
        ("airflow", "operator", [ExtendedKeyUsageOID.CLIENT_AUTH], ["airflow"]),
    ],
)
def test_participant_certificate(pki, name, role, usages, alt_names):
    ca, cert = load(pki / "ca" / "ca.crt"), load(pki / name / "cert.pem")
    assert (pki / name / "ca.crt").read_bytes() == (pki / "ca" / "ca.crt").read_bytes()
    cert.verify_directly_issued_by(ca)
    assert identity(cert) == (name, role)
    assert cert.subject.rfc4514_string() == f"OU={role},O=nordic,CN={name}"
    assert cert.issuer == ca.subject
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == usages
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [entry.value for entry in san] == alt_names
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    assert cert.public_key().curve.name == "secp256r1" and cert.signature_hash_algorithm.name == "sha256"
    now = datetime.now(timezone.utc)
    assert now - timedelta(minutes=6) < cert.not_valid_before_utc < now - timedelta(minutes=4)
    assert abs(cert.not_valid_after_utc - (now + timedelta(days=30))) < timedelta(seconds=30)


# ---- real mutual TLS with Python's ssl -------------------------------------------------------


def server_context(folder: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(folder / "ca.crt")
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


def client_context(trust: Path, folder: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=trust / "ca.crt")  # verifies the server and its hostname
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # the default from Python 3.13 on
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


def handshake(server: Path, client: ssl.SSLContext, hostname: str = "127.0.0.1") -> tuple[dict, bytes | Exception]:
    """One connection to a TLS server on a free port: (what the server saw, what the client read or raised)."""
    seen: dict = {}
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        with listener:
            connection, _ = listener.accept()
            connection.settimeout(5)
            try:
                with server_context(server).wrap_socket(connection, server_side=True) as tls:
                    seen["peer"] = identity_from_der(tls.getpeercert(binary_form=True))
                    seen["cn"] = dict(item[0] for item in tls.getpeercert()["subject"])["commonName"]
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                seen["error"] = exc
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with client.wrap_socket(raw, server_hostname=hostname) as tls:
                answer: bytes | Exception = tls.recv(2)
    except (ssl.SSLError, OSError) as exc:
        answer = exc
    thread.join(timeout=5)
    assert not thread.is_alive()
    return seen, answer


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost", "aggregator"])
def test_bank_and_aggregator_complete_a_mutual_tls_handshake(pki, hostname):
    seen, answer = handshake(pki / "aggregator", client_context(pki / "bankA", pki / "bankA"), hostname)
    assert answer == b"ok" and "error" not in seen
    assert seen["cn"] == "bankA" and seen["peer"] == ("bankA", "bank")


def test_operator_and_aggregator_itself_are_clients_too(pki):
    for name, role in [("airflow", "operator"), ("aggregator", "aggregator")]:
        seen, answer = handshake(pki / "aggregator", client_context(pki / name, pki / name))
        assert answer == b"ok" and seen["peer"] == (name, role)


def test_certificate_from_a_foreign_consortium_is_refused(pki, foreign):
    seen, answer = handshake(pki / "aggregator", client_context(pki / "bankA", foreign / "bankA"))
    assert isinstance(seen["error"], ssl.SSLCertVerificationError), seen
    assert "unable to get local issuer certificate" in seen["error"].verify_message
    assert isinstance(answer, Exception) and "peer" not in seen


def test_expired_certificate_is_refused(pki, tmp_path):
    now = datetime.now(timezone.utc)
    folder = issue(pki / "ca", "bankA", "bank", tmp_path, not_before=now - timedelta(days=10),
                   not_after=now - timedelta(days=1))
    assert load(folder / "cert.pem").not_valid_after_utc < now
    seen, answer = handshake(pki / "aggregator", client_context(pki / "bankA", folder))
    assert isinstance(seen["error"], ssl.SSLCertVerificationError), seen
    assert seen["error"].verify_message == "certificate has expired"
    assert isinstance(answer, Exception)


def test_a_bank_certificate_cannot_serve(pki):
    """Banks only get clientAuth: a bank impersonating the aggregator's server is refused by the client."""
    seen, answer = handshake(pki / "bankB", client_context(pki / "bankA", pki / "bankA"), hostname="bankB")
    assert isinstance(answer, ssl.SSLCertVerificationError)
    assert answer.verify_message == "unsuitable certificate purpose"


def test_issue_for_an_unknown_name_and_extra_hosts(pki, tmp_path):
    folder = issue(pki / "ca", "stranger", "operator", tmp_path, hosts=["10.0.0.7", "agg.example"])
    assert folder == tmp_path / "stranger"
    cert = load(folder / "cert.pem")
    cert.verify_directly_issued_by(load(pki / "ca" / "ca.crt"))
    assert identity(cert) == ("stranger", "operator")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [entry.value for entry in san] == ["stranger", ipaddress.ip_address("10.0.0.7"), "agg.example"]
    assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600
    with pytest.raises(ProvisionError, match="role must be one of"):
        issue(pki / "ca", "stranger", "admin", tmp_path)


def test_identity_needs_cn_and_ou(pki):
    with pytest.raises(ValueError, match="exactly one OU"):
        identity(load(pki / "ca" / "ca.crt"))


# ---- what provision refuses ------------------------------------------------------------------


@pytest.mark.parametrize(
    "participants, operators, message",
    [
        (["aggregator", "bankA", "bankA"], ["airflow"], "'bankA' is given twice"),
        (["aggregator", "bankA", "BANKA"], ["airflow"], "'BANKA' is given twice"),
        (["aggregator", "bankA"], ["bankA"], "'bankA' is given twice"),
        (["bankA", "bankB"], ["airflow"], "exactly one participant must be named 'aggregator'"),
        (["bankA"], ["aggregator"], "exactly one participant must be named 'aggregator'"),
        (["aggregator", "bankA", "aggregator"], ["airflow"], "'aggregator' is given twice"),
        (["aggregator", "bank A"], ["airflow"], "invalid participant name 'bank A'"),
        (["aggregator", "../evil"], ["airflow"], "invalid participant name '../evil'"),
        (["aggregator", "-bank"], ["airflow"], "invalid participant name '-bank'"),
        (["aggregator", "b" * 64], ["airflow"], "invalid participant name"),
        (["aggregator", "ca"], ["airflow"], "invalid participant name 'ca'"),
        (["aggregator", "bankA"], ["air flow"], "invalid participant name 'air flow'"),
    ],
)
def test_invalid_participants_are_refused(tmp_path, participants, operators, message):
    with pytest.raises(ProvisionError, match=message):
        provision("c", participants, tmp_path / "out", operators=operators)
    assert list(tmp_path.iterdir()) == []


def test_invalid_days_consortium_and_hosts_are_refused(tmp_path):
    with pytest.raises(ProvisionError, match="days must be at least 1"):
        provision("c", PARTICIPANTS, tmp_path / "out", days=0)
    with pytest.raises(ProvisionError, match="consortium name"):
        provision(" ", PARTICIPANTS, tmp_path / "out")
    with pytest.raises(ProvisionError, match="invalid host 'bad host'"):
        provision("c", PARTICIPANTS, tmp_path / "out", hosts=["localhost", "bad host"])
    assert list(tmp_path.iterdir()) == []  # the failed attempt left no partial consortium, nor its temp dir


def test_existing_consortium_is_kept_unless_forced(tmp_path):
    out = tmp_path / "out"
    provision("c", PARTICIPANTS, out)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(ProvisionError, match="already holds a consortium"):
        provision("c", [*PARTICIPANTS, "bankC"], out)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before

    written = provision("c2", [*PARTICIPANTS, "bankC"], out, force=True)
    assert set(written) == {*PARTICIPANTS, "bankC", "airflow"}
    assert (out / "ca" / "ca.key").read_bytes() != before[out / "ca" / "ca.key"]
    assert json.loads((out / "participants.json").read_text())["consortium"] == "c2"
    load(out / "bankC" / "cert.pem").verify_directly_issued_by(load(out / "ca" / "ca.crt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or retired dirs left behind


def test_empty_out_dir_is_used_but_unrelated_content_is_not_touched(tmp_path):
    (tmp_path / "empty").mkdir()
    assert provision("c", PARTICIPANTS, tmp_path / "empty")["bankA"] == (tmp_path / "empty" / "bankA").resolve()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ProvisionError, match="neither empty nor a consortium"):
        provision("c", PARTICIPANTS, tmp_path / "busy", force=True)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]


# ---- the command line ------------------------------------------------------------------------


def test_cli_provision(tmp_path):
    runner = CliRunner()
    out = tmp_path / "pki"
    result = runner.invoke(app, ["provision", "--consortium", "c", "--participants", "aggregator,bankA,bankB",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split("\t") for line in lines] == [  # however long the paths, one line each
        [name, str(out.resolve() / name)] for name in ["aggregator", "bankA", "bankB", "airflow"]]
    assert (out / "bankB" / "key.pem").exists()

    result = runner.invoke(app, ["provision", "--consortium", "c", "--participants", "bankA,bankB",
                                 "--out", str(tmp_path / "other")])
    assert result.exit_code == 2
    assert "exactly one participant must be named 'aggregator'" in result.output
    assert not (tmp_path / "other").exists()


def test_relative_and_symlinked_out_dirs_resolve_to_the_real_folder(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    written = provision("c", PARTICIPANTS, Path("link"))
    assert written["bankA"] == (tmp_path / "real" / "bankA").resolve()
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "ca" / "ca.key").exists()
