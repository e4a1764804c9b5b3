"""The driver contract: what the gateway and the command service know of any driver.

A driver owns the devices of a site whose `driver:` value it is registered for. It polls them
(or receives their cyclic frames) into the point table, keeps their quality, reports the health
of its connections, and gives the command service one way to a device:
`connection(device).write_command(...)` and `.read_now(...)`. Nothing else writes to a device.

Drivers are looked up in one registry keyed by the site file's `driver:` value. The registry
holds import paths, not classes, so the site loader can check a `driver:` value without
importing pymodbus or scapy; a value with no registered driver is refused by the loader.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from drivers.pointtable import PointTable, Value
    from siteconfig.model import Site


# ---- errors a connection raises (the command service maps them onto StatusCodes) -------------------
class DeviceError(Exception):
    """A device command or read did not succeed."""


class DeviceUnreachable(DeviceError):
    """No answer: not connected, timed out, connection lost."""


class DeviceRefused(DeviceError):
    """The device answered that it refuses (its own interlock)."""


class DeviceRejectedArgument(DeviceError):
    """The device answered that an argument is out of its range."""


class DeviceProtocolError(DeviceError):
    """Any other refusal (address not mapped, function not supported, malformed answer)."""


class DriverUnavailable(Exception):
    """A driver cannot start here (no privilege, no interface); the message says what is missing."""


# ---- health ----------------------------------------------------------------------------------------
@dataclass
class ConnectionHealth:
    """One connection's health, shown under Objects/<Site>/Diagnostics as '<kind> <label>'."""

    host: str
    port: int
    connected: bool = False
    last_error: str = ""
    poll_duration_ms: float = 0.0
    polls: int = 0
    overruns: int = 0
    reconnects: int = 0
    devices: int = 0
    errors: int = 0
    label: str = ""
    tls: str = ""  # the secure session when there is one, e.g. 'TLSv1.3 TLS_AES_256_GCM_SHA384'
    kind: str = "Modbus"  # the transport, the first word of the Diagnostics object's name
    decode_errors: int = 0  # answers that could not be decoded (garbage, wrong length or id)
    dropped_frames: int = 0  # frames refused by the transport's security (TSN: unsigned, tampered, replayed, late)

    @property
    def key(self) -> str:
        return f"{self.kind} {self.label}"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---- the contract ------------------------------------------------------------------------------------
@runtime_checkable
class DeviceConnection(Protocol):
    """The way to one device (and others sharing its transport)."""

    async def read_now(self, device: str) -> dict[str, Value]:
        """Read the device out of its scan, update the point table, return the values."""

    async def write_command(self, device: str, command: str, **args: Any) -> None:
        """Send one command of the device's profile; raise a DeviceError subclass if it does not go through."""


@runtime_checkable
class Driver(Protocol):
    """Every device of a site that one driver serves."""

    async def start(self) -> None:
        """Define the devices' points (already done at construction) and begin polling."""

    async def stop(self) -> None:
        """Stop polling and close every connection."""

    def connection(self, device: str) -> DeviceConnection:
        """The connection that carries `device` (KeyError if this driver does not serve it)."""

    def health(self) -> list[ConnectionHealth]:
        """One entry per connection, live objects (read them, do not keep copies)."""


# A factory builds a driver for the named devices of a site (all of them use a `driver:` value the
# factory is registered for); it defines those devices' points in the table.
# Signature: factory(site, table, devices: list[str]) -> Driver


# ---- registry ----------------------------------------------------------------------------------------
_REGISTRY: dict[str, str] = {
    # driver: value -> "module:factory"
    "modbus": "drivers.modbus.driver:ModbusDriver.for_devices",
    "modbus-tls": "drivers.modbus.driver:ModbusDriver.for_devices",
    "tsn": "drivers.tsn.driver:TsnDriver.for_devices",
}


def register_driver(name: str, factory_path: str) -> None:
    """Make `driver: name` valid in site files, built by the factory at "module:attr[.attr]"."""
    _REGISTRY[name] = factory_path


def registered_drivers() -> tuple[str, ...]:
    """The `driver:` values this build accepts."""
    return tuple(_REGISTRY)


def factory_path(name: str) -> str:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"driver {name} is not built in this version") from None


def load_factory(name: str):
    """The factory registered for `driver: name` (imports its module)."""
    path = factory_path(name)
    module_name, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class DriverSet:
    """Every driver a site needs, built from the registry; routes a device to its driver.

    Devices whose `driver:` values share one factory (modbus and modbus-tls) share one driver
    instance. The command service and the gateway see only this object.
    """

    def __init__(self, site: Site, table: PointTable, skip: frozenset[str] = frozenset()) -> None:
        """`skip`: devices served elsewhere (drivers/worker.py: the Modbus drivers in their own process)."""
        by_factory: dict[str, list[str]] = {}
        for name, _kind, ep in site.devices():
            if name in skip:
                continue
            by_factory.setdefault(factory_path(ep.driver), []).append(name)
        self.drivers: dict[str, Driver] = {}
        self._device_driver: dict[str, Driver] = {}
        for path, devices in by_factory.items():
            driver_name = next(n for n, p in _REGISTRY.items() if p == path)
            driver = load_factory(driver_name)(site, table, devices)
            self.drivers[path] = driver
            for device in devices:
                self._device_driver[device] = driver

    async def start(self) -> None:
        for driver in self.drivers.values():
            await driver.start()

    # ---- a site reload (gateway/reload.py): devices added and removed while running ----------------
    def check_add(self, site: Site, devices: list[str]) -> list[str]:
        """Why these devices of `site` cannot be added live, one reason each ([] if they can). Only a
        running driver with `add_devices` takes new devices (the Modbus driver); a device of any
        other driver needs a restart."""
        problems: list[str] = []
        for path, names in devices_by_factory(site, devices).items():
            driver = self.drivers.get(path)
            if driver is None or not hasattr(driver, "add_devices"):
                problems += [f"{d}: driver {_driver_name(site, d)} cannot take new devices while running" for d in names]
            else:
                problems += driver.check_add(site, names)  # type: ignore[attr-defined]
        return problems

    def check_remove(self, devices: list[str]) -> list[str]:
        """Why these devices cannot be removed live ([] if they can)."""
        return [f"{d}: its driver cannot drop devices while running" for d in devices
                if d in self._device_driver and not hasattr(self._device_driver[d], "remove_devices")]

    def add_devices(self, site: Site, devices: list[str]) -> None:
        """Define these devices' points and poll them (check_add first)."""
        for path, names in devices_by_factory(site, devices).items():
            driver = self.drivers[path]
            driver.add_devices(site, names)  # type: ignore[attr-defined]
            for name in names:
                self._device_driver[name] = driver

    async def remove_devices(self, devices: list[str]) -> None:
        """Stop polling these devices and drop their points."""
        by_driver: dict[int, tuple[Driver, list[str]]] = {}
        for device in devices:
            if device in self._device_driver:
                driver = self._device_driver.pop(device)
                by_driver.setdefault(id(driver), (driver, []))[1].append(device)
        for driver, names in by_driver.values():
            await driver.remove_devices(names)  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for driver in self.drivers.values():
            await driver.stop()

    def connection(self, device: str) -> DeviceConnection:
        return self._device_driver[device].connection(device)

    def driver_of(self, device: str) -> Driver:
        return self._device_driver[device]

    def health(self) -> list[ConnectionHealth]:
        return [h for driver in self.drivers.values() for h in driver.health()]


def devices_by_factory(site: Site, devices: list[str]) -> dict[str, list[str]]:
    """The devices of `site` grouped by their driver's factory path (drivers are dataclasses: unhashable)."""
    endpoints = {name: ep for name, _kind, ep in site.devices()}
    out: dict[str, list[str]] = {}
    for device in devices:
        out.setdefault(factory_path(endpoints[device].driver), []).append(device)
    return out


def _driver_name(site: Site, device: str) -> str:
    return next(ep.driver for name, _kind, ep in site.devices() if name == device)
