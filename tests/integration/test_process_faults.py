"""kill -9 of the gateway while it writes history and while its CMCS acts, then a restart.

One process holds the whole site, as `cmcs run` without a site file does (simulators in-process),
but with the plant and the built-in CMCS 120x faster than real time (tests/integration/fault_gateway.py:
`cmcs run` has no speed option): every device is polled every 10 s of plant time (83 ms), so the
historian commits thousands of values at each flush, and the CMCS in Automatic mode acts within
seconds (the demo plant's slow micro-ATS: StartBridging, SetPreferredSource).

The process is killed with SIGKILL right after the CMCS's latest call is in the audit log, and
started again on the same data directory with the devices answering only 2 s after the gateway.

What is checked:
- history: the SQLite file passes `PRAGMA integrity_check`; everything committed before the kill is
  still there; the newest value committed was received (ServerTimestamp) at most 2 s before the kill.
  The bound: the historian's writer commits once per `flush_interval_s` (1 s, gateway/historian.py),
  so at most the last second is lost; one more second for the flush's own duration and the
  scheduling of its thread on a loaded 2-core machine. After the restart HistoryRead (raw, over
  OPC UA) returns exactly the values that were in the file for the seconds before the kill;
- the audit log: every line whole (each record is fsynced before the call returns);
- the CMCS: it comes back in Advisory (its safe mode: Mode is not carried over a restart, so a
  crash never leaves it acting unattended), and once the operator sets Automatic again at once, it
  calls nothing until the devices answer and its safe start is over (the policy waits for
  `safe_start_cycles` fresh cycles and one dwell time, cmcs/policy.py): no audited call by the CMCS
  user before the devices came up plus that time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from asyncua import Client, ua

from gateway.historian import DB_FILE_NAME
from gateway.security import CMCS_USER
from gateway.users import set_user
from siteconfig.demo import demo_site, site_to_yaml
from siteconfig.model import CmcsMode
from tests.integration.conftest import free_port, relocate_site

SPEED = 120.0
DWELL_PLANT_S = 300.0  # the site's dwell time: 5 min of plant time, 2.5 s here
DEVICES_AFTER_S = 2.0
FLUSH_INTERVAL_S = 1.0  # gateway/historian.py Historian.flush_interval_s default
LOST_AT_MOST_S = FLUSH_INTERVAL_S + 1.0
POINT = "MATS-02-03.LoadPower"
ENGINEER, ENGINEER_PASSWORD = "otto", "otto-engineer-pw"
CONTROL_METHODS = {"SwitchSource", "SetPreferredSource", "StartBridging", "StopBridging"}


def _site(tmp_path: Path):
    site = relocate_site(demo_site())
    g = site.gateway
    site = dataclasses.replace(site, gateway=dataclasses.replace(
        g, scan_groups_s={k: 10.0 / SPEED for k in g.scan_groups_s}, dwell_time_s=DWELL_PLANT_S / SPEED,
        opcua=dataclasses.replace(g.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True)))
    path = tmp_path / "site.yaml"
    path.write_text(site_to_yaml(site))
    return site, path


def _start(path: Path, data: Path, log: Path, devices_after_s: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.integration.fault_gateway", str(path), str(data), str(SPEED),
                             str(devices_after_s)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def _connect(url: str, timeout: float) -> Client:
    deadline = time.monotonic() + timeout
    while True:
        client = Client(url, timeout=10)
        client.set_user(ENGINEER)
        client.set_password(ENGINEER_PASSWORD)
        try:
            await client.connect()
            return client
        except (OSError, asyncio.TimeoutError, ua.UaError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _audit(data: Path) -> list[dict]:
    path = data / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _audit_time(record: dict) -> float:
    return datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def _cmcs_calls(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("user") == CMCS_USER and r.get("method") in CONTROL_METHODS]


def _committed(db: Path, key: str) -> list[tuple[int, int, object]]:
    """(source µs, server µs, value) of one node as committed in the file, oldest first (read only)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT sample.ts, sample.ts + server_lag, value FROM sample JOIN node ON node.id = "
                            "sample.node WHERE node.key = ? ORDER BY sample.ts", (key,)).fetchall()
    finally:
        conn.close()


async def _cmcs_object(client: Client, site) -> tuple[object, int, int]:
    """(the Cmcs object node, the site namespace index, the types namespace index)."""
    ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
    types_ns = await client.get_namespace_index("urn:cmcs-gateway:UA:PowerDistribution")
    site_obj = await client.nodes.objects.get_child(f"{ns}:{site.name}")
    return await site_obj.get_child(f"{ns}:Cmcs"), ns, types_ns


async def _set_automatic(cmcs, types_ns: int) -> None:
    await cmcs.call_method(f"{types_ns}:SetMode", ua.Variant(int(CmcsMode.AUTOMATIC), ua.VariantType.Int32))


async def test_kill_9_during_history_writes_and_a_cmcs_action_then_a_safe_restart(tmp_path: Path):
    site, path = _site(tmp_path)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    set_user(data, ENGINEER, "Engineer", password=ENGINEER_PASSWORD)
    url = f"opc.tcp://127.0.0.1:{site.gateway.opcua.port}/cmcs"
    key = f"urn:cmcs-gateway:site:{site.name}|s={POINT}"
    db = data / DB_FILE_NAME
    gw = _start(path, data, tmp_path / "run1.log")
    client = None
    try:
        # ---- first life: Automatic, acting; killed right after one of its calls -------------------
        client = await _connect(url, 30)
        cmcs, ns, types_ns = await _cmcs_object(client, site)
        await _set_automatic(cmcs, types_ns)
        deadline = time.monotonic() + 30
        while not _cmcs_calls(_audit(data)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        calls = _cmcs_calls(_audit(data))
        assert calls, "the CMCS made no call in Automatic mode: " + (tmp_path / "run1.log").read_text()[-2000:]
        assert len(_committed(db, key)) > 10  # the historian has been committing for a while
        seen_before_kill = _committed(db, key)
        t_kill = time.time()
        os.kill(gw.pid, signal.SIGKILL)
        assert gw.wait(timeout=10) == -signal.SIGKILL
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001 - the server is gone
            pass
        client = None

        # ---- what the kill left ------------------------------------------------------------------
        conn = sqlite3.connect(db)  # read-write: replays the WAL the kill left, as the restart will
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            conn.close()
        after_kill = _committed(db, key)
        assert after_kill[:len(seen_before_kill)] == seen_before_kill  # nothing committed was lost
        newest_server_s = after_kill[-1][1] / 1e6
        lost_s = t_kill - newest_server_s
        assert lost_s <= LOST_AT_MOST_S, f"newest value in history received {lost_s:.2f} s before the kill"
        records = _audit(data)  # every line parses: none torn by the kill
        assert _cmcs_calls(records)[:len(calls)] == calls

        # ---- second life: the devices answer only 2 s after the gateway --------------------------
        gw = _start(path, data, tmp_path / "run2.log", devices_after_s=DEVICES_AFTER_S)
        client = await _connect(url, 30)
        cmcs, ns, types_ns = await _cmcs_object(client, site)
        mode_node = await cmcs.get_child(f"{types_ns}:Mode")
        assert await mode_node.read_value() == CmcsMode.ADVISORY  # safe mode; it was Automatic when killed
        await _set_automatic(cmcs, types_ns)  # the operator lets it act again at once, before any data
        t_automatic = time.time()
        deadline = time.monotonic() + 20
        up = None
        while up is None and time.monotonic() < deadline:
            up = next((float(line.split()[-1]) for line in (tmp_path / "run2.log").read_text().splitlines()
                       if line.startswith("devices up at ")), None)
            await asyncio.sleep(0.1)
        assert up is not None, (tmp_path / "run2.log").read_text()[-2000:]
        safe_start_s = DWELL_PLANT_S / SPEED  # at least one dwell time of fresh data (plus 3 cycles)
        deadline = time.monotonic() + 15
        new_calls: list[dict] = []
        while not new_calls and time.monotonic() < deadline:
            new_calls = _cmcs_calls(_audit(data))[len(calls):]
            await asyncio.sleep(0.05)
        # the CMCS acts again (so the check below is not vacuous), but only after fresh data and its safe start
        assert new_calls, "the CMCS never acted after the restart: " + (tmp_path / "run2.log").read_text()[-2000:]
        first = _audit_time(new_calls[0])
        assert first >= up + safe_start_s - 0.1, (f"CMCS {new_calls[0]['method']} {first - up:.2f} s after the "
                                                  f"devices came up (safe start {safe_start_s:.1f} s)")

        # history served after the restart: exactly what the file held for the seconds before the kill
        point = client.get_node(ua.NodeId(POINT, ns))
        start = datetime.fromtimestamp(t_kill - 5, timezone.utc)
        end = datetime.fromtimestamp(t_kill, timezone.utc)
        served = await point.read_raw_history(start, end)
        in_file = [(ts, v) for ts, _srv, v in after_kill if start.timestamp() * 1e6 <= ts <= end.timestamp() * 1e6]
        assert [(round(dv.SourceTimestamp.replace(tzinfo=timezone.utc).timestamp() * 1e6), dv.Value.Value)
                for dv in served] == in_file
        print(f"history: newest value committed {lost_s:.2f} s before the kill (bound {LOST_AT_MOST_S:.1f} s), "
              f"{len(in_file)} values of {POINT} in the 5 s before it served after the restart; "
              f"CMCS: Advisory at restart, first call {first - up:.2f} s after the devices came up "
              f"(Automatic set {up - t_automatic:.2f} s before they did)")
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=30) == 0
    finally:
        if client is not None:
            try:
                await client.disconnect()
            except Exception:  # noqa: BLE001 - teardown goes on
                pass
        if gw.poll() is None:
            gw.kill()
            gw.wait()
