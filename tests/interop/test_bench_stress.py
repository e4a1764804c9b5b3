"""The pieces of `cmcs bench gateway`'s stress case, small: what the long benchmark relies on.

- bench/stress_devices.py, polled by the real Modbus driver: every point of every device changes
  on every read (the case's premise), and the values decode to what the profile allows;
- tests/interop/bench_server.mjs (node-opcua) measured by tests/interop/bench_client.mjs: the
  client counts the changes the server publishes at the offered rate, with their latency.

Needs Node >= 18 and `npm ci` in tests/interop (CI's .ci/run does it).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest

from bench import stress
from bench.stress_devices import serve
from drivers.modbus.driver import ModbusDriver
from drivers.pointtable import PointTable, Quality, Sink
from siteconfig.demo import free_port, generate_site
from siteconfig.points import POINTS

pytestmark = pytest.mark.interop


class _Counter(Sink):
    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], list] = {}

    def changes(self, batch) -> None:
        for c in batch:
            if c.quality is Quality.GOOD:
                self.seen.setdefault((c.device, c.point), []).append(c.value)


def test_stress_devices_change_every_point_on_every_read():
    site = stress.stress_site(generate_site(1, 3), 0.2)

    async def run() -> tuple[PointTable, _Counter]:
        servers = await serve(site)
        table = PointTable()
        driver = ModbusDriver(site, table)
        counter = _Counter()
        table.attach(counter)
        await driver.start()
        await asyncio.sleep(1.1)  # about five scans
        await driver.stop()
        for s in servers:
            s.close()
        return table, counter

    table, counter = asyncio.run(run())
    for name, kind, _ in site.devices():
        for p in POINTS[kind]:
            seen = counter.seen.get((name, p.name), [])
            assert len(seen) >= 3, (name, p.name, seen)
            assert all(a != b for a, b in zip(seen, seen[1:])), (name, p.name, seen)  # changed on each read
            assert set(seen) <= ({False, True} if p.kind == "bool" else {10.0, 20.0} if p.kind == "float" else {1, 2})


def test_node_opcua_bench_server_and_client_count_published_changes(tmp_path):
    why = stress.node_available()
    assert why is None, why
    names = [(f"DEV-{k}.P{i}", t) for k in range(5) for i, t in enumerate(("Double", "Int32", "Boolean"))]
    vars_file, ids_file = tmp_path / "vars.json", tmp_path / "ids.json"
    vars_file.write_text(json.dumps({"namespace": "urn:test:bench", "vars": names}))
    ids_file.write_text(json.dumps({"namespace": "urn:test:bench", "ids": [i for i, _ in names]}))
    port = free_port()
    server = subprocess.Popen(["node", str(stress.INTEROP_DIR / "bench_server.mjs"), "--port", str(port), "--vars",
                               str(vars_file), "--scan-s", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              cwd=stress.INTEROP_DIR, text=True)
    try:
        assert json.loads(server.stdout.readline()) == {"ready": True, "variables": len(names)}
        t0 = time.time()
        out = subprocess.run(["node", str(stress.INTEROP_DIR / "bench_client.mjs"), "--endpoint",
                              f"opc.tcp://127.0.0.1:{port}/cmcs", "--ids", str(ids_file), "--publishing-ms", "100",
                              "--warmup-s", "0.5", "--window-s", "2"], capture_output=True, text=True, timeout=60,
                             cwd=stress.INTEROP_DIR)
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        assert lines[0] == {"recording": True}
        result = lines[-1]
        assert result["ok"], result
        offered = len(names) / 0.2
        # every variable changes every 0.2 s: the client sees (nearly) all of it, soon after it happened
        assert 0.5 * offered <= result["updates_per_s"] <= 1.2 * offered, (offered, result)  # timers lag under load
        assert 0 <= result["latency_p50_s"] <= result["latency_p99_s"] < 1.0
        assert time.time() - t0 < 60
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_server_only_mode_publishes_every_point_changing_every_scan():
    """The server-only side of the stress case (bench.workers gateway --mode server): the gateway's
    OPC UA side fed by a timer, measured by the same node-opcua client as the other two servers."""
    why = stress.node_available()
    assert why is None, why
    site = generate_site(1, 3)
    r = asyncio.run(stress.measure_server_only(site, 0.2, 2.0))
    assert "error" not in r, r
    assert r["variables"] == sum(len(POINTS[kind]) for _, kind, _ in site.devices())
    # every variable alternates every 0.2 s scan, staggered in 20 slices: nearly all of it arrives
    # (a feed that changed them only every other period would give half)
    assert 0.8 * r["offered_per_s"] <= r["updates_per_s"] <= 1.2 * r["offered_per_s"], r
    assert 0 <= r["latency_p99_s"] < 1.0, r
    assert r["cpu_percent"] > 0, r
