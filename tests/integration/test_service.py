"""The gateway as a systemd service: the unit file, sd_notify, SIGHUP reload, SIGTERM with the last history flush.

The unit is checked by systemd itself (`systemd-analyze verify`, and `security --offline` for the
hardening and the TSN drop-in). `cmcs run` is then started the way systemd starts it, with a
NOTIFY_SOCKET the test listens on and a watchdog period, and must say READY=1 and keep the watchdog
fed; SIGHUP reloads users and refuses a site-file change that cannot be made live (a changed
derating, named in the log as needing a restart), and a second SIGHUP brings an added unit into
the address space; `--metrics PORT` serves the Prometheus endpoint on loopback; SIGTERM stops it with exit code 0 after STOPPING=1, and the audit event of a
value written just before is in the history database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from asyncua import Client, ua

from gateway.users import set_user
from siteconfig.demo import demo_site, site_to_yaml
from tests.integration.conftest import free_port, relocate_site

REPO = Path(__file__).resolve().parents[2]
UNIT = "cmcs-gateway.service"


def _install(tmp_path: Path, *extra: str) -> Path:
    proc = subprocess.run([sys.executable, "-m", "gateway", "install-service", "--root", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "etc" / "systemd" / "system"


def _analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"})


def test_unit_file_passes_systemd_analyze_verify_and_grants_raw_sockets_only_with_the_tsn_dropin(tmp_path):
    plain = _install(tmp_path / "plain")
    verified = _analyze(plain, "verify", UNIT)
    assert verified.returncode == 0 and UNIT not in verified.stderr, verified.stderr
    text = (plain / UNIT).read_text()
    for line in ("User=cmcs", "StateDirectory=cmcs", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=\n", "Restart=on-failure", "Type=notify", "WatchdogSec="):
        assert line in text, line
    assert f"ExecStart={Path(sys.executable).with_name('cmcs')}" in text or "ExecStart=/" in text
    security = _analyze(plain, "security", "--offline=yes", UNIT)
    exposure = float(security.stdout.rsplit("Overall exposure level for", 1)[1].split(":")[1].split()[0])
    assert exposure <= 2.0, security.stdout[-600:]  # 0 best .. 10 worst; 1.5 measured
    assert "✓ RestrictAddressFamilies=~AF_PACKET" in security.stdout

    tsn = _install(tmp_path / "tsn", "--tsn")
    verified = _analyze(tsn, "verify", UNIT)
    assert verified.returncode == 0 and "tsn.conf" not in verified.stderr, verified.stderr
    security = _analyze(tsn, "security", "--offline=yes", UNIT)
    assert "✗ RestrictAddressFamilies=~AF_PACKET" in security.stdout  # the drop-in is applied: raw frames allowed


class NotifyListener:
    """The service manager's end of sd_notify: a datagram socket collecting the messages."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages += self.sock.recv(4096).decode().split("\n")
            except BlockingIOError:
                return self.messages

    async def wait_for(self, line: str, timeout_s: float, after: int = 0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            messages = self.drain()
            for i in range(after, len(messages)):
                if messages[i] == line or (line.endswith("=") and messages[i].startswith(line)):
                    return i
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {line!r} within {timeout_s} s; got {self.messages[-10:]}")


async def test_cmcs_run_notifies_systemd_reloads_on_sighup_and_flushes_history_on_sigterm(tmp_path):
    site = relocate_site(demo_site())
    opcua = dataclasses.replace(site.gateway.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True)
    site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, opcua=opcua))
    last = site.aisles[-1]
    added = last.units[-1]  # not in the site file the gateway starts with; a second SIGHUP brings it in
    started = dataclasses.replace(site, aisles=(*site.aisles[:-1], dataclasses.replace(last, units=last.units[:-1])))
    site_file = tmp_path / "site.yaml"
    site_file.write_text(site_to_yaml(started))
    data_dir = tmp_path / "data"
    listener = NotifyListener(tmp_path / "notify.sock")
    log = open(tmp_path / "gateway.log", "w")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
           "WATCHDOG_USEC": "400000"}
    metrics_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(site_file), "--data-dir",
                             str(data_dir), "--no-cmcs", "--metrics", str(metrics_port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    unit = site.units[0]
    try:
        ready = await listener.wait_for("READY=1", 60)
        first = await listener.wait_for("WATCHDOG=1", 2, after=ready)
        await listener.wait_for("WATCHDOG=1", 2, after=first + 1)  # fed every WATCHDOG_USEC / 2
        # --metrics PORT: plain HTTP on loopback; the devices are not there, so they are down
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        assert f'cmcs_device_up{{device="{unit.name}"}} 0.0' in scraped and "cmcs_build_info{" in scraped

        # SIGHUP: a new user is taken, a site-file change that needs a restart is refused with its reason
        set_user(data_dir, "ops-engineer", "Engineer", password="ops-engineer-pw")
        site_file.write_text(site_file.read_text().replace("derating: 0.8", "derating: 0.75"))
        proc.send_signal(signal.SIGHUP)
        reloading = await listener.wait_for("RELOADING=1", 10)
        await listener.wait_for("READY=1", 10, after=reloading)
        text = (tmp_path / "gateway.log").read_text()
        assert "reload: users file" in text and "(1 users)" in text, text[-2000:]
        assert "site reload refused: gateway.derating changed (0.8 -> 0.75) (needs a restart)" in text, text[-2000:]
        # SIGHUP again with a unit added (and the derating as it was): applied live
        site_file.write_text(site_to_yaml(site))
        proc.send_signal(signal.SIGHUP)
        reloading = await listener.wait_for("RELOADING=1", 10, after=reloading + 1)
        await listener.wait_for("READY=1", 10, after=reloading)
        text = (tmp_path / "gateway.log").read_text()
        assert f"applied live: ats {added.name} added to {last.name}" in text, text[-2000:]

        # the user added before SIGHUP logs in (still serving); as the CMCS does, it publishes a
        # (historized) risk score, just before the stop
        engineer = Client(f"opc.tcp://127.0.0.1:{opcua.port}/cmcs", timeout=10)
        engineer.set_user("ops-engineer")
        engineer.set_password("ops-engineer-pw")
        async with engineer:
            ns = await engineer.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
            tns = await engineer.get_namespace_index("urn:cmcs-gateway:UA:PowerDistribution")
            ats = await engineer.nodes.objects.get_child([f"{ns}:{site.name}", f"{ns}:Aisles", f"{ns}:{unit.aisle}",
                                                          f"{ns}:{unit.name}"])
            risk = await ats.get_child(f"{tns}:RiskScore")
            await risk.write_value(ua.DataValue(ua.Variant(0.4242, ua.VariantType.Double)))
            new_unit = await engineer.nodes.objects.get_child([f"{ns}:{site.name}", f"{ns}:Aisles", f"{ns}:{last.name}",
                                                               f"{ns}:{added.name}"])
            assert (await new_unit.read_browse_name()).Name == added.name  # in the address space, no restart
        proc.send_signal(signal.SIGTERM)
        await listener.wait_for("STOPPING=1", 15)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "gateway.log").read_text()
    assert "cmcs-gateway: stopped" in text and "Traceback" not in text, text[-3000:]
    with sqlite3.connect(data_dir / "history.sqlite3") as db:
        stored = db.execute("SELECT COUNT(*) FROM sample_readable WHERE node LIKE ? AND value = 0.4242",
                            (f"%{unit.name}.RiskScore%",)).fetchone()[0]
    assert stored == 1  # the last value reached the history before exit (the historian writes once a second)
