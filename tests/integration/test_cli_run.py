"""`cmcs simulate` and `cmcs run --config` as two real processes, the way a site runs them."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from asyncua import Client, ua

from cmcs.models import SHIPPED_BUNDLE, Predictor
from siteconfig.demo import demo_site, site_to_yaml

from ..tsn_site import write_tsn_site
from .conftest import free_port, relocate_site

REPO = Path(__file__).resolve().parents[2]


def _site_file(tmp_path):
    site = relocate_site(demo_site())
    opcua = dataclasses.replace(site.gateway.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True)
    site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, opcua=opcua))
    path = tmp_path / "site.yaml"
    path.write_text(site_to_yaml(site))
    return site, path


def _start(args, tmp_path, name):
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "gateway", *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}), log


def _stop(*procs) -> None:
    """SIGINT each process still running; kill it if it has not stopped within 20 s."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _first_good_read(url: str, ns_uri: str, node: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            async with Client(url, timeout=5) as client:
                ns = await client.get_namespace_index(ns_uri)
                dv = await client.get_node(ua.NodeId(node, ns)).read_data_value(raise_on_bad_status=False)
                if dv.StatusCode.is_good():
                    return dv.Value.Value
        except (OSError, asyncio.TimeoutError, ua.UaError) as exc:
            last_error = exc
        await asyncio.sleep(0.5)
    raise AssertionError(f"no Good value from {url}: {last_error}")


async def _wait_version(url: str, ns_uri: str, timeout: float) -> str:
    """Cmcs.ModelVersion once a CMCS has written it ("" until then)."""
    deadline = time.monotonic() + timeout
    version = ""
    while not version and time.monotonic() < deadline:
        version = await _first_good_read(url, ns_uri, "Cmcs.ModelVersion", 10)
        await asyncio.sleep(0.5)
    return version


async def test_run_against_a_separate_simulator_and_stop_cleanly(tmp_path):
    site, path = _site_file(tmp_path)
    sim, sim_log = _start(["simulate", "--config", str(path)], tmp_path, "simulate")
    gw = None
    try:
        gw, gw_log = _start(["run", "--config", str(path), "--data-dir", str(tmp_path / "data")], tmp_path, "run")
        url = f"opc.tcp://127.0.0.1:{site.gateway.opcua.port}/cmcs"
        value = await _first_good_read(url, f"urn:cmcs-gateway:site:{site.name}", "MATS-02-03.LoadPower", 60)
        assert value > 0
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
        # the built-in CMCS logged in (its own certificate, X509 token, role Engineer) and wrote its model version
        version = await _wait_version(url, f"urn:cmcs-gateway:site:{site.name}", 60)
        assert version == Predictor.load(SHIPPED_BUNDLE).version, (tmp_path / "run.log").read_text()[-2000:]
        assert (tmp_path / "data" / "cmcs" / "key.pem").stat().st_mode & 0o777 == 0o600
        users = (tmp_path / "data" / "users.yaml").read_text()
        assert "cmcs" in users and "Engineer" in users and "password" not in users.split("cmcs:")[-1].split("\n\n")[0]
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=30) == 0
        output = (tmp_path / "run.log").read_text()
        assert "stopped" in output and "Traceback" not in output
    finally:
        _stop(gw, sim)
    assert sim.returncode == 0, (tmp_path / "simulate.log").read_text()[-2000:]


def test_run_with_a_bad_site_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: {name: x, nominal_voltage_v: -1, frequency_hz: 60}\n")
    proc = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(bad), "--data-dir",
                           str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "bad.yaml:1" in proc.stderr


def test_run_refuses_driver_tsn_without_its_interface_in_one_line(tmp_path):
    """A tsn site whose gateway.tsn.interface does not exist here: one line naming it, before anything serves."""
    site = write_tsn_site(tmp_path, "no-such-if0")
    proc = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(site), "--data-dir",
                           str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        "cmcs: error: cannot start: driver tsn: no network interface 'no-such-if0' here (gateway.tsn.interface)")


def _client_certificate(tmp_path, uri: str):
    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, "remote-cmcs", {}, [x509.UniformResourceIdentifier(uri)], [ExtendedKeyUsageOID.CLIENT_AUTH], days=30)
    cert_path, key_path = tmp_path / "remote.der", tmp_path / "remote.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


async def test_cmcs_agent_runs_against_a_remote_gateway(tmp_path):
    """`cmcs run --no-cmcs` + `cmcs agent` in another process, trusted and logged in by certificate."""
    site, path = _site_file(tmp_path)
    data = tmp_path / "data"
    cert, key = _client_certificate(tmp_path, "urn:test:remote-cmcs")
    for args in (["certs", "trust", str(cert)], ["users", "add", "remote", "--role", "Engineer", "--certificate", str(cert)]):
        done = subprocess.run([sys.executable, "-m", "gateway", *args, "--data-dir", str(data)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    sim, _ = _start(["simulate", "--config", str(path)], tmp_path, "simulate")
    gw = agent = None
    try:
        gw, _ = _start(["run", "--config", str(path), "--data-dir", str(data), "--no-cmcs"], tmp_path, "run")
        url = f"opc.tcp://127.0.0.1:{site.gateway.opcua.port}/cmcs"
        ns_uri = f"urn:cmcs-gateway:site:{site.name}"
        await _first_good_read(url, ns_uri, "MATS-02-03.LoadPower", 60)
        assert await _first_good_read(url, ns_uri, "Cmcs.ModelVersion", 5) == ""  # no CMCS yet
        agent, _ = _start(["agent", "--config", str(path), "--endpoint", url, "--certificate", str(cert),
                           "--private-key", str(key), "--security", "Aes256_Sha256_RsaPss:SignAndEncrypt"],
                          tmp_path, "agent")
        version = await _wait_version(url, ns_uri, 60)
        assert version == Predictor.load(SHIPPED_BUNDLE).version, (tmp_path / "agent.log").read_text()[-2000:]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
        output = (tmp_path / "agent.log").read_text()
        assert "stopped" in output and "Traceback" not in output
    finally:
        _stop(agent, gw, sim)


def test_cmcs_agent_bad_arguments_are_one_line(tmp_path):
    site, path = _site_file(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gateway", "agent", "--config", str(path), "--endpoint",
                           "opc.tcp://127.0.0.1:1/cmcs", "--certificate", str(tmp_path / "nope.der"),
                           "--private-key", str(tmp_path / "nope.pem")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "nope.der: no such file" in proc.stderr


def test_run_with_an_unusable_model_bundle_is_one_line(tmp_path):
    site, path = _site_file(tmp_path)
    bad = tmp_path / "bundle"
    bad.mkdir()
    (bad / "bundle.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(path), "--data-dir",
                           str(tmp_path / "d"), "--bundle", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "model bundle" in proc.stderr and "bundle.json unreadable" in proc.stderr
