"""Security pieces that need no OPC UA client: `cmcs users` and `cmcs certs` as real processes,
password hashing, the server certificate, the failed-login throttle, per-role access levels.
Sessions with a real client (node-opcua) are in tests/interop/test_security.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from asyncua import ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import UserRole
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import security
from gateway.users import (TOKEN_KIND, GatewayUserManager, hash_password, load_users, set_user, users_path,
                           verify_password)

ROOT = Path(__file__).resolve().parents[2]


def cmcs(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 or lines[-1].startswith("cmcs"), proc.stderr
    return lines[-1]


# ---- users -------------------------------------------------------------------------------------------
def test_users_add_stores_an_scrypt_hash_not_the_password(tmp_path):
    data = tmp_path / "data"
    password = "correct horse battery staple"
    proc = cmcs("users", "add", "alice", "--role", "Operator", "--password-stdin", "--data-dir", str(data),
                stdin=password + "\n")
    assert proc.returncode == 0, proc.stderr
    path = data / "users.yaml"
    text = path.read_text()
    assert password not in text and "horse" not in text
    assert path.stat().st_mode & 0o777 == 0o600
    assert data.stat().st_mode & 0o777 == 0o700
    entry = yaml.safe_load(text)["users"]["alice"]
    assert entry["role"] == "Operator"
    scheme, n, r, p, salt, key = entry["password"].split("$")
    assert scheme == "scrypt" and int(n) >= 2**14 and int(r) >= 8 and int(p) >= 1
    assert verify_password(password, entry["password"]) and not verify_password("wrong", entry["password"])

    # changing the role keeps the password (role names in any case); list shows one line per user
    assert cmcs("users", "add", "alice", "--role", "engineer", "--password-stdin", "--data-dir", str(data),
                stdin=password + "\n").returncode == 0
    assert cmcs("users", "add", "bob", "--role", "Viewer", "--password-stdin", "--data-dir", str(data),
                stdin="bob-password\n").returncode == 0
    listing = cmcs("users", "list", "--data-dir", str(data))
    assert listing.returncode == 0
    assert [line.split("\t")[:2] for line in listing.stdout.splitlines()] == [["alice", "Engineer"], ["bob", "Viewer"]]
    assert cmcs("users", "remove", "bob", "--data-dir", str(data)).returncode == 0
    assert list(load_users(path)) == ["alice"]


def test_users_errors_are_one_line(tmp_path):
    data = str(tmp_path / "data")
    assert "at least 8" in one_line_error(cmcs("users", "add", "carl", "--role", "Viewer", "--password-stdin",
                                                "--data-dir", data, stdin="short\n"))
    assert one_line_error(cmcs("users", "add", "carl", "--role", "Root", "--password-stdin", "--data-dir", data,
                               stdin="long-enough\n"))
    assert "bad user name" in one_line_error(cmcs("users", "add", "bad name", "--role", "Viewer", "--password-stdin",
                                                  "--data-dir", data, stdin="long-enough\n"))
    assert "--password-stdin" in one_line_error(cmcs("users", "add", "carl", "--role", "Viewer", "--data-dir", data))
    assert "no user" in one_line_error(cmcs("users", "remove", "nobody", "--data-dir", data))


def test_hashes_are_salted():
    a, b = hash_password("same-password"), hash_password("same-password")
    assert a != b and verify_password("same-password", a) and verify_password("same-password", b)
    assert not verify_password("same-password", "plain-text-in-the-file")


def test_user_manager_never_hands_out_asyncua_admin(tmp_path):
    set_user(tmp_path, "root", "Admin", password="admin-password")
    manager = GatewayUserManager(users_path(tmp_path), allow_anonymous=True)
    token = TOKEN_KIND.set("username")
    try:
        user = manager.get_user(None, username="root", password="admin-password")
        assert user.role is UserRole.User and user.cmcs_role == "Admin"  # asyncua's Admin skips its checks
        assert manager.get_user(None, username="root", password="nope") is None
        assert manager.get_user(None, username="ghost", password="admin-password") is None
    finally:
        TOKEN_KIND.reset(token)
    token = TOKEN_KIND.set("anonymous")
    try:
        assert manager.get_user(None).cmcs_role == "Viewer"
        assert GatewayUserManager(users_path(tmp_path), allow_anonymous=False).get_user(None) is None
    finally:
        TOKEN_KIND.reset(token)
    # a user added while the gateway runs can log in at once
    set_user(tmp_path, "late", "Operator", password="late-password")
    token = TOKEN_KIND.set("username")
    try:
        assert manager.get_user(None, username="late", password="late-password").cmcs_role == "Operator"
    finally:
        TOKEN_KIND.reset(token)


# ---- certificates ------------------------------------------------------------------------------------
def _client_cert(tmp_path: Path, name: str) -> Path:
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(f"urn:test:{name}")], [ExtendedKeyUsageOID.CLIENT_AUTH], days=30)
    path = tmp_path / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_certs_create_list_trust_reject(tmp_path):
    data = tmp_path / "data"
    proc = cmcs("certs", "create", "--hostname", "gw1.example", "--hostname", "gw1", "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    own = data / "pki" / "own"
    cert = x509.load_der_x509_certificate((own / "cert.der").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw1.example", "gw1"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier)[0].startswith("urn:cmcs-gateway:")
    assert (own / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (data / "pki").stat().st_mode & 0o777 == 0o700

    # renewal keeps the ApplicationUri and changes the key
    uri = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert cmcs("certs", "create", "--data-dir", str(data)).returncode == 0
    renewed = x509.load_der_x509_certificate((own / "cert.der").read_bytes())
    assert security.san_uris(renewed) == uri and security.thumbprint_of(renewed) != security.thumbprint_of(cert)

    client = _client_cert(tmp_path, "scada-1")
    thumb = security.thumbprint_of(security.load_certificate_file(client))
    proc = cmcs("certs", "trust", str(client), "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    trusted = list((data / "pki" / "trusted").iterdir())
    assert [f.name for f in trusted] == [f"scada-1_{thumb}.der"]
    listing = cmcs("certs", "list", "--data-dir", str(data)).stdout.splitlines()
    assert [line.split()[0] for line in listing] == ["own", "trusted"]
    assert thumb in listing[1] and "CN=scada-1" in listing[1] and "not-after" in listing[1]

    proc = cmcs("certs", "reject", thumb[:10], "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    assert list((data / "pki" / "trusted").iterdir()) == []
    assert [f.name for f in (data / "pki" / "rejected").iterdir()] == [f"scada-1_{thumb}.der"]
    assert "no certificate" in one_line_error(cmcs("certs", "trust", "nothing-like-this", "--data-dir", str(data)))
    (tmp_path / "junk.pem").write_text("not a certificate")
    assert "not a PEM or DER" in one_line_error(cmcs("certs", "trust", str(tmp_path / "junk.pem"),
                                                     "--data-dir", str(data)))


def test_server_certificate_is_made_once_and_renewed_for_another_uri(tmp_path):
    pki = security.Pki.of(tmp_path / "data")
    first = security.ensure_server_certificate(pki, "urn:cmcs-gateway:host:site-a")
    assert security.san_uris(first) == ["urn:cmcs-gateway:host:site-a"]
    assert security.ensure_server_certificate(pki, "urn:cmcs-gateway:host:site-a") == first
    other = security.ensure_server_certificate(pki, "urn:cmcs-gateway:host:site-b")
    assert security.san_uris(other) == ["urn:cmcs-gateway:host:site-b"] and other != first


async def test_trust_list_is_reread_when_it_changes(tmp_path):
    pki = security.Pki.of(tmp_path / "data").ensure()
    checker = security.ClientCertificates(pki)
    client = security.load_certificate_file(_client_cert(tmp_path, "hmi-7"))
    der = security.der(client)
    assert await checker.check(der) == ua.StatusCodes.BadCertificateUntrusted
    rejected = pki.rejected / security.cert_file_name(client)
    assert rejected.exists()
    rejected.rename(pki.trusted / rejected.name)
    assert await checker.check(der) == ua.StatusCodes.Good
    (pki.trusted / rejected.name).unlink()
    assert await checker.check(der) == ua.StatusCodes.BadCertificateUntrusted


# ---- failed logins ------------------------------------------------------------------------------------
def test_login_throttle_backs_off_per_address_and_forgets():
    now = [1000.0]
    throttle = security.LoginThrottle(base_delay_s=0.5, max_delay_s=8.0, forget_after_s=600.0, clock=lambda: now[0])
    assert throttle.delay_s("10.0.0.5") == 0.0
    delays = []
    for _ in range(7):
        throttle.failed("10.0.0.5")
        delays.append(throttle.delay_s("10.0.0.5"))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert throttle.delay_s("10.0.0.6") == 0.0  # per address
    now[0] += 601.0
    assert throttle.delay_s("10.0.0.5") == 0.0  # forgotten after a quiet while
    throttle.failed("10.0.0.5")
    throttle.succeeded("10.0.0.5")
    assert throttle.delay_s("10.0.0.5") == 0.0


# ---- per-role access levels ------------------------------------------------------------------------------
@pytest.mark.parametrize("role, writable, executable", [
    ("Viewer", False, False), ("Operator", False, True), ("Engineer", True, True), ("Admin", True, True)])
def test_access_policy_per_role(role, writable, executable):
    threshold, load, switch = ua.NodeId("Cmcs.RiskThreshold", 3), ua.NodeId("M.LoadPower", 3), ua.NodeId("M.Sw", 3)
    policy = security.AccessPolicy({threshold: security.WRITABLE_POINTS[0]}, {switch: "Operator"})
    read, write, history = ua.AccessLevel.CurrentRead.mask, ua.AccessLevel.CurrentWrite.mask, ua.AccessLevel.HistoryRead.mask
    assert policy.user_access_level(role, threshold, read | write) == (read | write if writable else read)
    assert policy.user_access_level(role, load, read | write | history) == read | history
    assert policy.user_executable(role, switch, True) is executable
    assert policy.user_executable(role, ua.NodeId(11492), True) is True  # not ours: as stored
