"""The Modbus drivers in their own process (drivers/worker.py): values, commands and health cross
the socket; a worker that dies is reported, its devices turn Uncertain, and it comes back."""

from __future__ import annotations

import asyncio
import logging
import time

import psutil
import pytest
from asyncua import ua

from drivers.base import DeviceUnreachable
from drivers.pointtable import Quality
from drivers.worker import WorkerDriverSet

from .conftest import until
from .test_gateway import Rig, fast_site, sel, unit_on


def worker_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "drivers.worker" in " ".join(p.cmdline())]


async def test_values_commands_and_health_cross_the_worker(tmp_path):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:
        drivers = rig.gateway.driver
        assert isinstance(drivers, WorkerDriverSet)
        (child,) = worker_children()
        assert child.pid != psutil.Process().pid
        # every device's values reach the OPC UA address space from the worker
        for unit in rig.site.units[:3]:
            await rig.wait_good(unit.name, "LoadPower")
        # a command goes through the command service (interlocks, audit) to the worker, and back
        unit = await unit_on(rig, 1)
        await rig.call(unit, "SwitchSource", sel(2))
        assert (await rig.read(unit, "ActiveSource")).Value.Value == 2  # read_now's values came first
        assert rig.gateway.table.get(unit, "ActiveSource").value == 2
        # a refused command changes nothing, whatever process the driver runs in
        assert await rig.status_of(unit, "SwitchSource", sel(1)) == "BadTooManyOperations"
        # the connections' health is the worker's, shown in Diagnostics
        await until(lambda: all(h.connected and h.polls > 0 for h in drivers.health()), what="all connected")
        label = drivers.connection(unit).label
        node = rig.node(f"Diagnostics.Modbus {label}")
        connected = [c for c in await node.get_children() if (await c.read_browse_name()).Name == "Connected"]
        assert connected and await connected[0].read_value() is True
    assert worker_children() == []  # the gateway's stop ends its worker


async def test_a_worker_that_dies_is_reported_and_restarted(tmp_path, caplog):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:
        drivers = rig.gateway.driver
        unit = rig.site.units[0].name
        await rig.wait_good(unit, "LoadPower")
        before = rig.gateway.table.get(unit, "LoadPower").value
        (child,) = worker_children()
        with caplog.at_level(logging.ERROR, logger="drivers.worker"):
            child.kill()
            await until(lambda: rig.gateway.table.device_quality(unit) is Quality.UNCERTAIN_LAST_USABLE,
                        what="devices Uncertain")
        lines = [r for r in caplog.records if "driver worker process ended" in r.getMessage()]
        assert len(lines) == 1  # one line, not one per device
        dv = await rig.read(unit, "LoadPower")
        assert dv.StatusCode.name == "UncertainLastUsableValue" and dv.Value.Value == before
        # a command while no worker runs is refused as a device that does not answer, and changes nothing
        status = await rig.status_of(unit, "SwitchSource", sel(2 if rig.gateway.table.get(unit, "ActiveSource").value == 1 else 1))
        assert status == "BadCommunicationError"
        # it is started again, and its devices are Good again
        await until(lambda: drivers.restarts == 1 and drivers.ready.is_set() and worker_children()
                    and worker_children()[0].pid != child.pid, what="worker restarted")
        await rig.wait_good(unit, "LoadPower", timeout=10)
        (again,) = worker_children()
        assert again.pid != child.pid


async def test_read_now_values_are_in_the_table_when_it_returns(tmp_path):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:
        drivers, table = rig.gateway.driver, rig.gateway.table
        for unit in rig.site.units[:6]:
            values = await drivers.connection(unit.name).read_now(unit.name)
            assert values
            for point, value in values.items():
                if point in table.points(unit.name):
                    assert table.get(unit.name, point).value == value, (unit.name, point)


async def test_a_hung_worker_is_found_and_replaced(tmp_path, caplog):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:  # stale time 3 s: a worker silent for 8 s is hung
        drivers = rig.gateway.driver
        unit = rig.site.units[0].name
        await rig.wait_good(unit, "LoadPower")
        (child,) = worker_children()
        with caplog.at_level(logging.ERROR, logger="drivers.worker"):
            child.suspend()  # SIGSTOP: the stream stays open, nothing comes
            await until(lambda: rig.gateway.table.device_quality(unit) is Quality.UNCERTAIN_LAST_USABLE,
                        timeout=15, what="devices Uncertain")
        assert any("sent nothing for" in r.getMessage() for r in caplog.records)
        await until(lambda: drivers.restarts >= 1 and drivers.ready.is_set() and worker_children()
                    and worker_children()[0].pid != child.pid, timeout=20, what="a new worker")
        await rig.wait_good(unit, "LoadPower", timeout=10)


async def test_a_dead_device_stays_bad_across_a_worker_restart(tmp_path):
    async with Rig(fast_site(), tmp_path=tmp_path) as rig:
        unit = rig.site.units[0]
        table = rig.gateway.table
        await rig.host.stop_endpoint((unit.device.host, unit.device.port))
        await until(lambda: table.device_quality(unit.name) is Quality.BAD_COMM, timeout=15, what="device Bad")
        (child,) = worker_children()
        child.kill()
        await until(lambda: rig.gateway.driver.restarts == 1, timeout=15, what="restarted")
        # a device that was Bad is not shown as 'last usable' again, and stays Bad with the new worker
        seen = set()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            seen.add(table.device_quality(unit.name))
            await asyncio.sleep(0.1)
        assert seen == {Quality.BAD_COMM}, seen


async def test_driver_process_off_keeps_the_drivers_in_the_gateway(tmp_path):
    async with Rig(fast_site(driver_process=False), tmp_path=tmp_path) as rig:
        assert not isinstance(rig.gateway.driver, WorkerDriverSet)
        assert worker_children() == []
        dv = await rig.wait_good(rig.site.units[0].name, "LoadPower")
        assert dv.StatusCode == ua.StatusCode(ua.StatusCodes.Good)


async def test_a_worker_that_cannot_start_is_said_once_and_its_recovery_too(tmp_path, caplog):
    """A worker that fails to build its drivers (here: the gateway's TLS key gone after the gateway
    read it) says why in the gateway's one line; the restarts that fail the same way are not logged
    again; once the file is back the next worker starts and says how many failed before it."""
    from drivers.modbus.tls import CertificateAuthority
    from drivers.pointtable import PointTable

    from .conftest import LOCALHOST
    from .test_modbus_tls import tls_site

    pki = tmp_path / "pki"
    ca = CertificateAuthority("cmcs test site CA")
    ca.write(pki, "ca")
    ca.issue("aisle01-modbus-gateway", ip_addresses=(LOCALHOST,), server=True).write(pki, "aisle01")
    ca.issue("cmcs-gateway", client=True).write(pki, "gateway")
    site = tls_site(tmp_path)  # Aisle01 on Modbus/TCP Security; no device answers: none is needed here
    table = PointTable()
    drivers = WorkerDriverSet(site, table)  # its mirror has read the files
    key = pki / "gateway.key"
    key.rename(pki / "gateway.key.away")
    with caplog.at_level(logging.INFO, logger="drivers.worker"):
        await drivers.start()
        try:
            await until(lambda: drivers.restarts >= 2, timeout=20, what="two failed starts")
            assert not drivers.ready.is_set()
            lost = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(lost) == 1, [r.getMessage() for r in lost]
            assert "cannot build its drivers" in lost[0].getMessage() and "gateway.key" in lost[0].getMessage()
            with pytest.raises(DeviceUnreachable, match="not running"):
                await drivers.call("read_now", site.units[0].name)
            (pki / "gateway.key.away").rename(key)
            await until(drivers.ready.is_set, timeout=25, what="a worker running again")
            back = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "running again" in
                    r.getMessage()]
            assert len(back) == 1 and f"after {drivers.restarts} failed starts" in back[0], back
            assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
        finally:
            await drivers.stop()
    assert worker_children() == []
