"""The Prometheus endpoint of a running gateway (docs/interface.md section 9), scraped by a real Prometheus.

The demo site's simulators run in-process (real Modbus TCP on loopback), the gateway polls them,
the built-in CMCS cycles 20x faster than real time, and the metrics endpoint is served over TLS
with basic auth, as it would be for a remote scraper. A Debian `prometheus` started by the test
scrapes it every second; its HTTP API must then know every series of section 9. The same
endpoint refuses a scrape without credentials, counts a refused method call by its StatusCode,
and the periodic log summary reports the devices and the CMCS.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from asyncua import Client, ua

from gateway.app import Gateway
from gateway.users import hash_password
from simulator.endpoints import SimulatorHost
from siteconfig.demo import demo_site
from siteconfig.model import MetricsConfig
from tests.integration.conftest import free_port, relocate_site

SPEED = 90.0  # plant seconds per wall second: the CMCS warms up (1800 s of plant time) in 20 s
SCRAPER, SCRAPER_PASSWORD = "prometheus", "scrape-me-not-guess-me"
SECTION_9 = ("cmcs_device_up", "cmcs_poll_duration_seconds_bucket", "cmcs_poll_overruns_total", "cmcs_opcua_sessions",
             "cmcs_opcua_monitored_items", "cmcs_cycle_seconds", "cmcs_risk_score", "cmcs_commands_total",
             "cmcs_mqtt_queue_messages", "cmcs_build_info")


def _tls_pair(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "metrics.pem", folder / "metrics.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


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


async def test_a_real_prometheus_scrapes_every_section_9_series_over_tls_with_basic_auth(tmp_path: Path, caplog):
    cert, key = _tls_pair(tmp_path)
    site = relocate_site(demo_site())
    g = site.gateway
    metrics_port = free_port()
    site = dataclasses.replace(site, gateway=dataclasses.replace(
        g, scan_groups_s={k: 10.0 / SPEED for k in g.scan_groups_s}, log_summary_s=1.0,
        opcua=dataclasses.replace(g.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True),
        metrics=MetricsConfig(host="127.0.0.1", port=metrics_port, tls_cert=str(cert), tls_key=str(key),
                              basic_auth_user=SCRAPER, basic_auth_password_hash=hash_password(SCRAPER_PASSWORD))))
    host = SimulatorHost(site, speed=SPEED)
    gateway = Gateway(site, tmp_path / "data", cmcs=True, cmcs_time_scale=SPEED)
    prom_port = free_port()
    (tmp_path / "web.yml").write_text("")
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
    await host.start()
    await gateway.start()
    try:
        url = f"https://127.0.0.1:{metrics_port}/metrics"
        status, _ = await asyncio.to_thread(_get, url, cert, None)
        assert status == 401
        status, _ = await asyncio.to_thread(_get, url, cert, (SCRAPER, "wrong"))
        assert status == 401
        status, text = await asyncio.to_thread(_get, url, cert, (SCRAPER, SCRAPER_PASSWORD))
        assert status == 200
        # labelled series that exist from start-up: every method x status at 0, the build
        assert 'cmcs_commands_total{method="SwitchSource",status="BadRequestNotAllowed"} 0.0' in text
        assert 'cmcs_commands_total{method="SetMode",status="Good"} 0.0' in text
        assert 'cmcs_build_info{version="' in text

        # an anonymous client (role Viewer) tries a transfer: refused, and counted
        async with Client(f"opc.tcp://127.0.0.1:{site.gateway.opcua.port}/cmcs", timeout=10) as client:
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
                    result = await asyncio.to_thread(_prometheus_api, prom_port, "/api/v1/query?query=%7B__name__%3D~%22cmcs_.%2A%22%7D")
                except OSError:
                    continue
                found = {}
                for sample in result["data"]["result"]:
                    found.setdefault(sample["metric"]["__name__"], []).append(sample)
                up = {s["metric"]["device"]: s["value"][1] for s in found.get("cmcs_device_up", [])}
                refusals = [s for s in found.get("cmcs_commands_total", [])
                            if s["metric"] == {**s["metric"], "method": "SwitchSource", "status": "BadUserAccessDenied"}]
                missing = [name for name in SECTION_9 if name not in found]
                if (not missing and up and all(v == "1" for v in up.values()) and refusals
                        and refusals[0]["value"][1] == "1"
                        and len(found["cmcs_risk_score"]) >= len(site.units) and float(found["cmcs_cycle_seconds"][0]["value"][1]) > 0
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
        summaries = [r.getMessage() for r in caplog.records if r.name == "gateway.summary"]
        assert any(f"devices {len(site.devices())}/{len(site.devices())} up" in line and "CMCS Advisory, cycle" in line
                   and "commands" in line for line in summaries), summaries[-3:]
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        await gateway.stop()
        await host.stop()
