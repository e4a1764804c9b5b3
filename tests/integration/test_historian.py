"""History end to end: plant-backed Modbus devices, the gateway with the historian attached, and
an asyncua client reading raw history, before and after the gateway restarts on the same data dir."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from datetime import datetime, timedelta, timezone

from asyncua import Client, ua

from gateway.app import Gateway
from information_model.instantiate import write_values
from simulator.endpoints import SimulatorHost
from siteconfig.demo import demo_site

from .conftest import free_port, relocate_site

NS_URI = "urn:cmcs-gateway:site:demo-hall"
WATCHED = ("SourceA.Voltage", "MATS-01-01.LoadPower", "MATS-01-01.ContactTemperature", "PDB-01-A.Current")


@contextlib.asynccontextmanager
async def gateway_with_history(site, data_dir):
    """A gateway (which attaches its historian at start) and a client session."""
    port = free_port()
    gateway = Gateway(site, data_dir, opcua_port=port, opcua_host="127.0.0.1")
    await gateway.start()
    historian = gateway.historian
    client = Client(f"opc.tcp://127.0.0.1:{port}/cmcs", timeout=10)
    try:
        await client.connect()
        ns = await client.get_namespace_index(NS_URI)
        yield gateway, historian, client, ns
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
        await gateway.stop()  # flushes and closes the historian


async def wait_history(node, start, count: int, timeout: float = 30.0) -> list[ua.DataValue]:
    deadline = time.monotonic() + timeout
    while True:
        got = await node.read_raw_history(start, datetime.now(timezone.utc) + timedelta(seconds=5))
        if len(got) >= count or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.3)


def stamped(dvs) -> list[tuple[datetime, object]]:
    return [(dv.SourceTimestamp, dv.Value.Value) for dv in dvs]


async def test_history_read_raw_survives_a_restart(tmp_path):
    site = relocate_site(demo_site())
    opcua = site.gateway.opcua
    if hasattr(opcua, "allow_security_none"):  # the secured gateway: this test's client is plain and anonymous
        opcua = dataclasses.replace(opcua, allow_security_none=True)
    site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, stale_time_s=3.0, opcua=opcua))
    host = SimulatorHost(site)
    await host.start()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    try:
        async with gateway_with_history(site, data_dir) as (gateway, historian, client, ns):
            nodes = {name: client.get_node(ua.NodeId(name, ns)) for name in WATCHED}
            voltage = nodes["SourceA.Voltage"]
            assert (await voltage.read_attribute(ua.AttributeIds.Historizing)).Value.Value is True
            access = (await voltage.read_attribute(ua.AttributeIds.AccessLevel)).Value.Value
            assert access & ua.AccessLevel.HistoryRead.mask

            before = {}
            for name, node in nodes.items():
                dvs = await wait_history(node, start, 3)
                assert len(dvs) >= 3, f"{name}: {len(dvs)} values in history"
                assert all(dv.StatusCode.is_good() for dv in dvs), name
                stamps = [dv.SourceTimestamp for dv in dvs]
                assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), name
                assert all(dv.Value.VariantType == ua.VariantType.Double for dv in dvs), name
                before[name] = stamped(dvs)

            # paging over the wire: NumValuesPerNode=2 and the server's continuation points
            details = ua.ReadRawModifiedDetails(IsReadModified=False, StartTime=start,
                                                EndTime=before["SourceA.Voltage"][-1][0], NumValuesPerNode=2)
            paged, cp, pages = [], None, 0
            while True:
                result = await voltage.history_read(details, cp)
                result.StatusCode.check()
                assert len(result.HistoryData.DataValues) <= 2
                paged += result.HistoryData.DataValues
                pages += 1
                cp = result.ContinuationPoint
                if not cp:
                    break
            assert stamped(paged) == before["SourceA.Voltage"] and pages >= 2

            # newest first when EndTime is before StartTime
            newest_first = await voltage.read_raw_history(before["SourceA.Voltage"][-1][0], start)
            assert stamped(newest_first) == before["SourceA.Voltage"][::-1]

            # an event through the storage's generic API, read back over HistoryRead (events)
            generator = await historian_server(historian).get_event_generator()
            generator.event.Message = ua.LocalizedText("history test event")
            generator.event.Severity = 321
            await generator.trigger()
            await historian.storage.save_event(generator.event)
            await historian.flush()
            server_node = client.get_node(ua.ObjectIds.Server)
            events = await server_node.read_event_history(start, datetime.now(timezone.utc) + timedelta(seconds=5))
            assert [(e.Message.Text, e.Severity) for e in events] == [("history test event", 321)]
            # a historized variable the point table does not feed: recorded from the address space
            mode_id = gateway.server.model.points[("Cmcs", "Mode")]
            await write_values(gateway.server.server, [(mode_id, ua.DataValue(ua.Variant(2, ua.VariantType.Int32)))])
            await historian.flush()
            mode = await client.get_node(mode_id).read_raw_history(start, datetime.now(timezone.utc))
            assert [dv.Value.Value for dv in mode] == [1, 2]  # Advisory at start, then Automatic
            stopped_at = datetime.now(timezone.utc)

        # a new gateway process on the same data directory
        async with gateway_with_history(site, data_dir) as (gateway, historian, client, ns):
            for name, seen in before.items():
                node = client.get_node(ua.NodeId(name, ns))
                after = stamped(await node.read_raw_history(start, stopped_at))
                assert set(seen) <= set(after), name  # every value read before the restart is still there
                assert [t for t, _ in after] == sorted(t for t, _ in after)
            # and recording goes on after the restart
            voltage = client.get_node(ua.NodeId("SourceA.Voltage", ns))
            later = await wait_history(voltage, stopped_at, 2)
            assert len(later) >= 2
            events = await client.get_node(ua.ObjectIds.Server).read_event_history(start, stopped_at)
            assert [e.Message.Text for e in events] == ["history test event"]
    finally:
        await host.stop()


def historian_server(historian):
    """The asyncua Server the historian's storage is installed in."""
    return historian.storage._server
