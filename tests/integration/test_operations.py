"""Operations of a running gateway: `cmcs status` under tmux, and its metrics scraped by a real Prometheus.

One gateway serves both tests (module scope): the demo site's simulators run in-process (real
Modbus TCP on loopback) 150x faster than real time with SourceB lost 15 s (plant time) after start,
the gateway polls them, the built-in CMCS cycles and warms up (1800 s of plant time) in 12 s.

- `cmcs status` runs in a tmux session as an Operator (a trusted client certificate,
  Aes256_Sha256_RsaPss SignAndEncrypt, user name and password typed at its prompt); the screen must show both feeds with their
  loading, an aisle's units and the SourceLoss alarm; the Operator acknowledges it with `a`, and
  `2` (CMCS Automatic, an Engineer's right) is refused on screen, not with a crash.
- The metrics endpoint is served over TLS with basic auth, as for a remote scraper; a Debian
  `prometheus` started by the test scrapes it every second, and its HTTP API must then know every
  series of docs/interface.md section 9. The endpoint refuses a scrape without credentials, counts
  a refused method call by its StatusCode, and the periodic log summary reports devices and CMCS.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import Client, ua

from gateway.app import Gateway
from gateway.users import hash_password, set_user
from simulator.endpoints import SimulatorHost
from simulator.scenario import Fault, Scenario
from siteconfig.demo import demo_site
from siteconfig.model import MetricsConfig
from tests.integration.conftest import free_port, relocate_site
from tests.ops_certs import tls_pair

pytestmark = pytest.mark.asyncio(loop_scope="module")

SPEED = 150.0  # plant seconds per wall second: the CMCS warms up (1800 s of plant time) in 12 s
SCRAPER, SCRAPER_PASSWORD = "prometheus", "scrape-me-not-guess-me"
OPERATOR, OPERATOR_PASSWORD = "olga", "olga-operator-pw"
SECTION_9 = ("cmcs_device_up", "cmcs_poll_duration_seconds_bucket", "cmcs_poll_overruns_total", "cmcs_opcua_sessions",
             "cmcs_opcua_monitored_items", "cmcs_cycle_seconds", "cmcs_risk_score", "cmcs_commands_total",
             "cmcs_mqtt_queue_messages", "cmcs_build_info")
REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Running:
    site: object
    gateway: Gateway
    cert: Path
    metrics_port: int
    opcua_url: str
    tmp: Path
    client_cert: Path
    client_key: Path


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def running(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ops")
    cert, key = tls_pair(tmp)
    site = relocate_site(demo_site())
    g = site.gateway
    metrics_port = free_port()
    site = dataclasses.replace(site, gateway=dataclasses.replace(
        g, scan_groups_s={k: 10.0 / SPEED for k in g.scan_groups_s}, log_summary_s=1.0,
        opcua=dataclasses.replace(g.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True),
        metrics=MetricsConfig(host="127.0.0.1", port=metrics_port, tls_cert=str(cert), tls_key=str(key),
                              basic_auth_user=SCRAPER, basic_auth_password_hash=hash_password(SCRAPER_PASSWORD))))
    scenario = Scenario(duration_s=86400, seed=1, faults=(Fault("source_outage", "SourceB", 15.0, 0.0, 0.5,
                                                                duration_s=80000.0),))
    data_dir = tmp / "data"
    set_user(data_dir, OPERATOR, "Operator", password=OPERATOR_PASSWORD)
    client_cert, client_key = _client_certificate(tmp, "urn:test:cmcs-status")
    trusted = data_dir / "pki" / "trusted"
    trusted.mkdir(parents=True, exist_ok=True)
    shutil.copy(client_cert, trusted / client_cert.name)  # what `cmcs certs trust` does
    host = SimulatorHost(site, scenario=scenario, speed=SPEED)
    gateway = Gateway(site, data_dir, cmcs=True, cmcs_time_scale=SPEED)
    await host.start()
    await gateway.start()
    try:
        yield Running(site, gateway, cert, metrics_port, f"opc.tcp://127.0.0.1:{site.gateway.opcua.port}/cmcs", tmp,
                      client_cert, client_key)
    finally:
        await gateway.stop()
        await host.stop()

def _client_certificate(folder: Path, uri: str) -> tuple[Path, Path]:
    """An OPC UA application-instance certificate for `cmcs status` (SubjectAltName URI = its ApplicationUri)."""
    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, "cmcs-status", {}, [x509.UniformResourceIdentifier(uri)], [ExtendedKeyUsageOID.CLIENT_AUTH], days=30)
    cert_path, key_path = folder / "status.der", folder / "status.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


def _get(url: str, cafile: Path, auth: tuple[str, str] | None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    context = ssl.create_default_context(cafile=str(cafile))
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _prometheus_api(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def _tmux(socket_name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", "-L", socket_name, *args], capture_output=True, text=True, timeout=20)


async def _screen_until(socket_name: str, predicate, timeout_s: float, what: str) -> str:
    deadline = time.monotonic() + timeout_s
    screen = ""
    while time.monotonic() < deadline:
        screen = (await asyncio.to_thread(_tmux, socket_name, "capture-pane", "-p", "-t", "status")).stdout
        if predicate(screen):
            return screen
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what} not on screen within {timeout_s:.0f} s:\n{screen}")


async def test_cmcs_status_under_tmux_shows_feeds_units_and_an_alarm_and_acts_by_role(running: Running):
    socket_name = f"cmcs-status-{os.getpid()}"
    command = (f"cd {REPO} && env -u COLUMNS -u LINES PYTHONPATH={os.environ.get('PYTHONPATH', REPO)} {sys.executable} -m gateway -vv status "
               f"--endpoint {running.opcua_url} --certificate {running.client_cert} --private-key {running.client_key} "
               f"--security Aes256_Sha256_RsaPss:SignAndEncrypt --user {OPERATOR} 2>{running.tmp / 'status.err'}")
    started = _tmux(socket_name, "new-session", "-d", "-s", "status", "-x", "200", "-y", "60", command)
    assert started.returncode == 0, started.stderr
    try:
        await _screen_until(socket_name, lambda s: f"password for {OPERATOR}:" in s, 20, "the password prompt")
        _tmux(socket_name, "send-keys", "-t", "status", OPERATOR_PASSWORD, "Enter")
        unit = running.site.units[0]
        screen = await _screen_until(
            socket_name, lambda s: all(word in s for word in ("Feed A", "Feed B", unit.aisle, unit.name,
                                                              "SourceLoss", "SourceB", "% of")), 30,
            "feeds, the first aisle's units and the SourceLoss alarm")
        assert f"connected as {OPERATOR}" in screen
        assert "LOST" in screen  # Feed B's source is gone
        assert all(u.name in screen for u in running.site.units if u.aisle == unit.aisle)
        # an Operator may acknowledge; the CMCS mode is an Engineer's: refused on screen, still running
        _tmux(socket_name, "send-keys", "-t", "status", "2")
        screen = await _screen_until(socket_name, lambda s: "SetMode(Automatic) refused: BadUserAccessDenied" in s, 15,
                            "the refused SetMode")
        # `a` acknowledges the selected alarm (the first row, marked ">"; with the CMCS raising
        # LossOfRedundancy on the units fed by SourceB it need not be the SourceLoss alarm, and the
        # rows may re-sort between this screen and the key as the CMCS raises more: the line below the
        # view names the one it acknowledged, and that condition is acknowledged on the server)
        selected = re.search(r">\s+(\S+)\s+(\w+)\s+\d+\s+active, unacked", screen)
        assert selected, f"no selected unacknowledged alarm on screen:\n{screen}"
        _tmux(socket_name, "send-keys", "-t", "status", "a")
        screen = await _screen_until(socket_name, lambda s: re.search(r"\] acknowledged (\S+) (\w+)", s), 15,
                                     "the acknowledgement")
        source, alarm = re.search(r"\] acknowledged (\S+) (\w+)", screen).groups()
        conditions = running.gateway.server.alarms.conditions
        assert conditions[(source, f"{alarm}AlarmType")].acked
        _tmux(socket_name, "send-keys", "-t", "status", "q")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _tmux(socket_name, "has-session", "-t", "status").returncode == 0:
            await asyncio.sleep(0.2)
        assert _tmux(socket_name, "has-session", "-t", "status").returncode != 0, "q did not end cmcs status"
        err = (running.tmp / "status.err").read_text()
        assert "Traceback" not in err, err
    finally:
        _tmux(socket_name, "kill-server")


async def test_a_real_prometheus_scrapes_every_section_9_series_over_tls_with_basic_auth(running: Running, caplog):
    site, gateway, cert, metrics_port, tmp_path = (running.site, running.gateway, running.cert, running.metrics_port,
                                                   running.tmp)
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, scrape_timeout: 900ms}}
scrape_configs:
  - job_name: cmcs
    scheme: https
    tls_config: {{ca_file: {cert}}}
    basic_auth: {{username: {SCRAPER}, password: {SCRAPER_PASSWORD}}}
    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]
""")
    prometheus = None
    caplog.set_level(logging.INFO, logger="gateway.summary")
    try:
        url = f"https://127.0.0.1:{metrics_port}/metrics"
        status, _ = await asyncio.to_thread(_get, url, cert, None)
        assert status == 401
        status, _ = await asyncio.to_thread(_get, url, cert, (SCRAPER, "wrong"))
        assert status == 401
        status, text = await asyncio.to_thread(_get, url, cert, (SCRAPER, SCRAPER_PASSWORD))
        assert status == 200
        # labelled series that exist from start-up: every method x status, the build
        assert 'cmcs_commands_total{method="SwitchSource",status="BadRequestNotAllowed"} 0.0' in text
        assert 'cmcs_commands_total{method="StopBridging",status="BadTooManyOperations"} 0.0' in text
        assert 'cmcs_build_info{version="' in text

        # an anonymous client (role Viewer) tries a transfer: refused, and counted
        async with Client(running.opcua_url, timeout=10) as client:
            ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
            tns = await client.get_namespace_index("urn:cmcs-gateway:UA:PowerDistribution")
            unit = site.units[0]
            ats = await client.nodes.objects.get_child([f"{ns}:{site.name}", f"{ns}:Aisles", f"{ns}:{unit.aisle}",
                                                        f"{ns}:{unit.name}"])
            with pytest.raises(ua.UaStatusCodeError) as refused:
                await ats.call_method(f"{tns}:SwitchSource", ua.Variant(2, ua.VariantType.Int32))
            assert refused.value.code == ua.StatusCodes.BadUserAccessDenied
            sub = await client.create_subscription(200, None)
            await sub.subscribe_data_change(await ats.get_child(f"{tns}:LoadPower"))

            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
            # every series in Prometheus, devices up, the CMCS's risk and cycle in, the refusal counted
            deadline = time.monotonic() + 60
            found: dict[str, list[dict]] = {}
            missing = list(SECTION_9)
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                try:
                    result = await asyncio.to_thread(_prometheus_api, prom_port,
                                                     "/api/v1/query?query=%7B__name__%3D~%22cmcs_.%2A%22%7D")
                except OSError:
                    continue
                found = {}
                for sample in result["data"]["result"]:
                    found.setdefault(sample["metric"]["__name__"], []).append(sample)
                up = {s["metric"]["device"]: s["value"][1] for s in found.get("cmcs_device_up", [])}
                refusals = [s["value"][1] for s in found.get("cmcs_commands_total", [])
                            if (s["metric"]["method"], s["metric"]["status"]) == ("SwitchSource", "BadUserAccessDenied")]
                missing = [name for name in SECTION_9 if name not in found]
                if (not missing and up and all(v == "1" for v in up.values()) and refusals == ["1"]
                        and len(found["cmcs_risk_score"]) >= len(site.units)
                        and float(found["cmcs_cycle_seconds"][0]["value"][1]) > 0
                        and float(found["cmcs_opcua_monitored_items"][0]["value"][1]) >= 1):
                    break
            else:
                raise AssertionError(f"Prometheus lacks {missing}; has {sorted(found)}; "
                                     f"log: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
        assert set(up) == {name for name, _, _ in site.devices()}
        assert {s["metric"]["component"] for s in found["cmcs_risk_score"]} >= {u.name for u in site.units}
        assert float(found["cmcs_opcua_sessions"][0]["value"][1]) >= 2  # this client and the built-in CMCS
        connections = {s["metric"]["connection"] for s in found["cmcs_poll_duration_seconds_bucket"]}
        assert connections == {h.key for h in gateway.driver.health()}
        active = [float(s["value"][1]) for s in found["cmcs_alarms_active"]]
        assert active and active[0] >= 1  # SourceB's loss
        summaries = [r.getMessage() for r in caplog.records if r.name == "gateway.summary"]
        assert any(f"devices {len(site.devices())}/{len(site.devices())} up" in line and "CMCS Advisory, cycle" in line
                   and "alarms active" in line for line in summaries), summaries[-3:]
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)


async def test_sighup_reload_restarts_the_cmcs_on_a_new_model_bundle(running: Running):
    """Last in the module: it restarts the built-in CMCS. A `cmcs train` since start left another
    bundle in <data-dir>/models/current; the reload runs the CMCS on it, without a gateway restart."""
    from cmcs.models import SHIPPED_BUNDLE

    from gateway.reload import reload_gateway

    gateway = running.gateway
    before = gateway.live.predictor.version
    assert (await reload_gateway(gateway)).cmcs_bundle == ""  # nothing new: the CMCS keeps running
    assert gateway.live.predictor.version == before
    current = gateway.data_dir / "models" / "current"
    shutil.copytree(SHIPPED_BUNDLE, current)
    meta = json.loads((current / "bundle.json").read_text())
    meta["version"] = before + ".retrained"
    (current / "bundle.json").write_text(json.dumps(meta))
    report = await reload_gateway(gateway)
    assert report.cmcs_bundle == before + ".retrained"
    assert gateway.live.predictor.version == before + ".retrained" and not gateway._cmcs_task.done()
    assert (report.users, report.trusted) == (2, 2)  # the CMCS and the operator; their two certificates
    assert report.site_changes == []  # a built-in site: no file to compare
    async with Client(running.opcua_url, timeout=10) as client:  # what clients see
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{running.site.name}")
        tns = await client.get_namespace_index("urn:cmcs-gateway:UA:PowerDistribution")
        version = await client.nodes.objects.get_child([f"{ns}:{running.site.name}", f"{ns}:Cmcs", f"{tns}:ModelVersion"])
        deadline = time.monotonic() + 20
        while await version.read_value() != before + ".retrained" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await version.read_value() == before + ".retrained"
