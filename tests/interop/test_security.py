"""Security with a client that is not ours (node-opcua, tests/interop/client.mjs) against the gateway
serving the demo site, as a site would run it: SecurityPolicy None off, anonymous on (Viewer).

One gateway serves the whole module. Its trust list holds the interop client's application
certificate (trusted with the real `cmcs certs trust`), and the client trusts exactly the
gateway's certificate (`--server-certificate`), so both sides validate each other.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import Client, ua
from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.app import Gateway
from gateway.users import set_user
from simulator.endpoints import SimulatorHost
from siteconfig.demo import demo_site
from tests.integration.conftest import free_port, relocate_site

pytestmark = [pytest.mark.interop, pytest.mark.asyncio(loop_scope="module")]

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "client.mjs"
SITE_URI = "urn:cmcs-gateway:site:demo-hall"
POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
USERS = {"viewer": ("Viewer", "viewer-password-1"), "operator": ("Operator", "operator-password-1"),
         "engineer": ("Engineer", "engineer-password-1")}
CLIENT_TIMEOUT_S = 60
CURRENT_WRITE = 0x02  # AccessLevel bit CurrentWrite (Part 3 5.6.2)


def _node() -> str:
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.fail("node (Node.js >= 18) is not on PATH: the node-opcua interop tests need it")
    if not (HERE / "node_modules" / "node-opcua-client").is_dir():
        pytest.fail("node-opcua-client is not installed: run `cd tests/interop && npm ci` first")
    return node


async def node_client(*args: str) -> dict:
    """Run client.mjs (the gateway keeps serving on this loop); its JSON report, plus exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(_node(), str(CLIENT), *args, "--timeout", str(CLIENT_TIMEOUT_S - 10),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"node client did not finish within {CLIENT_TIMEOUT_S} s")
    try:
        report = json.loads(out.decode())
    except ValueError:
        pytest.fail(f"node client printed no JSON (exit {proc.returncode}): {out[:2000]!r}\n{err.decode()[-3000:]}")
    report["_exit"] = proc.returncode
    report["_stderr"] = err.decode(errors="replace")[-3000:]
    return report


def brief(report: dict) -> str:
    return json.dumps({k: v for k, v in report.items() if k not in ("_stderr", "namespaceArray")}, indent=1)[:4000]


async def cmcs(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """The real command line: `python -m gateway ARGS` (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, cwd=str(HERE.parent.parent),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None), 60)
    return proc.returncode, out.decode(), err.decode()


def thumbprint(path: Path) -> str:
    data = path.read_bytes()
    cert = (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data))
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def client_certificate(pki_dir: Path) -> Path:
    """Where client.mjs (node-opcua's default certificate manager) keeps its application certificate."""
    return pki_dir / "node-opcua-default-nodejs" / "PKI" / "own" / "certs" / "client_certificate.pem"


@dataclass
class Secured:
    url: str
    data: Path
    gateway: Gateway
    client_pki: Path
    server_cert: Path
    units_on_a: list[str] = field(default_factory=list)

    def secure(self, policy: str = "Basic256Sha256", mode: str = "SignAndEncrypt", pki: Path | None = None):
        return [self.url, "--security-mode", mode, "--security-policy", policy, "--pki-dir", str(pki or self.client_pki),
                "--server-certificate", str(self.server_cert)]

    def login(self, name: str | None) -> list[str]:
        return [] if name is None else ["--user", name, "--password", USERS[name][1]]

    def take_unit_on_source_a(self) -> str:
        """A micro-ATS on SourceA nobody has switched yet (the dwell time is per unit)."""
        return self.units_on_a.pop(0)

    def active_source(self, unit: str) -> int:
        return self.gateway.table.get(unit, "ActiveSource").value


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured(tmp_path_factory) -> Secured:
    _node()
    root = tmp_path_factory.mktemp("secured")
    data = root / "data"
    for name, (role, password) in USERS.items():
        set_user(data, name, role, password=password)
    site = relocate_site(demo_site())
    assert not site.gateway.opcua.allow_security_none and site.gateway.opcua.allow_anonymous  # the defaults
    host = SimulatorHost(site)
    port = free_port()
    gateway = Gateway(site, data, opcua_port=port, opcua_host="127.0.0.1")
    await host.start()
    try:
        await gateway.start()
        try:
            points = [(u.name, "ActiveSource") for u in site.units]
            deadline = time.monotonic() + 20
            while not all(gateway.table.get(d, p).quality.is_good for d, p in points):
                assert time.monotonic() < deadline, "the demo devices never polled Good"
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # past the next flush into the address space
            # the interop client's application certificate, trusted with the real CLI (FILE form)
            client_pki = root / "client-pki"
            made = await node_client("--make-certificate", "--pki-dir", str(client_pki))
            assert made["ok"], brief(made)
            code, out, err = await cmcs("certs", "trust", made["certificateFile"], "--data-dir", str(data))
            assert code == 0, err
            # units on SourceA, one aisle after another (a switch loads the other feed of its aisle)
            on_a = [u for u in site.units if gateway.table.get(u.name, "ActiveSource").value == 1]
            on_a.sort(key=lambda u: (int(u.name.rsplit("-", 1)[1]), u.aisle))
            yield Secured(f"opc.tcp://127.0.0.1:{port}/cmcs", data, gateway, client_pki,
                          data / "pki" / "own" / "cert.der", [u.name for u in on_a])
        finally:
            await gateway.stop()
    finally:
        await host.stop()


# ---- transport -----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
async def test_sign_and_encrypt_session_on_every_policy(secured, policy):
    ops = [{"op": "read", "ns": SITE_URI, "id": "SourceA.Voltage"},
           {"op": "read", "ns": SITE_URI, "id": "Cmcs.ModelVersion"}]
    report = await node_client(*secured.secure(policy), *secured.login("operator"), "--ops", json.dumps(ops))
    assert report["ok"], brief(report)
    assert report["securityMode"] == "SignAndEncrypt" and report["securityPolicy"] == policy
    # the client validated the gateway's certificate against exactly the one it was given
    assert report["serverCertificateTrusted"] == thumbprint(secured.server_cert)
    assert [o["statusCode"] for o in report["ops"]] == ["Good", "Good"], brief(report)
    assert report["ops"][0]["value"] > 100.0  # volts


async def test_sign_mode_with_an_encrypted_password(secured):
    """Sign only: the channel is not encrypted, so the password travels encrypted with the policy."""
    ops = [{"op": "read", "ns": SITE_URI, "id": "SourceA.Voltage"}]
    report = await node_client(*secured.secure("Aes256_Sha256_RsaPss", "Sign"), *secured.login("viewer"),
                               "--ops", json.dumps(ops))
    assert report["ok"] and report["ops"][0]["statusCode"] == "Good", brief(report)


async def test_security_none_is_not_offered_and_is_refused(secured):
    report = await node_client(secured.url, "--security-mode", "None", "--security-policy", "None",
                               "--pki-dir", str(secured.client_pki), "--ops", "[]")
    assert not report["ok"] and report["_exit"] != 0, brief(report)
    offered = {(e["securityMode"], e["securityPolicy"]) for e in report["endpoints"]}
    assert offered == {(m, p) for p in POLICIES for m in ("Sign", "SignAndEncrypt")}, report["endpoints"]
    assert all(set(e["userTokens"]) == {"Anonymous", "UserName", "Certificate"} for e in report["endpoints"])
    # node-opcua will not even try an endpoint that is not listed; asyncua's client does, which
    # shows the server's own refusal of a session on an unsecured channel
    client = Client(secured.url, timeout=10)
    with pytest.raises(ua.UaStatusCodeError) as refused:
        await client.connect()
    assert refused.value.code == ua.StatusCodes.BadSecurityPolicyRejected


async def test_untrusted_client_certificate_is_rejected_then_trusted_without_restart(secured, tmp_path):
    stranger = tmp_path / "stranger-pki"
    ops = [{"op": "read", "ns": SITE_URI, "id": "SourceA.Voltage"}]
    refused = await node_client(*secured.secure(pki=stranger), "--ops", json.dumps(ops))
    assert not refused["ok"], brief(refused)
    thumb = thumbprint(client_certificate(stranger))
    rejected = {thumbprint(f): f for f in (secured.data / "pki" / "rejected").iterdir()}
    assert thumb in rejected, (thumb, rejected)
    code, listing, err = await cmcs("certs", "list", "--data-dir", str(secured.data))
    assert code == 0, err
    assert any(line.startswith("rejected") and thumb in line for line in listing.splitlines()), listing

    # trust it by its name in pki/rejected/, as a UaExpert user would; the server is not restarted
    code, out, err = await cmcs("certs", "trust", rejected[thumb].name, "--data-dir", str(secured.data))
    assert code == 0, err
    assert not rejected[thumb].exists()
    assert thumb in {thumbprint(f) for f in (secured.data / "pki" / "trusted").iterdir()}
    accepted = await node_client(*secured.secure(pki=stranger), "--ops", json.dumps(ops))
    assert accepted["ok"] and accepted["ops"][0]["statusCode"] == "Good", brief(accepted)

    # and `cmcs certs reject` takes the trust back, again without a restart
    code, out, err = await cmcs("certs", "reject", thumb[:12], "--data-dir", str(secured.data))
    assert code == 0, err
    again = await node_client(*secured.secure(pki=stranger), "--ops", json.dumps(ops))
    assert not again["ok"], brief(again)


async def test_server_certificate_matches_the_application_uri(secured):
    cert = x509.load_der_x509_certificate(secured.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [secured.gateway.server.server.get_application_uri()]
    assert socket.gethostname() in san.get_values_for_type(x509.DNSName)
    assert cert.public_key().key_size >= 2048
    assert (secured.data / "pki" / "own" / "key.pem").stat().st_mode & 0o777 == 0o600


# ---- users and roles -----------------------------------------------------------------------------
ROLE_CASES = {
    # identity: (SwitchSource executable/succeeds, RiskThreshold writable, SetMode executable)
    None: (False, False, False),  # anonymous = Viewer
    "viewer": (False, False, False),
    "operator": (True, False, False),
    "engineer": (True, True, True),
}


@pytest.mark.parametrize("identity", list(ROLE_CASES), ids=lambda i: i or "anonymous")
async def test_roles_decide_calls_writes_and_what_the_client_reads(secured, identity):
    may_switch, may_write, may_set_mode = ROLE_CASES[identity]
    unit = secured.take_unit_on_source_a()
    threshold = {None: 0.31, "viewer": 0.32, "operator": 0.33, "engineer": 0.34}[identity]
    ops = [
        {"op": "read", "ns": SITE_URI, "id": f"{unit}.SwitchSource", "attribute": "UserExecutable"},
        {"op": "read", "ns": SITE_URI, "id": "Cmcs.SetMode", "attribute": "UserExecutable"},
        {"op": "read", "ns": SITE_URI, "id": "Cmcs.RiskThreshold", "attribute": "UserAccessLevel"},
        {"op": "read", "ns": SITE_URI, "id": "Cmcs.RiskThreshold", "attribute": "AccessLevel"},
        {"op": "read", "ns": SITE_URI, "id": f"{unit}.LoadPower", "attribute": "UserAccessLevel"},
        {"op": "call", "ns": SITE_URI, "object": unit, "method": f"{unit}.SwitchSource",
         "args": [{"dataType": "Int32", "value": 2}]},
        {"op": "write", "ns": SITE_URI, "id": "Cmcs.RiskThreshold", "dataType": "Double", "value": threshold},
        {"op": "write", "ns": SITE_URI, "id": f"{unit}.PreferredSource", "dataType": "Int32", "value": 2},
        {"op": "read", "ns": SITE_URI, "id": "Cmcs.RiskThreshold"},
    ]
    report = await node_client(*secured.secure(), *secured.login(identity), "--ops", json.dumps(ops))
    assert report["ok"], brief(report)
    assert report["identity"] == ("Anonymous" if identity is None else "UserName")
    (switch_exec, set_mode_exec, ual, al, ual_load, call, write, write_other, readback) = report["ops"]
    assert all(o["statusCode"] == "Good" for o in (switch_exec, set_mode_exec, ual, al, ual_load)), brief(report)

    # what the client reads matches what it may do
    assert switch_exec["value"] is may_switch, brief(report)
    assert set_mode_exec["value"] is may_set_mode, brief(report)
    assert al["value"] & CURRENT_WRITE  # the variable is writable (by someone)
    assert bool(ual["value"] & CURRENT_WRITE) is may_write, brief(report)
    assert not ual_load["value"] & CURRENT_WRITE and ual_load["value"] & 0x01  # telemetry: read only

    # and what it may do is what happens
    if may_switch:
        assert call["statusCode"] == "Good", brief(report)
        assert 0.0 < call["outputArguments"][0] < 5.0  # transfer time, ms
        assert secured.active_source(unit) == 2
    else:
        assert call["statusCode"] == "BadUserAccessDenied", brief(report)
        assert secured.active_source(unit) == 1
    if may_write:
        assert write["statusCode"] == "Good" and readback["value"] == pytest.approx(threshold), brief(report)
    else:
        assert write["statusCode"] == "BadUserAccessDenied", brief(report)
        assert readback["value"] != pytest.approx(threshold)
    assert write_other["statusCode"] in ("BadNotWritable", "BadUserAccessDenied"), brief(report)

    audit = [json.loads(line) for line in (secured.data / "audit.log").read_text().splitlines()]
    writes = [r for r in audit if r["method"] == "Write" and r["arguments"]["Value"] == threshold]
    assert [(r["user"], r["status"]) for r in writes] == [
        (identity or "anonymous", "Good" if may_write else "BadUserAccessDenied")]


async def test_engineer_setpoints_are_range_checked_and_mode_is_writable(secured):
    ops = [
        {"op": "write", "ns": SITE_URI, "id": "Cmcs.RiskThreshold", "dataType": "Double", "value": 1.5},
        {"op": "write", "ns": SITE_URI, "id": "Cmcs.Mode", "dataType": "Int32", "value": 7},
        {"op": "write", "ns": SITE_URI, "id": "Cmcs.Mode", "dataType": "Int32", "value": 2},
        {"op": "read", "ns": SITE_URI, "id": "Cmcs.Mode"},
        {"op": "call", "ns": SITE_URI, "object": "Cmcs", "method": "Cmcs.SetMode",
         "args": [{"dataType": "Int32", "value": 1}]},
        {"op": "read", "ns": SITE_URI, "id": "Cmcs.Mode"},
    ]
    report = await node_client(*secured.secure("Aes128_Sha256_RsaOaep"), *secured.login("engineer"),
                               "--ops", json.dumps(ops))
    assert report["ok"], brief(report)
    statuses = [o["statusCode"] for o in report["ops"]]
    assert statuses == ["BadOutOfRange", "BadOutOfRange", "Good", "Good", "Good", "Good"], brief(report)
    assert report["ops"][3]["value"] == 2 and report["ops"][5]["value"] == 1
    # an Operator may not change the mode either way
    ops = [{"op": "write", "ns": SITE_URI, "id": "Cmcs.Mode", "dataType": "Int32", "value": 0},
           {"op": "call", "ns": SITE_URI, "object": "Cmcs", "method": "Cmcs.SetMode",
            "args": [{"dataType": "Int32", "value": 0}]}]
    report = await node_client(*secured.secure(), *secured.login("operator"), "--ops", json.dumps(ops))
    assert [o["statusCode"] for o in report["ops"]] == ["BadUserAccessDenied", "BadUserAccessDenied"], brief(report)


async def test_an_outside_cmcs_reports_through_the_cmcs_methods(secured):
    """What a CMCS written with another stack (here node-opcua) does: write RiskScore, report a
    predicted failure with its lead time, clear it; an Operator may do none of it."""
    report_args = [{"dataType": "String", "value": "PDB-01-B"}, {"dataType": "Double", "value": 0.7},
                   {"dataType": "Double", "value": 1200.0}, {"dataType": "String", "value": "moving its units"}]
    ops = [
        {"op": "write", "ns": SITE_URI, "id": "PDB-01-B.RiskScore", "dataType": "Double", "value": 0.7},
        {"op": "call", "ns": SITE_URI, "object": "Cmcs", "method": "Cmcs.ReportPrediction", "args": report_args},
        {"op": "read", "ns": SITE_URI, "id": "PDB-01-B.RiskScore"},
    ]
    report = await node_client(*secured.secure(), *secured.login("operator"), "--ops", json.dumps(ops))
    assert [o["statusCode"] for o in report["ops"][:2]] == ["BadUserAccessDenied"] * 2, brief(report)
    alarms = secured.gateway.server.alarms
    assert not alarms.is_raised("PDB-01-B", "PredictedFailureAlarmType")
    ops[1:1] = [{"op": "call", "ns": SITE_URI, "object": "Cmcs", "method": "Cmcs.ReportPrediction",
                 "args": [{"dataType": "String", "value": "PDB-01-B"}, {"dataType": "Double", "value": 1.7},
                          {"dataType": "Double", "value": 1200.0}, {"dataType": "String", "value": ""}]}]
    report = await node_client(*secured.secure(), *secured.login("engineer"), "--ops", json.dumps(ops))
    assert [o["statusCode"] for o in report["ops"]] == ["Good", "BadOutOfRange", "Good", "Good"], brief(report)
    assert report["ops"][3]["value"] == pytest.approx(0.7)
    assert alarms.is_raised("PDB-01-B", "PredictedFailureAlarmType")
    ops = [{"op": "call", "ns": SITE_URI, "object": "Cmcs", "method": "Cmcs.ClearPrediction",
            "args": [{"dataType": "String", "value": "PDB-01-B"}]}]
    report = await node_client(*secured.secure(), *secured.login("engineer"), "--ops", json.dumps(ops))
    assert report["ops"][0]["statusCode"] == "Good", brief(report)
    assert not alarms.is_raised("PDB-01-B", "PredictedFailureAlarmType")


async def test_wrong_password_is_refused_logged_and_slowed_down(secured, caplog):
    caplog.set_level(logging.WARNING, logger="gateway")
    throttle = secured.gateway.server.security.throttle
    for name, password in (("operator", "not-the-password"), ("nobody", "whatever-it-is")):
        report = await node_client(*secured.secure(), "--user", name, "--password", password, "--ops", "[]")
        assert not report["ok"] and report["stage"] == "session", brief(report)
        assert "BadUserAccessDenied" in report["error"] or "BadIdentityTokenRejected" in report["error"], brief(report)
    assert throttle.failures("127.0.0.1") >= 2
    assert throttle.delay_s("127.0.0.1") > 0
    refusals = [r.getMessage() for r in caplog.records if "login refused from 127.0.0.1" in r.getMessage()]
    assert len(refusals) >= 2, [r.getMessage() for r in caplog.records]
    # the right password still works (after the delay) and clears the count
    report = await node_client(*secured.secure(), *secured.login("operator"), "--ops", "[]")
    assert report["ok"], brief(report)
    assert throttle.failures("127.0.0.1") == 0


def _user_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(f"urn:cmcs-test:user:{name}")],
        [ExtendedKeyUsageOID.CLIENT_AUTH], days=30)
    cert_path, key_path = directory / f"{name}.der", directory / f"{name}.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


async def test_x509_user_token_maps_a_certificate_to_a_user(secured, tmp_path):
    cert, key = _user_certificate(tmp_path, "xavier")
    code, out, err = await cmcs("users", "add", "xavier", "--role", "Operator", "--certificate", str(cert),
                                "--data-dir", str(secured.data))
    assert code == 0, err
    ops = [{"op": "read", "ns": SITE_URI, "id": f"{secured.units_on_a[0]}.SwitchSource", "attribute": "UserExecutable"},
           {"op": "read", "ns": SITE_URI, "id": "Cmcs.RiskThreshold", "attribute": "UserAccessLevel"}]
    report = await node_client(*secured.secure("Aes256_Sha256_RsaPss"), "--user-certificate", str(cert),
                               "--user-key", str(key), "--ops", json.dumps(ops))
    assert report["ok"] and report["identity"] == "Certificate", brief(report)
    assert report["ops"][0]["value"] is True and not report["ops"][1]["value"] & CURRENT_WRITE, brief(report)

    unknown_cert, unknown_key = _user_certificate(tmp_path, "mallory")
    report = await node_client(*secured.secure(), "--user-certificate", str(unknown_cert),
                               "--user-key", str(unknown_key), "--ops", "[]")
    assert not report["ok"] and report["stage"] == "session", brief(report)


async def test_anonymous_can_be_switched_off(secured, tmp_path):
    """A second gateway whose site turns anonymous off (no devices needed for a login)."""
    import dataclasses

    site = relocate_site(demo_site())
    site = dataclasses.replace(site, gateway=dataclasses.replace(
        site.gateway, opcua=dataclasses.replace(site.gateway.opcua, allow_anonymous=False)))
    data = tmp_path / "data"
    set_user(data, "operator", "Operator", password=USERS["operator"][1])
    port = free_port()
    gateway = Gateway(site, data, opcua_port=port, opcua_host="127.0.0.1")
    await gateway.start()
    try:
        code, out, err = await cmcs("certs", "trust", str(client_certificate(secured.client_pki)), "--data-dir", str(data))
        assert code == 0, err
        url = f"opc.tcp://127.0.0.1:{port}/cmcs"
        args = [url, "--security-mode", "SignAndEncrypt", "--security-policy", "Basic256Sha256",
                "--pki-dir", str(secured.client_pki), "--server-certificate", str(data / "pki" / "own" / "cert.der")]
        anonymous = await node_client(*args, "--ops", "[]")
        assert not anonymous["ok"] and anonymous["stage"] == "session", brief(anonymous)
        assert all("Anonymous" not in e["userTokens"] for e in anonymous["endpoints"]), anonymous["endpoints"]
        user = await node_client(*args, "--user", "operator", "--password", USERS["operator"][1], "--ops", "[]")
        assert user["ok"], brief(user)
    finally:
        await gateway.stop()
