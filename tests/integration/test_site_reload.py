"""A site reload (gateway/reload.py) adds and removes aisles and units in a running gateway.

The devices are simulated by one SimulatorHost serving the larger site (3 aisles of 4 units) from
the start, as devices already cabled in are before the site file names them: the gateway is then
told of them, or no longer told of some, by its site file alone, and polls real Modbus TCP
endpoints either way. Each test runs its own gateway (in-process, a real OPC UA server on a free
port) and calls the reload SIGHUP runs (tests/integration/test_service.py sends the signal to a
`cmcs run` process); a real OPC UA client checks what clients see.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import Client, ua

from gateway.app import Gateway
from gateway.reload import reload_gateway
from gateway.users import set_user
from simulator.endpoints import SimulatorHost
from siteconfig.demo import generate_site, site_to_yaml
from siteconfig.loader import load_site
from tests.integration.conftest import free_port, relocate_site

SCAN_S = 0.2  # every scan group: a poll period
OPERATOR, PASSWORD = "olga", "olga-operator-pw"
TYPES_URI = "urn:cmcs-gateway:UA:PowerDistribution"


def _sites() -> tuple:
    """(small, large): the large site is the small one plus a unit at the end of Aisle01 (MATS-01-04,
    on Aisle01's running connection) and a whole Aisle03 (its own address: a new connection)."""
    large = relocate_site(generate_site(3, 4, name="reload-hall"))
    g = large.gateway
    large = dataclasses.replace(large, gateway=dataclasses.replace(
        g, scan_groups_s={k: SCAN_S for k in g.scan_groups_s}, log_summary_s=0.0,
        opcua=dataclasses.replace(g.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True)))
    aisle1 = large.aisles[0]
    small = dataclasses.replace(large, aisles=(dataclasses.replace(aisle1, units=aisle1.units[:3]), large.aisles[1]))
    return small, large


@dataclasses.dataclass
class Running:
    gateway: Gateway
    host: SimulatorHost
    site_file: Path
    small: object
    large: object

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.gateway.site.gateway.opcua.port}/cmcs"

    def write_site(self, site) -> None:
        self.site_file.write_text(site_to_yaml(site))

    def nodes(self) -> set[str]:
        """Every node of the site's namespace (what a fresh start, or a reload, made)."""
        ns = self.gateway.server.model.ns_index
        return {n.Identifier for n in self.gateway.server.server.iserver.aspace._nodes if n.NamespaceIndex == ns}


async def _start(tmp_path: Path, first: str) -> Running:
    small, large = _sites()
    site_file = tmp_path / "site.yaml"
    site_file.write_text(site_to_yaml(small if first == "small" else large))
    data_dir = tmp_path / "data"
    set_user(data_dir, OPERATOR, "Operator", password=PASSWORD)
    host = SimulatorHost(large)
    await host.start()
    gateway = Gateway(load_site(site_file), data_dir)
    await gateway.start()
    return Running(gateway, host, site_file, small, large)


@pytest_asyncio.fixture
async def from_small(tmp_path):
    running = await _start(tmp_path, "small")
    try:
        yield running
    finally:
        await running.gateway.stop()
        await running.host.stop()


@pytest_asyncio.fixture
async def from_large(tmp_path):
    running = await _start(tmp_path, "large")
    try:
        yield running
    finally:
        await running.gateway.stop()
        await running.host.stop()


async def _client(running: Running) -> Client:
    client = Client(running.url, timeout=10)
    client.set_user(OPERATOR)
    client.set_password(PASSWORD)
    await client.connect()
    return client


async def _unit(client: Client, site: str, aisle: str, unit: str):
    ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site}")
    return await client.nodes.objects.get_child([f"{ns}:{site}", f"{ns}:Aisles", f"{ns}:{aisle}", f"{ns}:{unit}"])


class _Statuses:
    """A subscription handler keeping the StatusCode of each data change it is sent."""

    def __init__(self) -> None:
        self.codes: list[int] = []

    def datachange_notification(self, _node, _value, data) -> None:
        self.codes.append(data.monitored_item.Value.StatusCode.value)


async def _good(node, within_s: float) -> ua.DataValue:
    deadline = time.monotonic() + within_s
    while True:
        dv = await node.read_data_value(raise_on_bad_status=False)
        if dv.StatusCode.is_good() or time.monotonic() > deadline:
            return dv
        await asyncio.sleep(0.05)


async def test_an_added_aisle_and_unit_come_into_service_without_a_restart(from_small: Running):
    running = from_small
    before = running.nodes()
    running.write_site(running.large)
    report = await reload_gateway(running.gateway)
    assert report.site_refused == [] and report.site_error == ""
    assert sorted(report.site_applied) == ["aisle Aisle03 added (2 PDB, 4 units)", "ats MATS-01-04 added to Aisle01"]
    # the nodes a fresh start gives a unit: MATS-01-04's are MATS-01-01's, renamed (its DES included)
    after = running.nodes()
    added = after - before
    assert {n.replace("MATS-01-04", "MATS-01-01").replace("DES-01-04", "DES-01-01") for n in added
            if n.startswith(("MATS-01-04", "DES-01-04"))} == {n for n in before if n.startswith(("MATS-01-01", "DES-01-01"))}
    assert {"Aisle03", "PDB-03-A", "PDB-03-B", "MATS-03-04", "DES-03-04.StateOfCharge"} <= added

    client = await _client(running)
    try:
        tns = await client.get_namespace_index(TYPES_URI)
        site = running.large.name
        for aisle, name in (("Aisle01", "MATS-01-04"), ("Aisle03", "MATS-03-02")):
            unit = await _unit(client, site, aisle, name)
            typedef = client.get_node(await unit.read_type_definition())
            assert await typedef.read_browse_name() == ua.QualifiedName("MicroAtsType", tns)
            load = await unit.get_child(f"{tns}:LoadPower")
            dv = await _good(load, 10 * SCAN_S + 2.0)  # a new connection connects first
            assert dv.StatusCode.is_good() and dv.Value.Value > 0, (name, dv)
            storage = await unit.get_child(f"{tns}:Storage")
            assert (await _good(await storage.get_child(f"{tns}:StateOfCharge"), 10 * SCAN_S)).StatusCode.is_good()

        # a command on a new unit goes through the command service and its interlocks
        unit = await _unit(client, site, "Aisle03", "MATS-03-02")
        active = await (await unit.get_child(f"{tns}:ActiveSource")).read_value()
        target = 2 if active == 1 else 1
        switch = await unit.get_child(f"{tns}:SwitchSource")
        transfer_ms = await unit.call_method(switch, ua.Variant(target, ua.VariantType.Int32))
        assert transfer_ms > 0
        assert await (await unit.get_child(f"{tns}:ActiveSource")).read_value() == target
        with pytest.raises(ua.uaerrors.BadTooManyOperations):  # the anti-flapping dwell time knows it
            await unit.call_method(switch, ua.Variant(active, ua.VariantType.Int32))
        # the historian records it (written once a second): HistoryRead of the new unit's LoadPower
        load = await unit.get_child(f"{tns}:LoadPower")
        deadline = time.monotonic() + 5
        while not (history := await load.read_raw_history()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert history and all(dv.StatusCode.is_good() for dv in history if dv.Value.Value is not None)
    finally:
        await client.disconnect()
    # the new connection has its Diagnostics object, the new devices their place in the point table
    aisle3_port = running.large.aisles[2].units[0].device.port
    assert f"Diagnostics.Modbus 127.0.0.1:{aisle3_port}.Connected" in running.nodes()
    assert {"MATS-01-04", "DES-03-01", "PDB-03-B"} <= set(running.gateway.table.devices())


async def test_a_removed_unit_and_aisle_go(from_large: Running):
    running = from_large
    client = await _client(running)
    try:
        tns = await client.get_namespace_index(TYPES_URI)
        site = running.large.name
        unit = await _unit(client, site, "Aisle01", "MATS-01-04")
        load = await unit.get_child(f"{tns}:LoadPower")
        switch = await unit.get_child(f"{tns}:SwitchSource")
        assert (await _good(load, 10 * SCAN_S + 2.0)).StatusCode.is_good()
        seen = _Statuses()
        subscription = await client.create_subscription(50, seen)
        await subscription.subscribe_data_change(load)

        running.write_site(running.small)
        report = await reload_gateway(running.gateway)
        assert sorted(report.site_applied) == ["aisle Aisle03 removed", "ats MATS-01-04 removed from Aisle01"]
        assert not {n for n in running.nodes() if n.startswith(("MATS-01-04", "DES-01-04", "Aisle03", "MATS-03",
                                                                 "PDB-03", "DES-03"))}
        dv = await load.read_data_value(raise_on_bad_status=False)
        assert dv.StatusCode.value == ua.StatusCodes.BadNodeIdUnknown
        deadline = time.monotonic() + 5  # the subscribed client is told too
        while ua.StatusCodes.BadNodeIdUnknown not in seen.codes and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert seen.codes[-1] == ua.StatusCodes.BadNodeIdUnknown, seen.codes
        with pytest.raises(ua.uaerrors.BadNodeIdUnknown):
            await unit.call_method(switch, ua.Variant(2, ua.VariantType.Int32))
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site}")
        aisles = await client.nodes.objects.get_child([f"{ns}:{site}", f"{ns}:Aisles"])
        names = [(await c.read_browse_name()).Name for c in await aisles.get_children()]
        assert sorted(names) == ["Aisle01", "Aisle02"]
        # the command service knows it no more either (the path a Sparkplug DCMD or the CMCS would take)
        assert (await running.gateway.commands.switch_source("MATS-01-04", 2)).status == ua.StatusCodes.BadNodeIdUnknown
    finally:
        await client.disconnect()

    # no request reaches the removed devices any more; the others are still polled
    sim = running.host.devices
    removed, kept = [sim["MATS-01-04"], sim["MATS-03-01"], sim["PDB-03-A"]], sim["MATS-01-03"]
    counts, kept_count = [d.requests for d in removed], kept.requests
    await asyncio.sleep(5 * SCAN_S)
    assert [d.requests for d in removed] == counts and kept.requests > kept_count
    assert "MATS-01-04" not in running.gateway.table.devices()
    aisle3_port = running.large.aisles[2].units[0].device.port
    assert not {n for n in running.nodes() if n.startswith(f"Diagnostics.Modbus 127.0.0.1:{aisle3_port}")}


async def test_a_refused_change_changes_nothing_and_says_why(from_small: Running, caplog):
    running = from_small
    before, devices, site = running.nodes(), running.gateway.table.devices(), running.gateway.site
    unit = running.large.aisles[0].units[0]
    changed = dataclasses.replace(unit, rated_current_a=unit.rated_current_a + 8.0)
    aisle1 = running.large.aisles[0]
    new = dataclasses.replace(running.large, aisles=(dataclasses.replace(aisle1, units=(changed, *aisle1.units[1:])),
                                                     *running.large.aisles[1:]))
    running.write_site(new)
    with caplog.at_level(logging.INFO, logger="gateway.reload"):
        report = await reload_gateway(running.gateway)
    assert report.site_applied == []
    assert report.site_refused == [f"{unit.name}.rated_current_a changed ({unit.rated_current_a} -> "
                                   f"{changed.rated_current_a})"]
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.reload"]
    assert (f"site reload refused: {unit.name}.rated_current_a changed ({unit.rated_current_a} -> "
            f"{changed.rated_current_a}) (needs a restart)") in lines, lines
    # all or nothing: the added aisle and unit did not come either
    assert running.nodes() == before and running.gateway.table.devices() == devices and running.gateway.site is site


async def test_a_site_file_with_errors_leaves_the_running_site(from_small: Running, caplog):
    running = from_small
    before, site = running.nodes(), running.gateway.site
    running.site_file.write_text(site_to_yaml(running.large).replace("rated_current_a:", "rated_curent_a:", 1))
    with caplog.at_level(logging.INFO, logger="gateway.reload"):
        report = await reload_gateway(running.gateway)
    assert "rated_curent_a" in report.site_error and report.site_applied == report.site_refused == []
    assert running.nodes() == before and running.gateway.site is site
    assert any("has errors, the running site is kept" in r.getMessage() for r in caplog.records)


async def test_the_cmcs_follows_the_new_layout_advisory_until_a_bundle_for_it(tmp_path):
    """The shipped bundle was trained for the demo hall: on it the CMCS may go Automatic; once a
    reload takes a unit away the layout is another one, and the restarted CMCS holds Advisory."""
    from siteconfig.demo import demo_site

    site = relocate_site(demo_site())
    g = site.gateway
    site = dataclasses.replace(site, gateway=dataclasses.replace(
        g, scan_groups_s={k: SCAN_S for k in g.scan_groups_s}, log_summary_s=0.0,
        opcua=dataclasses.replace(g.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True)))
    site_file = tmp_path / "site.yaml"
    site_file.write_text(site_to_yaml(site))
    data_dir = tmp_path / "data"
    set_user(data_dir, "erik", "Engineer", password="erik-engineer-pw")
    host = SimulatorHost(site)
    await host.start()
    gateway = Gateway(load_site(site_file), data_dir, cmcs=True)
    await gateway.start()
    try:
        assert not gateway.live.advisory_only
        last = site.aisles[-1]
        smaller = dataclasses.replace(site, aisles=(*site.aisles[:-1], dataclasses.replace(last, units=last.units[:-1])))
        site_file.write_text(site_to_yaml(smaller))
        report = await reload_gateway(gateway)
        assert report.site_applied == [f"ats {last.units[-1].name} removed from {last.name}"]
        assert gateway.live.advisory_only and gateway.live.site is gateway.site and not gateway._cmcs_task.done()
        client = Client(f"opc.tcp://127.0.0.1:{site.gateway.opcua.port}/cmcs", timeout=10)
        client.set_user("erik")
        client.set_password("erik-engineer-pw")
        async with client:
            ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
            tns = await client.get_namespace_index(TYPES_URI)
            cmcs = await client.nodes.objects.get_child([f"{ns}:{site.name}", f"{ns}:Cmcs"])
            version = await cmcs.get_child(f"{tns}:ModelVersion")
            deadline = time.monotonic() + 20
            while "Advisory only" not in await version.read_value() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert "trained for another layout: Advisory only" in await version.read_value()
            with pytest.raises(ua.uaerrors.BadInvalidState):
                await cmcs.call_method(await cmcs.get_child(f"{tns}:SetMode"), ua.Variant(2, ua.VariantType.Int32))
    finally:
        await gateway.stop()
        await host.stop()


async def test_with_the_sparkplug_edge_node_on_devices_cannot_come_or_go_live(tmp_path):
    """Its device list and metric aliases are fixed for its MQTT session: refused, nothing changes."""
    import yaml

    small, large = _sites()
    mqtt = {"host": "127.0.0.1", "port": free_port(), "insecure": True}  # no broker there: it keeps retrying

    def with_mqtt(site) -> str:
        document = yaml.safe_load(site_to_yaml(site))
        document["gateway"]["mqtt"] = mqtt
        return yaml.safe_dump(document, sort_keys=False)

    site_file = tmp_path / "site.yaml"
    site_file.write_text(with_mqtt(small))
    gateway = Gateway(load_site(site_file), tmp_path / "data")
    await gateway.start()
    try:
        ns = gateway.server.model.ns_index
        before = {n for n in gateway.server.server.iserver.aspace._nodes if n.NamespaceIndex == ns}
        assert gateway.sparkplug is not None
        site_file.write_text(with_mqtt(large))
        report = await reload_gateway(gateway)
        assert report.site_applied == [] and len(report.site_refused) == 1
        assert "gateway.mqtt runs: the Sparkplug edge node" in report.site_refused[0]
        assert {n for n in gateway.server.server.iserver.aspace._nodes if n.NamespaceIndex == ns} == before
    finally:
        await gateway.stop()
