"""Plant-backed Modbus TCP endpoints: the simulated devices as a gateway sees them.

One pymodbus TCP server per distinct (host, port) of the site answers for the unit ids of
the devices at that address, with the register map of each device's profile
(drivers/profiles/*.yaml). Registers are not stored copies of the plant: every read encodes
`plant.read_device(name)` at the time of the request, and a clock task advances the plant
with wall-clock time * speed every `tick_s` (100 ms), so a value is never older than a tick.
A write covering a command block calls `plant.command(...)`.

An endpoint whose devices use driver "modbus-tls" is served over Modbus/TCP Security instead
(pymodbus ModbusTlsServer): TLS 1.2 or later with the device's own certificate
(device.tls.server_cert/server_key in the site file) and client certificates REQUIRED, checked
against device.tls.client_ca (default: device.tls.ca); a client without one is refused.

pymodbus 3.16 hooks used: `SimDevice(action=...)`, called on every access to a device's
registers before pymodbus answers; the action refreshes the registers in place (reads) or
executes a command and may return a Modbus exception code (writes).

Exception codes (Modbus Application Protocol v1.1b3, section 7):
    0x02 ILLEGAL DATA ADDRESS  unmapped address, or a write not covering exactly one command block
    0x03 ILLEGAL DATA VALUE    argument outside its enumeration or range
    0x04 SERVER DEVICE FAILURE the device refuses the command (InterlockRefused); nothing changes
    0x0B GATEWAY TARGET DEVICE FAILED TO RESPOND   unknown unit id, or a device set offline
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer, ModbusTlsServer
from pymodbus.simulator import DataType, SimData, SimDevice

from siteconfig.model import DeviceEndpoint, Site
from siteconfig.profiles import (
    BIT_TABLES,
    TABLES,
    CommandMap,
    CommandResult,
    PointMap,
    Profile,
    decode_command,
    encode_point,
    load_profile,
)
from simulator.plant import InterlockRefused
from simulator.tsn_endpoint import LinkUnavailable, TsnEndpoint

__all__ = ["TICK_S", "Endpoint", "EndpointError", "SimulatedDevice", "SimulatorHost"]

log = logging.getLogger(__name__)

TICK_S = 0.1  # plant clock tick: a served value is at most this old (brief: refresh >= every 100 ms)
HEARTBEAT_PERIOD_S = 0.1  # the Heartbeat diagnostic counts 100 ms periods (profiles document it)
CATCH_ALL_UNIT = 0  # pymodbus SimDevice id 0 answers every unit id no other device claims

# Modbus function code -> table (Modbus Application Protocol v1.1b3, section 6)
FUNCTION_TABLE = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input",
                  3: "holding", 6: "holding", 16: "holding", 22: "holding", 23: "holding"}
_UINT32_SPAN = 2**32
_UINT16_SPAN = 2**16


class _ListenFailureFilter(logging.Filter):
    """Drops pymodbus's own warning when a listener cannot bind: Endpoint.start raises EndpointError."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to start server")


logging.getLogger("pymodbus.logging").addFilter(_ListenFailureFilter())


class EndpointError(OSError):
    """An endpoint could not listen (port in use, address not local ...)."""


@dataclass(frozen=True)
class _TableLayout:
    """One table of one profile as served: its span and what lives where."""

    table: str
    low: int  # first address of the span
    high: int  # first address after it
    valid: frozenset[int]  # mapped addresses (registers, or bits)
    maps: tuple[PointMap, ...]  # points and diagnostics in this table


def _layouts(profile: Profile) -> dict[str, _TableLayout]:
    out: dict[str, _TableLayout] = {}
    for table in TABLES:
        maps = tuple(profile.maps(table))
        spans = [(p.address, p.end) for p in maps]
        if table == "holding":
            spans += [(c.address, c.end) for c in profile.commands]
        if not spans:
            continue
        valid = frozenset(a for start, end in spans for a in range(start, end))
        out[table] = _TableLayout(table, min(s for s, _ in spans), max(e for _, e in spans), valid, maps)
    return out


def _sim_blocks(spans: dict[str, tuple[int, int]]) -> tuple[list[SimData], ...]:
    """pymodbus blocks (coils, discrete inputs, holding, input) sized to these spans.

    Every address of a span is storage; which of them are mapped is checked by the action.
    An absent register table gets one invalid register (pymodbus answers 0x02 for it).
    """

    def block(table: str) -> list[SimData]:
        if table in spans:
            low, high = spans[table]
            if table in BIT_TABLES:
                return [SimData(low, count=high - low, values=False, datatype=DataType.BITS)]
            return [SimData(low, count=high - low, values=0, datatype=DataType.REGISTERS)]
        if table in BIT_TABLES:  # pymodbus needs a bit block; the action refuses every address
            return [SimData(0, values=False, datatype=DataType.BITS)]
        return [SimData(0, datatype=DataType.INVALID)]

    return block("coil"), block("discrete"), block("holding"), block("input")


class SimulatedDevice:
    """One device behind an endpoint: its registers are computed from the plant on each access."""

    def __init__(self, host: SimulatorHost, name: str, kind: str, endpoint: DeviceEndpoint, profile: Profile):
        self.host, self.name, self.kind, self.endpoint, self.profile = host, name, kind, endpoint, profile
        self.layouts = host._layouts_of(profile)
        plant_time = next((p for p in profile.diagnostics if p.name == "PlantTime"), None)
        self._plant_time_wrap_s = _UINT32_SPAN * plant_time.scale if plant_time else math.inf
        self.online = True  # False: the unit does not answer (0x0B), its endpoint keeps serving others
        self.requests = 0  # Modbus requests addressed to it (what a real device's counters would show)
        self._warned: set[str] = set()
        self.power_up()

    @property
    def unit_id(self) -> int:
        return self.endpoint.unit_id

    def power_up(self) -> None:
        """Reset what a power cycle resets: the device clock's heartbeat and command diagnostics."""
        self.powered_at = time.monotonic()
        self.command_counter = 0
        self.last_command = 0
        self.last_result = CommandResult.NONE
        self.command_return = 0.0

    def sim_device(self) -> SimDevice:
        """The pymodbus SimDevice serving this device, with its access hook."""
        spans = {t: (lay.low, lay.high) for t, lay in self.layouts.items()}
        return SimDevice(self.unit_id, simdata=_sim_blocks(spans), action=self.action)

    # --- the pymodbus hook ---------------------------------------------------------------------
    async def action(self, function_code: int, start_address: int, address: int, count: int,
                     registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes | None:
        """pymodbus SimDevice action: refresh registers on reads, execute commands on writes.

        For bit tables pymodbus passes `address` in bits and `count` in 16-bit registers.
        """
        self.requests += 1
        if not self.online:
            return ExcCodes.GATEWAY_NO_RESPONSE
        table = FUNCTION_TABLE.get(function_code)
        layout = self.layouts.get(table) if table else None
        if layout is None:
            return ExcCodes.ILLEGAL_ADDRESS
        try:
            if values is None:
                return self._read(layout, start_address, address, count, registers)
            return self._write(layout, address, list(values))
        except Exception:  # a plant or profile bug must not kill the server: answer, log once
            if "action" not in self._warned:
                self._warned.add("action")
                log.exception("%s: failed to serve FC%d at %d", self.name, function_code, address)
            return ExcCodes.DEVICE_FAILURE

    def _read(self, layout: _TableLayout, start_address: int, address: int, count: int,
              registers: list[int]) -> ExcCodes | None:
        if layout.table in BIT_TABLES:
            if address not in layout.valid:
                return ExcCodes.ILLEGAL_ADDRESS
            self._fill_bits(layout, start_address, registers)
            return None
        if any(a not in layout.valid for a in range(address, address + count)):
            return ExcCodes.ILLEGAL_ADDRESS
        if layout.table == "input":
            self._fill_registers(layout, start_address, registers)
        return None  # holding: the command blocks read back the last accepted arguments

    def _write(self, layout: _TableLayout, address: int, values: list[int]) -> ExcCodes | None:
        command = self.profile.command_at(address) if layout.table == "holding" else None
        if command is None or len(values) != command.size:
            return ExcCodes.ILLEGAL_ADDRESS
        return self.execute(command, values)

    # --- commands ----------------------------------------------------------------------------
    def execute(self, command: CommandMap, registers: list[int]) -> ExcCodes | None:
        """Run one command from the registers written to its block; None if accepted."""
        self.last_command = command.code
        try:
            args = decode_command(command, registers)
        except ValueError as exc:
            log.info("%s: %s rejected: %s", self.name, command.name, exc)
            self.last_result = CommandResult.INVALID_ARGUMENT
            return ExcCodes.ILLEGAL_VALUE
        self.host.sync()  # the command lands at the plant time of its arrival
        try:
            result = self.host.plant.command(self.name, command.name, **args) or {}
        except InterlockRefused as exc:
            log.info("%s: %s%s refused: %s", self.name, command.name, args, exc)
            self.last_result = CommandResult.REFUSED
            return ExcCodes.DEVICE_FAILURE
        except ValueError as exc:
            log.info("%s: %s%s rejected: %s", self.name, command.name, args, exc)
            self.last_result = CommandResult.INVALID_ARGUMENT
            return ExcCodes.ILLEGAL_VALUE
        self.command_counter = (self.command_counter + 1) % _UINT16_SPAN
        self.last_result = CommandResult.ACCEPTED
        returned = result.get(command.returns.name) if command.returns else None
        self.command_return = float(returned) if returned is not None else 0.0
        log.info("%s: %s%s accepted %s", self.name, command.name, args, result)
        return None

    # --- register contents ---------------------------------------------------------------------
    def values(self) -> dict[str, float | int | bool]:
        """Every point and diagnostic of the device now, in engineering units."""
        plant = self.host.plant
        return {
            **plant.read_device(self.name),
            "PlantTime": math.fmod(plant.t_s, self._plant_time_wrap_s),
            "Heartbeat": int((time.monotonic() - self.powered_at) / HEARTBEAT_PERIOD_S) % _UINT16_SPAN,
            "CommandCounter": self.command_counter,
            "LastCommand": self.last_command,
            "LastCommandResult": int(self.last_result),
            "CommandReturn": self.command_return,
        }

    def _encode(self, point: PointMap, value) -> list[int]:
        try:
            return encode_point(point, value, clamp=True)
        except (ValueError, TypeError) as exc:
            if point.name not in self._warned:
                self._warned.add(point.name)
                log.warning("%s: %s = %r cannot be encoded (%s); serving 0", self.name, point.name, value, exc)
            return [0] * point.size

    def _fill_registers(self, layout: _TableLayout, start_address: int, registers: list[int]) -> None:
        values = self.values()
        for point in layout.maps:
            offset = point.address - start_address
            registers[offset : offset + point.size] = self._encode(point, values[point.name])

    def _fill_bits(self, layout: _TableLayout, start_register: int, registers: list[int]) -> None:
        values = self.values()
        words = [0] * len(registers)
        for point in layout.maps:
            bit = point.address - 16 * start_register
            if self._encode(point, values[point.name])[0]:
                words[bit // 16] |= 1 << (bit % 16)
        registers[:] = words


class _UnknownUnit:
    """Answers for unit ids that no device at the endpoint has (pymodbus id 0 = catch-all)."""

    @staticmethod
    async def action(*_args) -> ExcCodes:
        return ExcCodes.GATEWAY_NO_RESPONSE


class Endpoint:
    """One Modbus TCP server at (host, port), answering for its devices' unit ids; TLS with `sslctx`."""

    def __init__(self, address: tuple[str, int], devices: Iterable[SimulatedDevice],
                 sslctx: ssl.SSLContext | None = None):
        self.address = address
        self.devices: dict[int, SimulatedDevice] = {d.unit_id: d for d in devices}
        self.sslctx = sslctx
        self._server: ModbusTcpServer | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def _sim_devices(self) -> list[SimDevice]:
        sims = [d.sim_device() for d in self.devices.values()]
        if CATCH_ALL_UNIT not in self.devices:
            spans: dict[str, tuple[int, int]] = {}
            for d in self.devices.values():
                for t, lay in d.layouts.items():
                    low, high = spans.get(t, (lay.low, lay.high))
                    spans[t] = (min(low, lay.low), max(high, lay.high))
            sims.append(SimDevice(CATCH_ALL_UNIT, simdata=_sim_blocks(spans), action=_UnknownUnit.action))
        return sims

    async def start(self) -> None:
        """Listen (a device power-up: diagnostics restart); EndpointError if the port cannot be bound."""
        if self._server is not None:
            return
        for device in self.devices.values():
            device.power_up()
        if self.sslctx is not None:
            server = ModbusTlsServer(self._sim_devices(), address=self.address, sslctx=self.sslctx)
        else:
            server = ModbusTcpServer(self._sim_devices(), address=self.address)
        try:
            await server.serve_forever(background=True)
        except RuntimeError:
            await server.shutdown()
            raise EndpointError(f"cannot listen on {self.address[0]}:{self.address[1]}: "
                                f"{_bind_problem(self.address)}") from None
        self._server = server

    async def stop(self) -> None:
        """Close the listener and every client connection (a device power-off)."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()


def _server_ssl_context(address: tuple[str, int], devices: list[SimulatedDevice]) -> ssl.SSLContext | None:
    """The TLS context of an endpoint whose devices use modbus-tls, else None; ValueError if unusable."""
    secure = [d for d in devices if d.endpoint.driver == "modbus-tls"]
    if not secure:
        return None
    where = f"{address[0]}:{address[1]}"
    if len(secure) != len(devices):
        raise ValueError(f"{where}: mixes modbus-tls and plain devices; one endpoint is one TLS server or none")
    # One listener presents one certificate: the devices behind it (unit ids of one Modbus
    # gateway or one device) name the same files.
    files = {(d.endpoint.tls_server_cert, d.endpoint.tls_server_key, d.endpoint.tls_client_ca or d.endpoint.tls_ca)
             for d in devices}
    if len(files) > 1:
        raise ValueError(f"{where}: its devices name different tls.server_cert, server_key or client_ca")
    cert, key, client_ca = files.pop()
    if None in (cert, key, client_ca):
        raise ValueError(f"{secure[0].name}: driver modbus-tls: simulating it needs tls.server_cert, "
                         f"tls.server_key and tls.client_ca (or tls.ca)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # MB-TCP-Security-v21 R-01: TLS 1.2 or later
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual authentication: no trusted client certificate, no session
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=client_ca)
    except OSError as exc:  # ssl.SSLError, FileNotFoundError
        raise ValueError(f"{where}: cannot load its TLS certificate, key or client CA: {exc}") from None
    return ctx


def _bind_problem(address: tuple[str, int]) -> str:
    """Why binding this address fails (pymodbus only logs it)."""
    try:
        with socket.create_server(address, reuse_port=False):
            return "the listener failed to start"
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "address already in use (another simulator or gateway running?)"
        return os.strerror(exc.errno) if exc.errno else str(exc)


class SimulatorHost:
    """Every device of a site as plant-backed Modbus TCP endpoints, with a real-time plant clock.

    `plant` follows simulator.plant.Plant's API (t_s, advance_to, read_device, command); built
    from the site, scenario and seed when not given. The clock advances it by wall-clock time
    * `speed` every `tick_s`; with run_clock=False the plant moves only when the caller moves it.
    """

    def __init__(self, site: Site, plant=None, *, scenario=None, seed: int | None = 0, speed: float = 1.0,
                 tick_s: float = TICK_S, run_clock: bool = True, tsn_interface: str | None = None):
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if plant is None:
            from simulator.plant import Plant

            plant = Plant(site, scenario=scenario, seed=seed)
        self.site, self.plant, self.speed, self.tick_s, self.run_clock = site, plant, speed, tick_s, run_clock
        self.ticks = 0
        self.overruns = 0  # ticks that took longer than tick_s (the plant cannot keep real time)
        self._profile_layouts: dict[str, dict[str, _TableLayout]] = {}
        self._clock_task: asyncio.Task | None = None
        self._wall0 = time.monotonic()
        self._plant0 = float(plant.t_s)
        self.devices: dict[str, SimulatedDevice] = {}
        by_address: dict[tuple[str, int], list[SimulatedDevice]] = {}
        tsn_devices = [(n, k, e) for n, k, e in site.devices() if e.driver == "tsn"]
        # `driver: tsn` devices are served on the device end of the TSN link (simulator/tsn_endpoint.py)
        self.tsn: TsnEndpoint | None = (TsnEndpoint(self, tsn_devices, site.gateway.tsn, tsn_interface)
                                        if tsn_devices and tsn_interface else None)
        for name, kind, endpoint in site.devices():
            if endpoint.driver == "tsn":
                continue
            profile = load_profile(endpoint.profile)
            if profile.device_kind != kind:
                raise ValueError(f"{name}: profile {profile.name} is for a {profile.device_kind}, not a {kind}")
            device = SimulatedDevice(self, name, kind, endpoint, profile)
            self.devices[name] = device
            address = (endpoint.host, endpoint.port)
            if any(d.unit_id == endpoint.unit_id for d in by_address.get(address, ())):
                raise ValueError(f"{name}: unit id {endpoint.unit_id} at {address[0]}:{address[1]} is taken")
            by_address.setdefault(address, []).append(device)
        self.endpoints: dict[tuple[str, int], Endpoint] = {
            a: Endpoint(a, ds, _server_ssl_context(a, ds)) for a, ds in by_address.items()}

    def _layouts_of(self, profile: Profile) -> dict[str, _TableLayout]:
        if profile.name not in self._profile_layouts:
            self._profile_layouts[profile.name] = _layouts(profile)
        return self._profile_layouts[profile.name]

    # --- clock -------------------------------------------------------------------------------
    def plant_time_now(self) -> float:
        """Where the plant clock should be now: plant time at start + wall time elapsed * speed."""
        if not self.run_clock:
            return float(self.plant.t_s)
        return self._plant0 + (time.monotonic() - self._wall0) * self.speed

    def sync(self) -> None:
        """Advance the plant to now (no-op without the clock)."""
        target = self.plant_time_now()
        if target > self.plant.t_s:
            self.plant.advance_to(target)

    async def _run_clock(self) -> None:
        next_tick = time.monotonic()
        while True:
            next_tick += self.tick_s
            try:
                self.sync()
            except Exception:  # a broken plant freezes; the endpoints keep serving its last state
                log.exception("plant clock stopped at plant time %.3f s", self.plant.t_s)
                return
            self.ticks += 1
            now = time.monotonic()
            if now > next_tick:  # behind: skip the missed ticks rather than bursting to catch up
                self.overruns += 1
                if self.overruns in (1, 100, 10000):
                    log.warning("plant clock overrun #%d: a %.0f ms tick took %.0f ms", self.overruns,
                                1000 * self.tick_s, 1000 * (now - next_tick + self.tick_s))
                next_tick = now
            await asyncio.sleep(max(0.0, next_tick - now))

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every endpoint and the plant clock; on failure nothing is left listening."""
        results = await asyncio.gather(*(e.start() for e in self.endpoints.values()), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if self.tsn is not None and not failures:
            try:
                await self.tsn.start()
            except LinkUnavailable as exc:
                failures.append(EndpointError(f"TSN endpoint: {exc}"))
        if failures:
            await asyncio.gather(*(e.stop() for e in self.endpoints.values()), return_exceptions=True)
            raise failures[0]
        if self.run_clock and self._clock_task is None:
            self._wall0, self._plant0 = time.monotonic(), float(self.plant.t_s)
            self._clock_task = asyncio.create_task(self._run_clock(), name="plant-clock")

    async def stop(self) -> None:
        """Stop the clock and every endpoint."""
        task, self._clock_task = self._clock_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*(e.stop() for e in self.endpoints.values()))
        if self.tsn is not None:
            await self.tsn.stop()

    async def __aenter__(self) -> SimulatorHost:
        await self.start()
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.stop()

    async def stop_endpoint(self, address: tuple[str, int]) -> None:
        """Power one endpoint off: its listener and connections close; the plant runs on."""
        await self.endpoints[address].stop()

    async def start_endpoint(self, address: tuple[str, int]) -> None:
        """Power one endpoint (back) on."""
        await self.endpoints[address].start()

    def endpoint_of(self, name: str) -> Endpoint:
        """The endpoint serving device `name`."""
        device = self.devices[name]
        return self.endpoints[(device.endpoint.host, device.endpoint.port)]

    def set_device_online(self, name: str, online: bool) -> None:
        """Make one unit stop (or resume) answering, its endpoint serving the others: 0x0B."""
        if self.tsn is not None and name in self.tsn.by_name:
            self.tsn.by_name[name].online = online
            return
        self.devices[name].online = online

    def describe(self) -> str:
        """One line: what is served where."""
        ports = sorted({p for _, p in self.endpoints})
        hosts = sorted({h for h, _ in self.endpoints})
        port_text = f"{ports[0]}-{ports[-1]}" if len(ports) > 1 else str(ports[0]) if ports else "-"
        secure = sum(e.sslctx is not None for e in self.endpoints.values())
        tls_text = f", {secure} of them Modbus/TCP Security (TLS)" if secure else ""
        tsn_text = f", {self.tsn.describe()}" if self.tsn is not None else ""
        return (f"site '{self.site.name}': {len(self.devices)} devices on {len(self.endpoints)} Modbus TCP "
                f"endpoints ({', '.join(hosts)} ports {port_text}{tls_text}){tsn_text}, plant speed x{self.speed:g}")
