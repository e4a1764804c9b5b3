"""Network faults between the gateway and its devices: a veth link taken down inside a test namespace.

The demo site's simulators (`cmcs simulate --config`, a real process) serve every device inside a
network namespace made for this test, on the device end of a veth pair; the gateway runs in the
caller's namespace and polls them through the gateway end. Taking the device end down cuts the
devices off the way a pulled cable does (the packets go nowhere, nothing is refused): their values go
UncertainLastUsableValue at the first failed poll, BadCommunicationError after `gateway.stale_time_s`,
and Good again once the link is back, within two poll periods plus one connect timeout (the driver's
reconnect backoff is bounded by the shortest poll period of the connection, drivers/modbus/driver.py).
Then the devices are killed (kill -9 of the simulator) for 5 s and started again: Good within two poll
periods of their serving again (connects are refused at once, so no connect timeout here).
A SwitchSource to a unit whose data is not fresh is refused with BadCommunicationError by the command
service, audited, and nothing reaches the device.

Needs root (netns, veth); traffic only inside the namespace the test makes and removes.

Not covered here: a slowed device by `tc qdisc ... netem delay`: this kernel has no sch_netem
("Specified qdisc kind is unknown"); tests/integration/test_slow_device.py slows the device itself
instead (bench/fuzz_modbus.py, `slow_s`: every answer held 1.5 poll periods).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asyncua import Client, ua

from drivers.modbus.driver import REQUEST_TIMEOUT_S
from gateway.app import Gateway
from gateway.users import set_user
from siteconfig.demo import demo_site, site_to_yaml
from siteconfig.model import SourceSelection
from tsnwire.netns import VethLink, ip
from tests.integration.conftest import free_port, relocate_site

POLL_S = 0.5  # every scan group: the bound below is in poll periods
STALE_S = 2.0
UNIT = "MATS-01-01"
KILLED_FOR_S = 5.0  # an unbounded backoff (0.25 s doubling, up to 5 s) would be at 4 s by then
ENGINEER, ENGINEER_PASSWORD = "nina", "nina-engineer-pw"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and veth")


def _moved_to(site, host: str):
    """The same site with every device address on `host` (the ports kept)."""
    def moved(endpoint):
        return dataclasses.replace(endpoint, host=host)

    sources = tuple(dataclasses.replace(s, device=moved(s.device)) for s in site.sources)
    aisles = tuple(dataclasses.replace(
        a, pdbs=tuple(dataclasses.replace(p, device=moved(p.device)) for p in a.pdbs),
        units=tuple(dataclasses.replace(u, device=moved(u.device), storage=dataclasses.replace(
            u.storage, device=moved(u.storage.device)) if u.storage else None) for u in a.units))
        for a in site.aisles)
    return dataclasses.replace(site, sources=sources, aisles=aisles)


@pytest.fixture
def link():
    """A veth pair, the device end in a namespace of its own, addressed on a /30 unique to this run."""
    tag = f"nf{os.getpid() % 10000}{int(time.time() * 1000) % 1000}"
    octet = (os.getpid() + int(time.time())) % 250 + 1
    veth = VethLink(tag).create()
    try:
        gw_ip, dev_ip = f"10.251.{octet}.1", f"10.251.{octet}.2"
        ip("addr", "add", f"{gw_ip}/30", "dev", veth.gw_if)
        ip("-n", veth.dev_ns, "addr", "add", f"{dev_ip}/30", "dev", veth.dev_if)
        ip("-n", veth.dev_ns, "link", "set", "lo", "up")
        veth.gw_ip, veth.dev_ip = gw_ip, dev_ip
        yield veth
    finally:
        veth.remove()
    assert veth.dev_ns not in ip("netns", "list").stdout


def _simulate(link, path: Path, log) -> subprocess.Popen:
    """`cmcs simulate --config` inside the device namespace."""
    return subprocess.Popen([*link.exec_prefix(link.dev_ns), sys.executable, "-m", "gateway", "simulate", "--config",
                             str(path)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def _until_serving(log_path: Path, timeout: float) -> float:
    """Wait for the simulator's start-up line; returns how long ago (s) it was seen at most (one check period)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "cmcs simulate: serving site" in log_path.read_text():
            return 0.02
        await asyncio.sleep(0.02)
    raise AssertionError(f"the simulator did not start: {log_path.read_text()[-2000:]}")


async def _status(client: Client, ns: int, name: str) -> tuple[int, object]:
    dv = await client.get_node(ua.NodeId(f"{name}.LoadPower", ns)).read_data_value(raise_on_bad_status=False)
    return dv.StatusCode.value, dv.Value.Value


async def _until_status(client, ns, name, wanted: set[int], timeout: float) -> float:
    t0 = time.monotonic()
    seen = None
    while time.monotonic() - t0 < timeout:
        seen, _ = await _status(client, ns, name)
        if seen in wanted:
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}: status {ua.StatusCode(seen).name} after {timeout:g} s, "
                         f"wanted {[ua.StatusCode(w).name for w in wanted]}")


async def test_a_cut_link_goes_uncertain_then_bad_recovers_in_two_polls_and_refuses_commands(tmp_path: Path, link):
    site = relocate_site(demo_site())
    site = _moved_to(site, link.dev_ip)
    g = site.gateway
    site = dataclasses.replace(site, gateway=dataclasses.replace(
        g, scan_groups_s={k: POLL_S for k in g.scan_groups_s}, stale_time_s=STALE_S,
        opcua=dataclasses.replace(g.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True)))
    path = tmp_path / "site.yaml"
    path.write_text(site_to_yaml(site))
    log = open(tmp_path / "simulate.log", "w")
    sim = _simulate(link, path, log)
    set_user(tmp_path, ENGINEER, "Engineer", password=ENGINEER_PASSWORD)
    gateway = Gateway(site, tmp_path)
    client = Client(f"opc.tcp://127.0.0.1:{site.gateway.opcua.port}/cmcs", timeout=10)
    client.set_user(ENGINEER)
    client.set_password(ENGINEER_PASSWORD)
    try:
        await gateway.start()
        await client.connect()
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
        await _until_status(client, ns, UNIT, {ua.StatusCodes.Good}, 30)
        active_node = client.get_node(ua.NodeId(f"{UNIT}.ActiveSource", ns))
        active_before = await active_node.read_value()
        target = SourceSelection.SOURCE_B if active_before == SourceSelection.SOURCE_A else SourceSelection.SOURCE_A

        # cut: the device end goes down, packets are lost (nothing refuses the connection)
        ip("-n", link.dev_ns, "link", "set", link.dev_if, "down")
        t_cut = time.monotonic()
        uncertain_after = await _until_status(client, ns, UNIT, {ua.StatusCodes.UncertainLastUsableValue}, 5)
        # the first failed poll: at most one poll period plus the request timeout
        assert uncertain_after <= POLL_S + REQUEST_TIMEOUT_S + 0.5, uncertain_after
        # ... and it keeps its last value while Uncertain
        assert (await _status(client, ns, UNIT))[1] is not None
        await _until_status(client, ns, UNIT, {ua.StatusCodes.BadCommunicationError}, STALE_S + 5)
        bad_after = time.monotonic() - t_cut
        # Bad once the last good read is older than the stale time (it was read at most one poll before the cut)
        assert STALE_S - POLL_S - 0.2 <= bad_after <= STALE_S + 2.0, bad_after

        # a command to a unit whose data is not fresh: refused, audited, nothing reaches the device
        unit_obj = client.get_node(ua.NodeId(UNIT, ns))
        methods = {(await m.read_browse_name()).Name: m for m in await unit_obj.get_methods()}
        with pytest.raises(ua.UaStatusCodeError) as refused:
            await unit_obj.call_method(methods["SwitchSource"].nodeid, ua.Variant(int(target), ua.VariantType.Int32))
        assert refused.value.code == ua.StatusCodes.BadCommunicationError

        # keep it down long enough for the driver's backoff to grow to its bound
        await asyncio.sleep(1.5)
        ip("-n", link.dev_ns, "link", "set", link.dev_if, "up")
        good_after = await _until_status(client, ns, UNIT, {ua.StatusCodes.Good}, 15)
        # within two poll periods of the device answering again; the attempt under way when the link
        # came back may have sent its SYN into the void: it gives up after the connect timeout
        bound = 2 * POLL_S + REQUEST_TIMEOUT_S + 0.5
        assert good_after <= bound, f"Good {good_after:.2f} s after the link came back (bound {bound:.2f} s)"
        await asyncio.sleep(2 * POLL_S)
        assert await active_node.read_value() == active_before  # the refused transfer never happened
        records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
        switches = [r for r in records if r.get("method") == "SwitchSource"]
        assert [(r["object"], r["user"], r["status"]) for r in switches] == [(UNIT, ENGINEER, "BadCommunicationError")]

        # the devices killed (kill -9 of the simulator: connections reset, then refused) and started
        # again after long enough for an unbounded backoff to have grown to seconds
        sim.kill()
        sim.wait(timeout=10)
        await _until_status(client, ns, UNIT, {ua.StatusCodes.UncertainLastUsableValue,
                                               ua.StatusCodes.BadCommunicationError}, 5)
        await asyncio.sleep(KILLED_FOR_S)
        log.close()
        log = open(tmp_path / "simulate2.log", "w")
        sim = _simulate(link, path, log)
        answering = await _until_serving(tmp_path / "simulate2.log", 30)
        restarted_after = await _until_status(client, ns, UNIT, {ua.StatusCodes.Good}, 15) + answering
        # refused connects fail at once: Good within two poll periods of the device serving again
        restart_bound = 2 * POLL_S + 0.3
        assert restarted_after <= restart_bound, (f"Good {restarted_after:.2f} s after the device served again "
                                                  f"(bound {restart_bound:.2f} s)")
        print(f"Uncertain {uncertain_after:.2f} s, Bad {bad_after:.2f} s after the cut; "
              f"Good {good_after:.2f} s after the link came back (bound {bound:.2f} s); "
              f"Good {restarted_after:.2f} s after the killed device served again (bound {restart_bound:.2f} s)")
    finally:
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001 - teardown goes on
            pass
        await gateway.stop()
        sim.terminate()
        try:
            sim.wait(timeout=20)
        except subprocess.TimeoutExpired:
            sim.kill()
        log.close()
