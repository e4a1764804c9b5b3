"""Modbus/TCP Security: the driver polls TLS devices with mutual certificates, refuses untrusted ones.

Real sockets on 127.0.0.1, the plant-backed simulator endpoints (pymodbus ModbusTlsServer for
modbus-tls devices), the real driver and point table. Every certificate is made here, in a
temporary folder, by a throw-away CA (drivers.modbus.tls.CertificateAuthority); a second,
rogue CA plays the impostor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient, AsyncModbusTlsClient

from drivers.modbus.driver import ModbusDriver
from drivers.modbus.tls import CertificateAuthority, client_context
from drivers.pointtable import Change, PointTable, Quality
from siteconfig.demo import demo_site, site_to_yaml
from siteconfig.loader import load_site
from siteconfig.model import DeviceEndpoint, Site
from siteconfig.profiles import load_profile
from siteconfig.yamlpos import ConfigErrors
from simulator.endpoints import SimulatorHost

from .conftest import LOCALHOST, relocate_site

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sites"
SECURE_AISLE = "Aisle01"  # its 14 devices behind one Modbus/TCP Security endpoint
ROGUE_AISLE = "Aisle02"  # in the rogue test: an endpoint presenting a certificate of the rogue CA
STALE_TIME_S = 2.0
WAIT_S = 30.0  # generous: the machine is shared; nothing here asserts how fast


# --------------------------------------------------------------------------------------------
# PKI and sites
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    """A folder with pki/: the site CA, a rogue CA, device (server) and gateway (client) certificates."""
    folder = tmp_path_factory.mktemp("tls-site")
    pki = folder / "pki"
    ca, rogue = CertificateAuthority("cmcs test site CA"), CertificateAuthority("rogue CA")
    ca.write(pki, "ca")
    rogue.write(pki, "rogue-ca")
    # Device certificates name the address the gateway dials (IP SAN), as hostname checking needs.
    ca.issue("aisle01-modbus-gateway", ip_addresses=(LOCALHOST,), server=True).write(pki, "aisle01")
    ca.issue("aisle02-modbus-gateway", ip_addresses=(LOCALHOST,), server=True).write(pki, "aisle02")
    rogue.issue("impostor", ip_addresses=(LOCALHOST,), server=True).write(pki, "rogue-device")
    ca.issue("cmcs-gateway", client=True).write(pki, "gateway")
    rogue.issue("rogue-client", client=True).write(pki, "rogue-client")
    return folder


def map_devices(site: Site, change: Callable[[str, str, DeviceEndpoint], DeviceEndpoint]) -> Site:
    """The site with every device endpoint replaced by change(aisle or '', name, endpoint)."""
    sources = tuple(dataclasses.replace(s, device=change("", s.name, s.device)) for s in site.sources)
    aisles = []
    for a in site.aisles:
        pdbs = tuple(dataclasses.replace(p, device=change(a.name, p.name, p.device)) for p in a.pdbs)
        units = tuple(dataclasses.replace(
            u, device=change(a.name, u.name, u.device),
            storage=dataclasses.replace(u.storage, device=change(a.name, u.storage.name, u.storage.device))
            if u.storage else None) for u in a.units)
        aisles.append(dataclasses.replace(a, pdbs=pdbs, units=units))
    return dataclasses.replace(site, sources=sources, aisles=tuple(aisles))


def tls_site(site_dir: Path, *, rogue: bool = False, file_name: str = "site.yaml") -> Site:
    """The demo site on free ports, Aisle01 on Modbus/TCP Security (and Aisle02 an impostor if `rogue`).

    Written as a site file with paths relative to it and read back through the loader, so the
    test goes through the site-file syntax a user writes.
    """
    server_certs = {SECURE_AISLE: "aisle01"} | ({ROGUE_AISLE: "rogue-device"} if rogue else {})

    def secure(aisle: str, _name: str, ep: DeviceEndpoint) -> DeviceEndpoint:
        if aisle not in server_certs:
            return ep
        stem = server_certs[aisle]
        return dataclasses.replace(ep, driver="modbus-tls", tls_cert="pki/gateway.pem", tls_key="pki/gateway.key",
                                   tls_ca="pki/ca.pem", tls_server_cert=f"pki/{stem}.pem",
                                   tls_server_key=f"pki/{stem}.key")

    site = map_devices(relocate_site(demo_site()), secure)
    site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, stale_time_s=STALE_TIME_S))
    path = site_dir / file_name
    path.write_text(site_to_yaml(site))
    return load_site(path)


def aisle_devices(site: Site, aisle: str) -> list[str]:
    """The names of an aisle's devices: PDB segments, micro-ATS units and their DES units."""
    a = next(a for a in site.aisles if a.name == aisle)
    return [p.name for p in a.pdbs] + [n for u in a.units for n in (u.name, u.storage.name if u.storage else None) if n]


def endpoint_of(site: Site, device: str) -> DeviceEndpoint:
    return next(ep for name, _, ep in site.devices() if name == device)


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.1)


def all_good(table: PointTable, devices: list[str]) -> bool:
    return all(table.device_quality(d) is Quality.GOOD for d in devices)


def assert_equal_within_scale(table: PointTable, site: Site, device: str, plant_values: dict) -> None:
    profile = load_profile(endpoint_of(site, device).profile)
    for point in table.points(device):
        pv = table.get(device, point)
        assert pv.quality is Quality.GOOD, f"{device}.{point} is {pv.quality.name}"
        expected, spec = plant_values[point], profile.point(point)
        if spec.kind in ("bool", "int") or spec.kind.startswith("enum:"):
            assert pv.value == int(expected), f"{device}.{point}: {pv.value} != {expected}"
        elif spec.type == "float32":
            assert pv.value == pytest.approx(expected, rel=1e-6, abs=1e-6), f"{device}.{point}"
        else:  # an integer register: the value is the plant's to half a scale step
            assert abs(pv.value - expected) <= spec.scale / 2 + 1e-9, f"{device}.{point}: {pv.value} != {expected}"


def server_context(site_dir: Path, stem: str) -> ssl.SSLContext:
    """A device-side context presenting pki/<stem>.pem, client certificates required (as the simulator's)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(site_dir / "pki" / f"{stem}.pem", site_dir / "pki" / f"{stem}.key")
    ctx.load_verify_locations(cafile=site_dir / "pki" / "ca.pem")
    return ctx


async def read_registers(client: AsyncModbusTcpClient, unit_id: int) -> list[int] | None:
    """The first input registers of a unit, or None when the endpoint gives no answer to this client."""
    try:
        if not await asyncio.wait_for(client.connect(), timeout=5):
            return None
        for _ in range(3):  # under TLS 1.3 a refused client may see the close only after its request
            if not client.connected:
                return None
            try:
                rr = await client.read_input_registers(0, count=2, device_id=unit_id)
            except Exception:  # noqa: BLE001 - any failure is "no answer"
                await asyncio.sleep(0.2)
                continue
            return None if rr.isError() else list(rr.registers)
        return None
    finally:
        client.close()


class Rig:
    """The simulator (plant clock stopped: values are fixed) and the gateway's driver on a point table."""

    def __init__(self, site: Site):
        self.site = site
        self.host = SimulatorHost(site, run_clock=False)
        self.table = PointTable()
        self.changes: list[Change] = []
        self.table.add_sink(self.changes.extend)
        self.driver = ModbusDriver(site, self.table)

    async def __aenter__(self) -> Rig:
        await self.host.start()
        await self.driver.start()
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.driver.stop()
        await self.host.stop()

    def qualities_seen(self, device: str) -> list[Quality]:
        seen: list[Quality] = []
        for c in self.changes:
            if c.device == device and (not seen or seen[-1] is not c.quality):
                seen.append(c.quality)
        return seen


# --------------------------------------------------------------------------------------------
# (a) polled over TLS
# --------------------------------------------------------------------------------------------


async def test_tls_devices_are_polled_over_tls_and_read_the_plant(site_dir):
    site = tls_site(site_dir)
    secure = aisle_devices(site, SECURE_AISLE)
    assert len(secure) == 14 and {endpoint_of(site, d).driver for d in secure} == {"modbus-tls"}
    assert Path(endpoint_of(site, secure[0]).tls_cert) == site_dir / "pki" / "gateway.pem"  # relative to the file
    async with Rig(site) as rig:
        everything = rig.table.devices()
        await eventually(lambda: all_good(rig.table, everything), "every device is Good")
        for device in secure:
            assert_equal_within_scale(rig.table, site, device, rig.host.plant.read_device(device))

        # Proof it is TLS: the driver's transport carries a TLS session with the device's certificate ...
        conn = rig.driver.connection(secure[0])
        assert conn.health.tls.startswith(("TLSv1.2 ", "TLSv1.3 ")), conn.health.tls
        ssl_object = conn._client.ctx.transport.get_extra_info("ssl_object")
        assert ssl_object is not None and ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        subject = dict(item for rdn in ssl_object.getpeercert()["subject"] for item in rdn)
        assert subject["commonName"] == "aisle01-modbus-gateway"
        assert rig.driver.connection("SourceA").health.tls == ""  # plain devices stay plain
        # ... and plain Modbus TCP gets nothing from that port.
        ep = endpoint_of(site, secure[0])
        plain = AsyncModbusTcpClient(ep.host, port=ep.port, timeout=1, retries=0, reconnect_delay=0)
        assert await read_registers(plain, ep.unit_id) is None


# --------------------------------------------------------------------------------------------
# (b) an untrusted device certificate is refused
# --------------------------------------------------------------------------------------------


async def test_a_device_with_an_untrusted_certificate_is_refused(site_dir):
    site = tls_site(site_dir, rogue=True, file_name="rogue-site.yaml")
    rogue, secure = aisle_devices(site, ROGUE_AISLE), aisle_devices(site, SECURE_AISLE)
    others = [d for d in (name for name, _, _ in site.devices()) if d not in rogue]
    async with Rig(site) as rig:
        rogue_conn = rig.driver.connection(rogue[0])
        await eventually(lambda: all_good(rig.table, others), "every trusted device is Good")
        await eventually(lambda: rogue_conn.health.last_error != "", "the impostor's connection reports an error")
        assert rogue_conn.health.last_error.startswith("TLS: certificate verify failed"), rogue_conn.health.last_error
        assert not rogue_conn.health.connected and rogue_conn.health.tls == ""
        for device in rogue:  # never a value from the impostor
            assert Quality.GOOD not in rig.qualities_seen(device)
            assert rig.table.device_quality(device) is Quality.BAD_WAITING
            assert rig.table.value(device, rig.table.points(device)[0]) is None

        # A trusted device replaced by an impostor: its values go Uncertain, then Bad; the rest stay Good.
        watched = secure[0]
        address = (endpoint_of(site, watched).host, endpoint_of(site, watched).port)
        await rig.host.stop_endpoint(address)
        rig.host.endpoints[address].sslctx = server_context(site_dir, "rogue-device")
        await rig.host.start_endpoint(address)
        await eventually(lambda: rig.table.device_quality(watched) is Quality.BAD_COMM, f"{watched} is Bad")
        assert rig.qualities_seen(watched)[-3:] == [Quality.GOOD, Quality.UNCERTAIN_LAST_USABLE, Quality.BAD_COMM]
        conn = rig.driver.connection(watched)
        await eventually(lambda: conn.health.last_error.startswith("TLS: certificate verify failed"),
                         "the replaced device's connection reports the TLS error")
        assert conn._task is not None and not conn._task.done()  # the poller keeps trying, no traceback
        assert all_good(rig.table, [d for d in others if d not in secure])


# --------------------------------------------------------------------------------------------
# (c) the simulator's TLS endpoint refuses clients without a valid certificate
# --------------------------------------------------------------------------------------------


async def test_the_tls_endpoint_requires_a_client_certificate_of_its_ca(site_dir):
    site = tls_site(site_dir, file_name="client-site.yaml")
    ep = endpoint_of(site, aisle_devices(site, SECURE_AISLE)[0])
    pki = site_dir / "pki"

    def tls_client(ctx: ssl.SSLContext) -> AsyncModbusTlsClient:
        return AsyncModbusTlsClient(ep.host, port=ep.port, sslctx=ctx, timeout=1, retries=0, reconnect_delay=0)

    no_certificate = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_certificate.load_verify_locations(cafile=pki / "ca.pem")
    async with SimulatorHost(site, run_clock=False):
        # the control: the gateway's certificate is answered
        assert await read_registers(tls_client(client_context(pki / "gateway.pem", pki / "gateway.key",
                                                              pki / "ca.pem")), ep.unit_id) is not None
        assert await read_registers(tls_client(no_certificate), ep.unit_id) is None
        rogue_client = client_context(pki / "rogue-client.pem", pki / "rogue-client.key", pki / "ca.pem")
        assert await read_registers(tls_client(rogue_client), ep.unit_id) is None
        plain = AsyncModbusTcpClient(ep.host, port=ep.port, timeout=1, retries=0, reconnect_delay=0)
        assert await read_registers(plain, ep.unit_id) is None


async def test_a_device_refusing_the_gateway_certificate_is_reported(site_dir):
    """The device does not trust the gateway's CA: under TLS 1.3 the refusal shows after the handshake."""
    site = tls_site(site_dir, file_name="refusing-site.yaml")
    watched = aisle_devices(site, SECURE_AISLE)[0]
    address = (endpoint_of(site, watched).host, endpoint_of(site, watched).port)
    async with Rig(site) as rig:
        refusing = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        refusing.verify_mode = ssl.CERT_REQUIRED
        refusing.load_cert_chain(site_dir / "pki" / "aisle01.pem", site_dir / "pki" / "aisle01.key")
        refusing.load_verify_locations(cafile=site_dir / "pki" / "rogue-ca.pem")  # trusts only the rogue CA
        await rig.host.stop_endpoint(address)
        rig.host.endpoints[address].sslctx = refusing
        await rig.host.start_endpoint(address)
        conn = rig.driver.connection(watched)
        await eventually(lambda: conn.health.last_error.startswith("TLS: "), "the refusal is reported")
        assert Quality.GOOD not in rig.qualities_seen(watched)


# --------------------------------------------------------------------------------------------
# (d) plain Modbus still works, and is warned about once
# --------------------------------------------------------------------------------------------


async def test_plain_devices_are_polled_and_named_in_one_startup_warning(site_dir, caplog):
    site = tls_site(site_dir, file_name="plain-site.yaml")
    plain = [name for name, _, ep in site.devices() if ep.driver == "modbus"]
    assert len(plain) == 58 - 14
    with caplog.at_level(logging.WARNING, logger="drivers.modbus.driver"):
        rig = Rig(site)
    warnings = [r for r in caplog.records if r.name == "drivers.modbus.driver" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert message.startswith(f"{len(plain)} devices on plain Modbus TCP (no encryption): ")
    assert all(name in message for name in plain[:5]) and message.endswith(f"and {len(plain) - 5} more")
    assert not any(name in message for name in aisle_devices(site, SECURE_AISLE))
    async with rig:
        await eventually(lambda: all_good(rig.table, plain), "every plain device is Good")
        for device in plain[:3]:
            assert_equal_within_scale(rig.table, site, device, rig.host.plant.read_device(device))
            assert rig.driver.connection(device).health.tls == ""


def test_an_all_tls_site_logs_no_plain_warning(site_dir, caplog):
    site = map_devices(tls_site(site_dir, file_name="all-tls.yaml"), lambda _a, _n, ep: ep if ep.driver == "modbus-tls"
                       else dataclasses.replace(ep, driver="modbus-tls", tls_cert=str(site_dir / "pki/gateway.pem"),
                                                tls_key=str(site_dir / "pki/gateway.key"),
                                                tls_ca=str(site_dir / "pki/ca.pem")))
    with caplog.at_level(logging.WARNING, logger="drivers.modbus.driver"):
        ModbusDriver(site, PointTable())
    assert not [r for r in caplog.records if r.name == "drivers.modbus.driver"]


# --------------------------------------------------------------------------------------------
# the site-file syntax and its errors
# --------------------------------------------------------------------------------------------


SMALL = (FIXTURES / "small.yaml").read_text()
GATEWAY_TLS = "tls: {cert: pki/gateway.pem, key: pki/gateway.key, ca: pki/ca.pem}"


def small_site(site_dir: Path, text: str, name: str) -> Path:
    path = site_dir / name
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        load_site(path, profiles_dir=None)
    return [str(e) for e in caught.value.errors]


def test_site_file_tls_from_defaults_and_per_device(site_dir):
    text = SMALL.replace("device: {host: 127.0.0.1, driver: modbus}",
                         f"device:\n    host: 127.0.0.1\n    driver: modbus-tls\n    {GATEWAY_TLS}")
    text = text.replace("device: {port: 15021, unit_id: 1, profile: pdb_segment_v1}",
                        "device: {port: 15021, unit_id: 1, profile: pdb_segment_v1, "
                        "tls: {server_cert: pki/aisle01.pem, server_key: pki/aisle01.key}}")
    for unit in (2, 11, 12, 101):  # the other devices at 15021 name the same device certificate
        text = text.replace(f"port: 15021, unit_id: {unit},",
                            f"port: 15021, unit_id: {unit}, tls: {{server_cert: pki/aisle01.pem, "
                            f"server_key: pki/aisle01.key}},")
    site = load_site(small_site(site_dir, text, "small-tls.yaml"), profiles_dir=None)
    pki = site_dir / "pki"
    pdb = site.pdbs[0].device
    assert (pdb.driver, pdb.tls_cert, pdb.tls_key, pdb.tls_ca) == (
        "modbus-tls", str(pki / "gateway.pem"), str(pki / "gateway.key"), str(pki / "ca.pem"))
    assert (pdb.tls_server_cert, pdb.tls_server_key, pdb.tls_client_ca) == (
        str(pki / "aisle01.pem"), str(pki / "aisle01.key"), None)
    assert site.sources[0].device.tls_server_cert is None and site.sources[0].device.tls_ca == str(pki / "ca.pem")


def test_site_file_tls_errors_name_file_line_and_key(site_dir):
    lines = SMALL.splitlines()
    source_a = next(i for i, line in enumerate(lines) if "port: 15020, unit_id: 1," in line)
    source_b = next(i for i, line in enumerate(lines) if "port: 15020, unit_id: 2," in line)
    pdb_a = next(i for i, line in enumerate(lines) if "PDB-01-A" in line)
    unit = next(i for i, line in enumerate(lines) if "unit_id: 12," in line)
    # a missing file; a modbus-tls device without its CA; tls on a plain device; a key not of its certificate
    lines[source_a] = lines[source_a].replace(
        "profile: power_source_v1}", "profile: power_source_v1, driver: modbus-tls, "
        "tls: {cert: pki/gateway.pem, key: pki/gateway.key, ca: pki/missing-ca.pem}}")
    lines[source_b] = lines[source_b].replace(
        "profile: power_source_v1}", "profile: power_source_v1, driver: modbus-tls, "
        "tls: {cert: pki/gateway.pem, key: pki/gateway.key}}")
    lines[pdb_a] = lines[pdb_a].replace("profile: pdb_segment_v1}", f"profile: pdb_segment_v1, {GATEWAY_TLS}}}")
    lines[unit] = lines[unit].replace("port: 15021", "port: 15802").replace(  # an endpoint of its own
        "profile: micro_ats_v1}", "profile: micro_ats_v1, driver: modbus-tls, "
        "tls: {cert: pki/gateway.pem, key: pki/aisle01.key, ca: pki/ca.pem}}")
    path = small_site(site_dir, "\n".join(lines) + "\n", "bad-tls.yaml")
    errors = errors_of(path)
    assert errors == [
        f"{path}:{source_a + 1}: sources[0].device.tls.ca: file not found: {site_dir / 'pki' / 'missing-ca.pem'}",
        f"{path}:{source_b + 1}: sources[1].device.tls: driver modbus-tls needs tls.ca (the gateway's client "
        "certificate, its private key and the CA that signs device certificates)",
        f"{path}:{pdb_a + 1}: aisles[0].pdbs[0].device.tls: only used with driver modbus-tls "
        "(this device's driver is 'modbus')",
        f"{path}:{unit + 1}: aisles[0].units[1].device.tls.key: cert and key are not a matching PEM certificate "
        "and private key (key values mismatch)",
    ], "\n".join(errors)


def test_devices_sharing_an_endpoint_share_its_security(site_dir):
    lines = SMALL.splitlines()
    unit = next(i for i, line in enumerate(lines) if "unit_id: 12," in line)
    lines[unit] = lines[unit].replace("profile: micro_ats_v1}", f"profile: micro_ats_v1, driver: modbus-tls, "
                                                                 f"{GATEWAY_TLS}}}")
    path = small_site(site_dir, "\n".join(lines) + "\n", "mixed-endpoint.yaml")
    [error] = errors_of(path)
    assert error.startswith(f"{path}:{unit + 1}: aisles[0].units[1].device: 127.0.0.1:15021 is also the endpoint "
                            f"of PDB-01-A")
