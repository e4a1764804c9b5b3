"""A slowed device: it answers every request, faithfully, but later than the gateway waits.

This kernel has no sch_netem to delay packets (tests/integration/test_network_faults.py), so the
delay is the device's: aisle 1's endpoint is reached through bench/fuzz_modbus.py's HostileDevice,
a proxy to the real simulator that, while `slow_s` is set, holds each answer that long (1.5 poll
periods, past the driver's request timeout). Its devices' values go UncertainLastUsableValue at the
first late answer, BadCommunicationError once the last good read is older than the stale time; a
SwitchSource to a unit whose data is not fresh (Uncertain or Bad) is refused by the command service
with BadCommunicationError and no write request reaches the device; once the device answers at once
again, the values are Good within two poll periods of its first prompt answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import pytest
from asyncua import Client, ua

from bench.fuzz_modbus import HostileDevice
from bench.robustness import hostile_site
from drivers.modbus.driver import REQUEST_TIMEOUT_S
from gateway.app import Gateway
from gateway.users import set_user
from simulator.endpoints import SimulatorHost
from siteconfig.demo import demo_site
from siteconfig.model import SourceSelection

from .conftest import free_port, relocate_site

POLL_S = 1.0  # every scan group
SLOW_S = 1.5 * POLL_S
STALE_S = 3.0
ENGINEER, ENGINEER_PASSWORD = "nina", "nina-engineer-pw"
SC = ua.StatusCodes


async def test_a_slowed_device_goes_uncertain_then_bad_refuses_commands_and_recovers_in_two_polls(tmp_path: Path):
    assert SLOW_S > REQUEST_TIMEOUT_S  # else the late answers would still be taken, and this tested nothing
    site = relocate_site(demo_site())
    g = site.gateway
    site = dataclasses.replace(site, gateway=dataclasses.replace(
        g, scan_groups_s={k: POLL_S for k in g.scan_groups_s}, stale_time_s=STALE_S,
        opcua=dataclasses.replace(g.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True)))
    gateway_site, upstream = hostile_site(site, free_port())
    slowed_port = gateway_site.aisles[0].pdbs[0].device.port
    unit = next(u for u in gateway_site.aisles[0].units if u.device.port == slowed_port).name
    other = gateway_site.aisles[-1].units[0].name
    set_user(tmp_path, ENGINEER, "Engineer", password=ENGINEER_PASSWORD)
    host = SimulatorHost(site)
    device = HostileDevice(slowed_port, upstream)
    gateway = Gateway(gateway_site, tmp_path)
    client = Client(f"opc.tcp://127.0.0.1:{gateway_site.gateway.opcua.port}/cmcs", timeout=10)
    client.set_user(ENGINEER)
    client.set_password(ENGINEER_PASSWORD)
    await host.start()
    await device.start()
    try:
        await gateway.start()
        await client.connect()
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")

        async def status(name: str) -> int:
            dv = await client.get_node(ua.NodeId(f"{name}.LoadPower", ns)).read_data_value(raise_on_bad_status=False)
            return dv.StatusCode.value

        async def until(name: str, wanted: int, timeout_s: float) -> float:
            t0 = time.monotonic()
            while (seen := await status(name)) != wanted:
                assert time.monotonic() - t0 < timeout_s, (f"{name}: {ua.StatusCode(seen).name} after {timeout_s:g} s, "
                                                           f"wanted {ua.StatusCode(wanted).name}")
                await asyncio.sleep(0.05)
            return time.monotonic() - t0

        unit_obj = client.get_node(ua.NodeId(unit, ns))
        switch = ua.NodeId(f"{unit}.SwitchSource", ns)

        async def refused_switch(target: SourceSelection) -> None:
            with pytest.raises(ua.UaStatusCodeError) as refused:
                await unit_obj.call_method(switch, ua.Variant(int(target), ua.VariantType.Int32))
            assert refused.value.code == SC.BadCommunicationError

        await until(unit, SC.Good, 30)
        active = SourceSelection(await client.get_node(ua.NodeId(f"{unit}.ActiveSource", ns)).read_value())
        target = SourceSelection.SOURCE_B if active == SourceSelection.SOURCE_A else SourceSelection.SOURCE_A
        writes0, late0 = device.writes, device.late_answers
        device.slow_s = SLOW_S
        t_slowed = time.monotonic()
        uncertain_after = await until(unit, SC.UncertainLastUsableValue, POLL_S + SLOW_S + 1.0)
        await refused_switch(target)  # Uncertain: the unit's state is not fresh
        assert await status(unit) == SC.UncertainLastUsableValue
        await until(unit, SC.BadCommunicationError, STALE_S + 3.0)
        bad_after = time.monotonic() - t_slowed
        assert STALE_S - POLL_S - 0.3 <= bad_after <= STALE_S + POLL_S + SLOW_S, bad_after
        await refused_switch(target)  # Bad
        assert await status(other) == SC.Good  # the other aisles' devices are not held up
        assert device.late_answers > late0  # it was answering, late, not silent

        device.slow_s = 0.0
        released = time.monotonic()
        good_after = await until(unit, SC.Good, 15)
        assert device.first_prompt_at is not None and device.first_prompt_at >= released
        since_prompt = time.monotonic() - device.first_prompt_at
        # within two poll periods of the device answering at once again (the answer in flight when it
        # was released is still late: the driver gives up on it after its request timeout)
        assert since_prompt <= 2 * POLL_S, f"Good {since_prompt:.2f} s after the first prompt answer"
        assert good_after <= 2 * POLL_S + REQUEST_TIMEOUT_S + SLOW_S, good_after

        assert device.writes == writes0  # no command reached the device
        await asyncio.sleep(POLL_S)
        assert await client.get_node(ua.NodeId(f"{unit}.ActiveSource", ns)).read_value() == active
        records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
        switches = [(r["object"], r["user"], r["status"]) for r in records if r.get("method") == "SwitchSource"]
        assert switches == [(unit, ENGINEER, "BadCommunicationError")] * 2
        print(f"Uncertain {uncertain_after:.2f} s, Bad {bad_after:.2f} s after the device slowed to {SLOW_S:g} s; "
              f"Good {since_prompt:.2f} s after its first prompt answer ({good_after:.2f} s after release)")
    finally:
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001 - teardown goes on
            pass
        await gateway.stop()
        await device.stop()
        await host.stop()
