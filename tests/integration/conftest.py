"""Shared helpers for integration tests: real sockets on 127.0.0.1, free ports."""

from __future__ import annotations

import asyncio
import time

import pytest

from siteconfig.model import Site

LOCALHOST = "127.0.0.1"


_given: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on right now, below the ephemeral range (siteconfig.demo.bind_free_port: no
    outgoing connection can take it before the test's server binds it), and not given out before."""
    from siteconfig.demo import free_port as port_below_ephemeral_range

    while True:
        port = port_below_ephemeral_range(LOCALHOST)
        if port not in _given:
            _given.add(port)
            return port


def relocate_site(site: Site, host: str = LOCALHOST) -> Site:
    """The same site with every distinct device address moved to a free port on `host`."""
    from siteconfig.demo import relocate_site as relocate

    return relocate(site, host)


@pytest.fixture
def demo_site_free_ports() -> Site:
    """The demo site, its endpoints on free local ports (so tests never collide with a running demo)."""
    from siteconfig.demo import demo_site

    return relocate_site(demo_site())


@pytest.fixture
def relocate():
    """`relocate(site)`: the site with its endpoints on free local ports (see relocate_site)."""
    return relocate_site


async def every_device_read(table, timeout: float = 15.0) -> None:
    """Until every device of the gateway's point table has been read once (none BadWaitingForInitialData):
    a scan spreads its devices over the period, so one device's first value says little of the others'."""
    from drivers.pointtable import Quality

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(table.device_quality(d) is not Quality.BAD_WAITING for d in table.devices()):
            return
        await asyncio.sleep(0.05)
    waiting = [d for d in table.devices() if table.device_quality(d) is Quality.BAD_WAITING]
    raise AssertionError(f"{len(waiting)} devices never read, e.g. {waiting[:3]}")


async def until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    """Until `predicate()` is true, polled every 50 ms; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout:g} s: {what}")
