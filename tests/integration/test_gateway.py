"""The gateway end to end: plant-backed Modbus devices on real sockets, the real driver, the
OPC UA server, and an OPC UA client (asyncua's) calling methods and subscribing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import pytest
from asyncua import Client, ua

from drivers.pointtable import Sink
from gateway.app import Gateway
from gateway.users import set_user
from simulator.endpoints import SimulatorHost
from simulator.scenario import Fault, Scenario
from siteconfig.demo import demo_site
from siteconfig.model import AtsState

from .conftest import every_device_read, free_port, relocate_site

NS_URI = "urn:cmcs-gateway:site:demo-hall"
RIG_PASSWORD = "rig-password"


def fast_site(**gateway_overrides):
    site = relocate_site(demo_site())
    # these tests are about the plant and the interlocks: the plain None endpoint (security: test_security.py)
    opcua = dataclasses.replace(site.gateway.opcua, allow_security_none=True)
    gw = dataclasses.replace(site.gateway, stale_time_s=3.0, opcua=opcua, **gateway_overrides)
    return dataclasses.replace(site, gateway=gw)


class Rig:
    """Simulators + gateway + one OPC UA client session."""

    def __init__(self, site, scenario=None, tmp_path: Path | None = None):
        self.site = site
        self.host = SimulatorHost(site, scenario=scenario)
        self.port = free_port()
        self.gateway = Gateway(site, tmp_path, opcua_port=self.port, opcua_host="127.0.0.1")
        self.client = Client(f"opc.tcp://127.0.0.1:{self.port}/cmcs", timeout=10)
        set_user(tmp_path, "rig", "Admin", password=RIG_PASSWORD)  # anonymous is only a Viewer
        self.client.set_user("rig")
        self.client.set_password(RIG_PASSWORD)
        self.ns = 0

    async def __aenter__(self):
        await self.host.start()
        await self.gateway.start()
        await self.client.connect()
        self.ns = await self.client.get_namespace_index(NS_URI)
        await self.wait_good("SourceA", "Available")
        await every_device_read(self.gateway.table)  # the first scan spreads the devices over its period
        return self

    async def __aexit__(self, *exc):
        await self.client.disconnect()
        await self.gateway.stop()
        await self.host.stop()

    def node(self, nid: str):
        return self.client.get_node(ua.NodeId(nid, self.ns))

    async def read(self, device: str, point: str) -> ua.DataValue:
        return await self.node(f"{device}.{point}").read_data_value(raise_on_bad_status=False)

    async def wait_good(self, device, point, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dv = await self.read(device, point)
            if dv.StatusCode.is_good():
                return dv
            await asyncio.sleep(0.2)
        raise AssertionError(f"{device}.{point} never Good")

    async def call(self, device: str, method: str, *args: ua.Variant):
        obj = self.node(device)
        return await obj.call_method(self.node(f"{device}.{method}"), *args)

    async def status_of(self, device: str, method: str, *args: ua.Variant) -> str:
        try:
            await self.call(device, method, *args)
        except ua.UaStatusCodeError as exc:
            return ua.StatusCode(exc.code).name
        return "Good"


def sel(v: int) -> ua.Variant:
    return ua.Variant(v, ua.VariantType.Int32)


def dbl(v: float) -> ua.Variant:
    return ua.Variant(v, ua.VariantType.Double)


async def unit_on(rig: Rig, source: int, exclude=()) -> str:
    for u in rig.site.units:
        if u.name in exclude:
            continue
        if (await rig.read(u.name, "ActiveSource")).Value.Value == source:
            return u.name
    raise AssertionError(f"no unit on source {source}")


async def test_switch_source_transfers_and_dwell_time_refuses(tmp_path):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:
        unit = await unit_on(rig, 1)
        result = await rig.call(unit, "SwitchSource", sel(2))
        assert 0.0 < result < 5.0  # the device-measured transfer time, ms
        assert (await rig.read(unit, "ActiveSource")).Value.Value == 2
        count = (await rig.read(unit, "TransferCount")).Value.Value
        # a second call inside the dwell time is refused and changes nothing
        assert await rig.status_of(unit, "SwitchSource", sel(1)) == "BadTooManyOperations"
        await asyncio.sleep(1.5)
        assert (await rig.read(unit, "ActiveSource")).Value.Value == 2
        assert (await rig.read(unit, "TransferCount")).Value.Value == count
        # calling for the source it is already on is accepted and does nothing
        assert await rig.call(unit, "SwitchSource", sel(2)) == 0.0
        # every call is in the audit log
        lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
        assert [(r["method"], r["object"], r["status"]) for r in lines][:2] == [
            ("SwitchSource", unit, "Good"), ("SwitchSource", unit, "BadTooManyOperations")]


async def test_bad_arguments(tmp_path):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:
        unit = rig.site.units[0].name
        des = rig.site.units[0].storage.name
        before = (await rig.read(unit, "ActiveSource")).Value.Value
        assert await rig.status_of(unit, "SwitchSource", sel(7)) in ("BadOutOfRange", "BadInvalidArgument")
        assert await rig.status_of(unit, "SwitchSource", sel(0)) in ("BadOutOfRange", "BadInvalidArgument")
        assert await rig.status_of(unit, "SetPreferredSource", sel(3)) in ("BadOutOfRange", "BadInvalidArgument")
        assert await rig.status_of(des, "StartBridging", dbl(1000.0), dbl(60.0)) == "BadOutOfRange"
        assert await rig.status_of(des, "StartBridging", dbl(2.0), dbl(-5.0)) == "BadOutOfRange"
        assert await rig.status_of(des, "StartBridging", dbl(2.0), dbl(1e9)) == "BadOutOfRange"
        assert (await rig.read(unit, "ActiveSource")).Value.Value == before
        assert (await rig.read(des, "Mode")).Value.Value != 2


async def test_bridging_start_and_stop(tmp_path):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:
        des = rig.site.units[1].storage.name
        await rig.call(des, "StartBridging", dbl(3.0), dbl(120.0))
        assert (await rig.read(des, "Mode")).Value.Value == 2  # Bridging
        deadline = time.monotonic() + 10
        while abs((await rig.read(des, "ActivePower")).Value.Value - 3.0) > 0.05 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert (await rig.read(des, "ActivePower")).Value.Value == pytest.approx(3.0, abs=0.05)
        await rig.call(des, "StopBridging")
        assert (await rig.read(des, "Mode")).Value.Value != 2


async def test_invalid_state_target_dead_and_unit_in_fault(tmp_path):
    scenario = Scenario(duration_s=86400, seed=1, faults=(
        Fault("source_outage", "SourceB", 1.0, 0.0, 0.5, duration_s=80000.0),
        Fault("contact_wear", "MATS-02-03", 1.0, 0.0, 0.5, pole=2),
    ))
    async with Rig(fast_site(), scenario=scenario, tmp_path=tmp_path) as rig:
        deadline = time.monotonic() + 10
        while (await rig.read("SourceB", "Available")).Value.Value and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        unit = await unit_on(rig, 1, exclude=("MATS-02-03",))
        assert await rig.status_of(unit, "SwitchSource", sel(2)) == "BadInvalidState"
        assert (await rig.read(unit, "ActiveSource")).Value.Value == 1
        while (await rig.read("MATS-02-03", "State")).Value.Value != AtsState.FAULT and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await rig.status_of("MATS-02-03", "SwitchSource", sel(2)) == "BadInvalidState"
        assert await rig.status_of("MATS-02-03", "SetPreferredSource", sel(2)) == "BadInvalidState"


async def test_derating_refuses_a_transfer_past_80_percent(tmp_path):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:
        unit = await unit_on(rig, 1)
        load = (await rig.read(unit, "LoadPower")).Value.Value
        b_power = (await rig.read("SourceB", "ActivePower")).Value.Value
        # the B source's nameplate is set so that taking this unit would pass 80 % of it
        rig.host.plant.src_rated_kw[1] = (b_power + 0.5 * load) / 0.8
        deadline = time.monotonic() + 5
        while abs((await rig.read("SourceB", "RatedPower")).Value.Value - rig.host.plant.src_rated_kw[1]) > 0.5:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert await rig.status_of(unit, "SwitchSource", sel(2)) == "BadRequestNotAllowed"
        assert (await rig.read(unit, "ActiveSource")).Value.Value == 1


async def test_device_killed_and_restarted(tmp_path):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:
        unit = rig.site.units[0]
        address = (unit.device.host, unit.device.port)
        other = rig.site.sources[0].name  # on another endpoint: must stay Good throughout
        await rig.host.stop_endpoint(address)
        seen = []
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            dv = await rig.read(unit.name, "LoadPower")
            name = dv.StatusCode.name
            if not seen or seen[-1] != name:
                seen.append(name)
            assert (await rig.read(other, "Voltage")).StatusCode.is_good()
            if name == "BadCommunicationError":
                break
            await asyncio.sleep(0.2)
        assert seen[-2:] == ["UncertainLastUsableValue", "BadCommunicationError"], seen
        assert await rig.status_of(unit.name, "SwitchSource", sel(2)) == "BadCommunicationError"
        health = f"Diagnostics.Modbus {rig.gateway.driver.connection(unit.name).label}"
        assert (await rig.node(f"{health}.Connected").read_value()) is False
        assert (await rig.node(f"{health}.LastError").read_value())  # refused connect or a timeout, by timing
        await rig.host.start_endpoint(address)
        dv = await rig.wait_good(unit.name, "LoadPower", timeout=15)
        assert dv.Value.Value > 0
        await asyncio.sleep(1.2)
        assert (await rig.node(f"{health}.Connected").read_value()) is True
        assert (await rig.node(f"{health}.Reconnects").read_value()) >= 2
        assert (await rig.node(f"{health}.DecodeErrors").read_value()) == 0  # a dead device is not a garbled one


async def test_role_below_operator_is_refused(tmp_path):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:
        unit = await unit_on(rig, 1)
        outcome = await rig.gateway.commands.switch_source(unit, 2, user="viewer1", role="Viewer")
        assert outcome.status_name == "BadUserAccessDenied"
        assert (await rig.read(unit, "ActiveSource")).Value.Value == 1


class _FailingSink(Sink):
    """A consumer that breaks on every batch: it must be counted, and stop nothing else."""

    name = "broken-exporter"

    def __init__(self):
        self.calls = 0

    def changes(self, batch):
        self.calls += 1
        raise RuntimeError("exporter down")


async def test_every_sink_shows_in_diagnostics_and_a_failing_one_stops_nothing(tmp_path):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:
        gateway = rig.gateway
        kinds = {sink.name: sink.kind for sink in gateway.sinks()}
        assert kinds == {"transfer-watch": "lossless", "address-space": "coalescing", "alarms": "lossless",
                         "historian": "lossless"}
        for name, kind in kinds.items():
            assert await rig.node(f"Diagnostics.Sink {name}.Kind").read_value() == kind
            assert await rig.node(f"Diagnostics.Sink {name}.Errors").read_value() == 0
        # a sink attached while running gets its Diagnostics object too; its failures are counted
        broken = _FailingSink()
        gateway.table.attach(broken)
        units = [u.name for u in rig.site.units]
        before = {u: (await rig.read(u, "LoadPower")).SourceTimestamp for u in units}
        deadline = time.monotonic() + 10
        errors = 0
        while time.monotonic() < deadline and errors < 2:
            await asyncio.sleep(0.5)
            try:
                errors = await rig.node("Diagnostics.Sink broken-exporter.Errors").read_value()
            except ua.UaStatusCodeError:  # BadNodeIdUnknown until the next Diagnostics pass
                errors = 0
        assert 2 <= errors <= gateway.table.sink_errors["broken-exporter"] == broken.calls  # Diagnostics: once a second
        assert await rig.node("Diagnostics.Sink broken-exporter.Kind").read_value() == "coalescing"
        # the other sinks still get every batch: new values keep arriving in the address space
        deadline = time.monotonic() + 15
        while True:
            # a unit not read yet when `before` was taken (no SourceTimestamp) counts once it has one
            now = {u: (await rig.read(u, "LoadPower")).SourceTimestamp for u in units}
            moved = [u for u in units if now[u] is not None and (before[u] is None or now[u] > before[u])]
            if moved or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert moved, "no LoadPower changed in the address space while a sink was failing"
        assert await rig.node("Diagnostics.Sink address-space.Errors").read_value() == 0


class _Collector:
    def __init__(self):
        self.values: list[tuple[str, object]] = []

    def datachange_notification(self, node, val, data):
        self.values.append((node.nodeid.Identifier, val))


async def test_source_outage_reaches_a_subscriber(tmp_path):
    scenario = Scenario(duration_s=86400, seed=1,
                        faults=(Fault("source_outage", "SourceA", 8.0, 0.0, 0.5, duration_s=600.0),))
    async with Rig(fast_site(), scenario=scenario, tmp_path=tmp_path) as rig:
        unit = await unit_on(rig, 1)
        handler = _Collector()
        sub = await rig.client.create_subscription(100, handler)
        await sub.subscribe_data_change([rig.node("SourceA.Available"), rig.node(f"{unit}.ActiveSource")])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            got = dict(handler.values)
            if got.get("SourceA.Available") is False and got.get(f"{unit}.ActiveSource") == 2:
                break
            await asyncio.sleep(0.2)
        got = dict(handler.values)
        assert got.get("SourceA.Available") is False, handler.values
        assert got.get(f"{unit}.ActiveSource") == 2, handler.values
        assert (await rig.read(unit, "LastTransferTime")).Value.Value < 5.0
