"""The driver contract (drivers/base.py): the loader accepts exactly the registered drivers, and
every registered factory builds something that is a `Driver` (docs/design.md, "Drivers")."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from pathlib import Path

import pytest

from drivers.base import ConnectionHealth, DeviceConnection, Driver, DriverSet, load_factory, registered_drivers
from drivers.modbus.tls import CertificateAuthority
from drivers.pointtable import PointTable
from siteconfig.demo import demo_site
from siteconfig.loader import INTERFACE_DRIVERS, accepted_drivers, parse_site
from siteconfig.model import Site, TsnConfig
from siteconfig.yamlpos import ConfigErrors
from tsnwire.keys import generate_key_file

from ..tsn_site import tsn_site_text

SMALL = (Path(__file__).resolve().parents[1] / "fixtures" / "sites" / "small.yaml").read_text()
TLS_DEFAULTS = "{host: 127.0.0.1, driver: modbus-tls, tls: {cert: gw.pem, key: gw.key, ca: ca.pem}}"


def _site_text_with_driver(driver: str) -> str:
    if driver == "tsn":  # per-device MAC, VLAN, PublisherId and key file, and the gateway.tsn block
        return tsn_site_text("lo")
    defaults = TLS_DEFAULTS if driver == "modbus-tls" else f"{{host: 127.0.0.1, driver: {driver}}}"
    return SMALL.replace("{host: 127.0.0.1, driver: modbus}", defaults)


@pytest.mark.parametrize("driver", sorted(set(INTERFACE_DRIVERS) | set(registered_drivers())))
def test_a_driver_value_the_loader_accepts_has_a_registered_driver(driver):
    try:
        site = parse_site(_site_text_with_driver(driver), "t.yaml", profiles_dir=None)
    except ConfigErrors as caught:
        # refused: only because this build has no driver for it, said in one line at the key
        assert driver not in registered_drivers()
        assert [(e.line, e.key) for e in caught.errors] == [(7, "defaults.device.driver")]
        assert caught.errors[0].message.startswith(f"driver {driver} is not built in this version")
        return
    assert driver in registered_drivers() and driver in accepted_drivers()
    assert {ep.driver for _, _, ep in site.devices()} == {driver}
    assert callable(load_factory(driver))  # the registered import path resolves


def test_the_loader_accepts_exactly_the_registered_drivers():
    assert set(accepted_drivers()) == set(registered_drivers())
    assert "sim" not in accepted_drivers()


def _assert_is_driver(driver: object) -> None:
    assert isinstance(driver, Driver)
    for method in ("start", "stop"):
        assert inspect.iscoroutinefunction(getattr(driver, method)), method
    health = driver.health()
    assert isinstance(health, list) and all(isinstance(h, ConnectionHealth) for h in health)


def _as_driver(site: Site, driver: str, tmp_path: Path) -> Site:
    """The site with every device on `driver` (modbus-tls gets real certificates made here)."""
    extra = {}
    if driver == "modbus-tls":
        ca = CertificateAuthority()
        cert, key = ca.issue("gateway", client=True).write(tmp_path, "gateway")
        extra = {"tls_cert": str(cert), "tls_key": str(key), "tls_ca": str(ca.write(tmp_path))}
    tsn_ids = itertools.count(2)
    if driver == "tsn":
        key_file = tmp_path / "group.key"
        generate_key_file(key_file)
        site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, tsn=TsnConfig(interface="lo")))

    def move(ep):
        if driver == "tsn":
            n = next(tsn_ids)
            return dataclasses.replace(ep, driver=driver, mac=f"02:00:00:00:{n >> 8:02x}:{n & 0xFF:02x}", vlan=10,
                                       publisher_id=n, key_file=str(key_file))
        return dataclasses.replace(ep, driver=driver, **extra)

    return dataclasses.replace(
        site,
        sources=tuple(dataclasses.replace(s, device=move(s.device)) for s in site.sources),
        aisles=tuple(dataclasses.replace(
            a, pdbs=tuple(dataclasses.replace(p, device=move(p.device)) for p in a.pdbs),
            units=tuple(dataclasses.replace(
                u, device=move(u.device),
                storage=dataclasses.replace(u.storage, device=move(u.storage.device)) if u.storage else None)
                for u in a.units)) for a in site.aisles))


@pytest.mark.parametrize("driver", registered_drivers())
def test_every_registered_factory_builds_a_driver_for_its_devices(driver, tmp_path):
    site = _as_driver(demo_site(), driver, tmp_path)
    devices = [name for name, _, _ in site.devices()]
    table = PointTable()
    built = load_factory(driver)(site, table, devices)
    _assert_is_driver(built)
    assert built.health(), "a driver with devices reports the health of its connections"
    for name in devices:
        conn = built.connection(name)
        assert isinstance(conn, DeviceConnection)
        assert inspect.iscoroutinefunction(conn.read_now) and inspect.iscoroutinefunction(conn.write_command)
        assert table.device_quality(name) is not None  # its points are defined at construction
    with pytest.raises(KeyError):
        built.connection("no-such-device")
    _assert_is_driver(load_factory(driver)(site, PointTable(), []))  # and for no device at all


def test_the_driver_set_routes_every_device_and_gathers_health():
    site = demo_site()
    drivers = DriverSet(site, PointTable())
    assert {name for name, _, _ in site.devices()} <= set(drivers._device_driver)
    for name, _, _ in site.devices():
        assert isinstance(drivers.connection(name), DeviceConnection)
    assert len(drivers.health()) == sum(len(d.health()) for d in drivers.drivers.values()) > 0
