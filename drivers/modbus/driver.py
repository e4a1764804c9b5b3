"""Modbus TCP driver: polls devices by their register-map profile into the point table.

Shaped like Home Assistant's DataUpdateCoordinator: one poller per TCP connection (one
host:port, many unit ids behind it) fetches each device's blocks once per scan period and fans
the decoded values out through the point table. Connections poll concurrently, so a slow or
dead device stalls only the devices behind the same connection, and only for its timeout.

Quality per device: Good after a successful read; UncertainLastUsableValue as soon as a read
fails; BadCommunicationError once the last good read is older than the stale time; Good again
on recovery. Lost connections come back with exponential backoff bounded by the shortest poll
period of the connection's devices (and BACKOFF_MAX_S): Good again within two poll periods of the
device answering.

The log says when a connection (or one device behind a working connection) becomes unavailable,
with the reason, and when it is back online: one line each, as Home Assistant's coordinator
does, never one per failed poll. The counts are in the connection's health (Diagnostics).

A device that answers garbage (an undecodable frame, a wrong length, an answer to another
transaction, bytes that are not Modbus TCP) is a decode error: counted in the health's
`decode_errors`, the connection dropped and made again, since the stream can no longer be
trusted to be in step. pymodbus would raise out of `data_received` for some of these (asyncio
logs "Fatal error: protocol.data_received() call failed" with a traceback) and silently skip or
wait on the others; `_guard_framing` wraps the client's `callback_data`, where pymodbus hands the
received bytes to its framer, to catch and report all of them instead.

Devices with driver "modbus-tls" are polled over Modbus/TCP Security (drivers/modbus/tls.py):
TLS with mutual certificates, never falling back to plain TCP; a failed handshake is reported in
the connection's health (LastError 'TLS: ...') and the devices go Uncertain then Bad like any
unreachable device. Plain "modbus" devices still work and are warned about once at start-up.
"""

from __future__ import annotations

import asyncio
import math
import logging
import random
import os
import ssl
import time
from dataclasses import dataclass, field

from pymodbus.client import AsyncModbusTcpClient, AsyncModbusTlsClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.pdu import ModbusPDU

from drivers.base import (ConnectionHealth, DeviceError, DeviceProtocolError, DeviceRefused,  # noqa: F401
                          DeviceRejectedArgument, DeviceUnreachable)
from drivers.modbus import tls
from drivers.pointtable import PointTable, Quality
from siteconfig.model import DeviceEndpoint, Site
from siteconfig.points import POINTS
from siteconfig.profiles import Profile, ReadBlock, encode_command, load_profile, read_blocks

log = logging.getLogger(__name__)
# pymodbus logs every failed connect and late answer at ERROR; the driver reports them once, in
# its health and in the point qualities, instead.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 5.0
REQUEST_TIMEOUT_S = 1.0
# One TCP connection carries one request at a time. Behind a busy endpoint (a Modbus gateway
# with many unit ids) the driver opens up to this many connections and splits the devices
# between them, so round trips overlap; most Modbus TCP servers accept 8 or more clients.
DEVICES_PER_CONNECTION = 13
MAX_CONNECTIONS_PER_ENDPOINT = 8

# Modbus exception codes (Modbus Application Protocol v1.1b3, section 7)
ILLEGAL_DATA_ADDRESS = 0x02
ILLEGAL_DATA_VALUE = 0x03
SERVER_DEVICE_FAILURE = 0x04

# The site file's `driver:` values this driver serves (registered in drivers.base): Modbus TCP, and
# Modbus/TCP Security (TLS).
MODBUS_DRIVERS = ("modbus", "modbus-tls")

PLAIN_DEVICES_NAMED = 5  # the start-up warning names this many plain Modbus TCP devices
# MBAP header (Modbus Messaging on TCP/IP Implementation Guide v1.0b, 3.1.3): transaction id (2
# bytes), protocol id (2, always 0 for Modbus), length (2), unit id (1); the function code follows.
MBAP_HEADER_BYTES = 7
FUNCTION_CODES = {"holding": 0x03, "input": 0x04, "coil": 0x01, "discrete": 0x02}


class UndecodableAnswer(ModbusException):
    """The device's bytes are not a well-formed answer to the request (pymodbus would log or skip them)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass
class DeviceBinding:
    name: str
    kind: str
    endpoint: DeviceEndpoint
    profile: Profile
    period_s: float
    blocks: list[ReadBlock]
    next_due: float = 0.0
    last_good: float = 0.0
    good: bool = False
    unavailable: bool = False  # its own failure (the connection up) has been logged; cleared on recovery
    removed: bool = False  # a site reload removed it: no further request, no further value


@dataclass
class _Backoff:
    max_s: float = BACKOFF_MAX_S
    delay: float = BACKOFF_INITIAL_S

    def next(self) -> float:
        d = min(self.delay * random.uniform(0.8, 1.2), self.max_s)
        self.delay = min(self.delay * 2.0, self.max_s)
        return d

    def reset(self) -> None:
        self.delay = min(BACKOFF_INITIAL_S, self.max_s)


class ModbusConnection:
    """One TCP connection (TLS when `sslctx` is given) and the devices behind it."""

    def __init__(self, host: str, port: int, devices: list[DeviceBinding], table: PointTable,
                 stale_time_s: float, timeout_s: float = REQUEST_TIMEOUT_S, label: str | None = None,
                 sslctx: ssl.SSLContext | None = None):
        self.host, self.port = host, port
        self.sslctx = sslctx
        self.label = label or f"{host}:{port}"
        self.devices = devices
        self.by_name = {d.name: d for d in devices}
        self.table = table
        self.stale_time_s = stale_time_s
        self.timeout_s = timeout_s
        self.health = ConnectionHealth(host, port, devices=len(devices), label=self.label)
        self._client: AsyncModbusTcpClient | None = None
        self._lock = asyncio.Lock()  # commands and polls share the connection, one request at a time
        self._task: asyncio.Task | None = None
        # never wait longer than the shortest poll period between attempts: a device that answers
        # again is Good within two poll periods, not after a backoff of seconds
        self._backoff = _Backoff(max_s=min([BACKOFF_MAX_S, *(d.period_s for d in devices)]))
        self._stopping = False
        self._tls_unproven = False  # a TLS session that has not carried an answer yet
        self._available: bool | None = None  # None until the first read or failure: nothing to report yet
        self._undecodable: str = ""  # why the last answer could not be decoded ('' if it could)

    # ---- devices added and removed by a site reload -------------------------------------------------
    def add(self, dev: DeviceBinding) -> None:
        """Poll one more device, from its next scan slot on (now)."""
        dev.next_due = time.monotonic()
        self.devices.append(dev)
        self.by_name[dev.name] = dev
        self.health.devices = len(self.devices)
        self._backoff.max_s = min([BACKOFF_MAX_S, *(d.period_s for d in self.devices)])

    async def remove(self, name: str) -> None:
        """Poll a device no more; returns once a request of its in flight (if any) has ended."""
        dev = self.by_name.pop(name)
        dev.removed = True
        self.devices.remove(dev)
        self.health.devices = len(self.devices)
        async with self._lock:  # the block being read now, if it is one of its blocks, has its answer
            pass

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"modbus {self.host}:{self.port}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._close()

    def _close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a broken transport must not raise
                pass
        self._client = None
        self.health.connected = False
        self.health.tls = ""

    async def _connect(self) -> bool:
        self._close()
        name = f"{self.host}:{self.port}"
        if self.sslctx is not None:
            client = AsyncModbusTlsClient(self.host, port=self.port, sslctx=self.sslctx, timeout=self.timeout_s,
                                          retries=0, reconnect_delay=0, name=name)
        else:
            client = AsyncModbusTcpClient(self.host, port=self.port, timeout=self.timeout_s, retries=0,
                                          reconnect_delay=0, name=name)
        handshake_error = _capture_connect_error(client) if self.sslctx is not None else None
        try:
            ok = await asyncio.wait_for(client.connect(), timeout=self.timeout_s + 0.5)
        except (asyncio.TimeoutError, OSError) as exc:
            ok = False
            self.health.last_error = f"connect: {exc or 'timeout'}"
        if not ok:
            client.close()
            if handshake_error:  # pymodbus returns False and keeps the reason: say it
                exc = handshake_error[0]
                self.health.last_error = (tls.describe_tls_error(exc) if tls.is_tls_failure(exc)
                                          else f"connect: {exc.strerror or exc}" if isinstance(exc, OSError)
                                          else f"connect: {exc}")
            elif self.sslctx is not None:  # pymodbus timed it out: the TCP connect or the handshake
                self.health.last_error = (f"connect: no TLS session within {self.timeout_s:g} s (unreachable, or "
                                          f"not a Modbus/TCP Security endpoint?)")
            self.health.last_error = self.health.last_error or "connect refused"
            return False
        _guard_framing(client, self._answer_undecodable)
        self._client = client
        self.health.connected = True
        self.health.tls = tls.session_description(client.ctx.transport)
        self._tls_unproven = self.sslctx is not None
        self.health.reconnects += 1
        self._backoff.reset()
        return True

    # ---- polling ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            if self._client is None or not self._client.connected:
                if not await self._connect():
                    self._went_down(self.health.last_error)
                    self._mark_unreachable(time.time())
                    await self._wait_backoff()
                    continue
            now = time.monotonic()
            if not any(d.next_due for d in self.devices):
                self._stagger(now)
            due = [d for d in self.devices if d.next_due <= now]
            started = now
            broken = False
            for dev in due:
                if dev.removed:
                    continue
                # A device read a whole period after its slot has missed a scan: that is an overrun.
                if time.monotonic() - dev.next_due > dev.period_s:
                    self.health.overruns += 1
                # keep the slot's phase (no drift); skip the slots already missed
                dev.next_due += dev.period_s * max(1, math.ceil((time.monotonic() - dev.next_due) / dev.period_s))
                try:
                    values = await self._read_device(dev)
                    if dev.removed:
                        continue
                except DeviceUnreachable as exc:
                    if dev.removed:
                        continue
                    reason = self._unreachable_reason(exc)
                    self._device_failed(dev, reason)
                    self._went_down(reason)
                    broken = True
                    break
                except DeviceError as exc:
                    if dev.removed:
                        continue
                    self._device_failed(dev, str(exc))
                    self._came_up()  # the connection carried an answer: only this device is in trouble
                    if not dev.unavailable:
                        dev.unavailable = True
                        log.warning("%s (%s) is unavailable: %s", dev.name, self.health.key,
                                    str(exc).removeprefix(f"{dev.name}: "))
                    continue
                self._device_answered(dev, values)
            if due:
                self.health.polls += 1
                self.health.poll_duration_ms = (time.monotonic() - started) * 1000.0
            if broken:
                # the connection is gone: every device behind it stops being refreshed now, not only
                # the one whose request failed (else the others stayed Good until the reconnect failed)
                self._mark_unreachable(time.time())
            self._check_stale(time.time())
            if broken:
                self._close()
                await self._wait_backoff()
                continue
            next_due = min(d.next_due for d in self.devices)
            await asyncio.sleep(max(0.0, next_due - time.monotonic()))

    def _stagger(self, now: float) -> None:
        """Spread the devices' scan slots evenly over their period, so that requests (and the
        values they bring) flow steadily instead of in one burst per period."""
        n = len(self.devices)
        for k, dev in enumerate(self.devices):
            dev.next_due = now + dev.period_s * k / n

    def _device_answered(self, dev: DeviceBinding, values: dict) -> None:
        self._tls_unproven = False
        self.table.update_device(dev.name, values, time.time())
        dev.last_good, dev.good = time.monotonic(), True
        self._came_up()
        if dev.unavailable:
            dev.unavailable = False
            log.info("%s (%s) is back online", dev.name, self.health.key)

    # ---- state in the log: one line down (with the reason), one line back ---------------------------
    def _describe(self) -> str:
        names = [d.name for d in self.devices]
        shown = ", ".join(names[:PLAIN_DEVICES_NAMED]) + (f" and {len(names) - PLAIN_DEVICES_NAMED} more"
                                                          if len(names) > PLAIN_DEVICES_NAMED else "")
        return f"{self.health.key} ({shown})"

    def _went_down(self, reason: str) -> None:
        if self._available is not False:
            log.warning("%s is unavailable: %s", self._describe(), reason)
        self._available = False

    def _came_up(self) -> None:
        if self._available is False:
            log.info("%s is back online", self._describe())
        self._available = True

    def _answer_undecodable(self, reason: str) -> None:
        """Called by the framing guard: count it; the request in flight (if any) fails with it."""
        self.health.decode_errors += 1
        self._undecodable = reason

    def _unreachable_reason(self, exc: DeviceUnreachable) -> str:
        # Under TLS 1.3 a device checks the gateway's certificate after the gateway's side of the
        # handshake is done: a refusal shows as the session closing before the first answer.
        if self._tls_unproven:
            return (f"TLS: the device closed the session after the handshake (does it trust the gateway's "
                    f"certificate?): {exc}")
        return str(exc)

    async def _wait_backoff(self) -> None:
        """Sleep the backoff delay, still turning Uncertain values Bad when they grow stale."""
        until = time.monotonic() + self._backoff.next()
        while (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.5))
            self._check_stale(time.time())

    async def _read_device(self, dev: DeviceBinding) -> dict:
        values: dict = {}
        for block in dev.blocks:
            if dev.removed:
                break
            values.update(await self._read_block(dev, block))
        return values

    async def _read_block(self, dev: DeviceBinding, block: ReadBlock) -> dict:
        client = self._client
        if client is None or not client.connected:
            raise DeviceUnreachable("not connected")
        unit = dev.endpoint.unit_id
        async with self._lock:
            self._undecodable = ""
            asked = time.monotonic()
            try:
                if block.table == "input":
                    rr = await client.read_input_registers(block.address, count=block.count, device_id=unit)
                elif block.table == "holding":
                    rr = await client.read_holding_registers(block.address, count=block.count, device_id=unit)
                elif block.table == "coil":
                    rr = await client.read_coils(block.address, count=block.count, device_id=unit)
                else:
                    rr = await client.read_discrete_inputs(block.address, count=block.count, device_id=unit)
            except UndecodableAnswer as exc:
                raise DeviceUnreachable(f"{dev.name}: {exc}") from None
            except (ConnectionException, asyncio.TimeoutError, OSError) as exc:
                raise DeviceUnreachable(f"{dev.name}: {self._undecodable or exc or 'timeout'}") from None
            except ModbusException as exc:
                # no answer in time; bytes that arrived but never made a whole frame are a decode error
                partial = len(getattr(client.ctx, "recv_buffer", b""))
                if partial and not self._undecodable:
                    self._answer_undecodable(f"incomplete answer ({partial} bytes, no whole frame in "
                                             f"{self.timeout_s:g} s: wrong length?)")
                silent = not partial and time.monotonic() - asked >= self.timeout_s
                reason = self._undecodable or (f"no answer within {self.timeout_s:g} s" if silent else str(exc))
                raise DeviceUnreachable(f"{dev.name}: {reason}") from None
        if rr.isError():
            raise _exception_error(dev.name, getattr(rr, "exception_code", 0))
        problem = _answer_problem(rr, block)
        if problem:
            self._answer_undecodable(problem)
            raise DeviceUnreachable(f"{dev.name}: {problem}")
        data = rr.registers if block.table in ("input", "holding") else rr.bits
        return block.decode(data)

    def _device_failed(self, dev: DeviceBinding, error: str) -> None:
        self.health.last_error = error
        self.health.errors += 1
        if dev.good or self.table.device_quality(dev.name) is Quality.GOOD:
            dev.good = False
            self.table.set_quality(dev.name, Quality.UNCERTAIN_LAST_USABLE, time.time())

    def _mark_unreachable(self, wall: float) -> None:
        for dev in self.devices:
            if dev.good:
                dev.good = False
                self.table.set_quality(dev.name, Quality.UNCERTAIN_LAST_USABLE, wall)
        self._check_stale(wall)

    def _check_stale(self, wall: float) -> None:
        now = time.monotonic()
        for dev in self.devices:
            if not dev.good and dev.last_good and now - dev.last_good > self.stale_time_s:
                self.table.set_quality(dev.name, Quality.BAD_COMM, wall)

    # ---- on-demand access (the command service) ----------------------------------------------------
    async def read_now(self, device: str) -> dict:
        """Read every block of a device now (out of its scan), update the table, return the values."""
        dev = self.by_name[device]
        values = await self._read_device(dev)
        self._device_answered(dev, values)
        return values

    async def write_command(self, device: str, command: str, **args) -> None:
        """Write one command block; raises a DeviceError subclass when it does not go through."""
        dev = self.by_name[device]
        cmd = dev.profile.command(command)
        registers = encode_command(cmd, **args)
        client = self._client
        if client is None or not client.connected:
            raise DeviceUnreachable(f"{device}: not connected")
        async with self._lock:
            try:
                rr = await client.write_registers(cmd.address, registers, device_id=dev.endpoint.unit_id)
            except (ConnectionException, ModbusException, asyncio.TimeoutError, OSError) as exc:
                raise DeviceUnreachable(f"{device}: {exc or 'timeout'}") from None
        if rr.isError():
            raise _exception_error(device, getattr(rr, "exception_code", 0))


def _answer_problem(rr: ModbusPDU, block: ReadBlock) -> str:
    """Why a decoded answer does not answer the read of `block` ('' when it does)."""
    expected = FUNCTION_CODES[block.table]
    if rr.function_code != expected:
        return f"answer with function code 0x{rr.function_code:02x} to a request with 0x{expected:02x}"
    got = len(rr.registers) if block.table in ("input", "holding") else len(rr.bits)
    if got < block.count:
        return f"answer with {got} {'registers' if block.table in ('input', 'holding') else 'bits'}, " \
               f"{block.count} asked for (wrong length)"
    return ""


def _guard_framing(client: AsyncModbusTcpClient, undecodable) -> None:
    """Catch what the client's framer makes of bad bytes, call `undecodable(reason)`, fail the request.

    pymodbus passes every received chunk to `TransactionManager.callback_data` (from the
    transport's `data_received`), which frames and decodes it and resolves the pending request's
    `response_future`. On bytes it cannot decode it raises out of `data_received` (asyncio then
    logs "Fatal error: protocol.data_received() call failed" with a traceback and closes the
    transport); frames for another transaction or unit id it logs and skips; a header whose
    protocol id is not 0 it leaves in the buffer. Each of these is a device out of step: the
    request in flight fails now with UndecodableAnswer (instead of timing out), and unsolicited
    garbage closes the connection, which the poll loop makes again.
    """
    ctx = getattr(client, "ctx", None)
    framed = getattr(ctx, "callback_data", None)
    if framed is None:  # another pymodbus layout: its own handling (and logging) stays
        return

    def guarded(data: bytes, addr: tuple | None = None) -> int:
        reason = ""
        try:
            used = framed(data, addr)
        except Exception as exc:  # noqa: BLE001 - any decoder failure on a device's bytes is the device's
            reason, used = f"undecodable answer ({exc})", len(data)
        else:
            if ctx.last_pdu is None and len(data) > MBAP_HEADER_BYTES:
                if used:
                    reason = "answer to another request (wrong transaction or unit id)"
                elif data[2:4] != b"\x00\x00":
                    reason = f"not a Modbus TCP frame (protocol id {int.from_bytes(data[2:4], 'big')})"
        if not reason:
            return used
        undecodable(reason)
        future = getattr(ctx, "response_future", None)
        if future is not None and not future.done():
            future.set_exception(UndecodableAnswer(reason))
        elif ctx.transport is not None:  # nothing asked: drop the connection, the poll loop makes it again
            ctx.transport.abort()
        return len(data)

    ctx.callback_data = guarded


def _check_same_security(host: str, port: int, devices: list[DeviceBinding]) -> None:
    """One endpoint is one TLS peer (or one plain one): its devices must agree (the loader checks files)."""
    def security(d: DeviceBinding) -> tuple:
        return d.endpoint.driver, d.endpoint.tls_cert, d.endpoint.tls_key, d.endpoint.tls_ca

    first = devices[0]
    for other in devices[1:]:
        if security(other) != security(first):
            raise ValueError(f"{other.name} and {first.name} share {host}:{port} but not the same driver "
                             f"and TLS settings")


def _capture_connect_error(client: AsyncModbusTcpClient) -> list[BaseException]:
    """A list that receives the exception of the client's next connect attempt.

    pymodbus logs a failed connect and returns False; the gateway wants the reason (an
    untrusted certificate, a TLS alert) in the connection's LastError, so the transport's
    connection factory is wrapped to keep it.
    """
    captured: list[BaseException] = []
    create = getattr(client.ctx, "call_create", None)
    if create is None:  # another pymodbus layout: the generic message is still reported
        return captured

    async def create_and_keep_error():
        try:
            return await create()
        except Exception as exc:
            captured.append(exc)
            raise

    client.ctx.call_create = create_and_keep_error
    return captured


def _exception_error(device: str, code: int) -> DeviceError:
    if code == SERVER_DEVICE_FAILURE:
        return DeviceRefused(f"{device}: refused (exception 0x04)")
    if code == ILLEGAL_DATA_VALUE:
        return DeviceRejectedArgument(f"{device}: illegal data value (exception 0x03)")
    return DeviceProtocolError(f"{device}: exception 0x{code:02x}")


@dataclass
class ModbusDriver:
    """Every Modbus device of a site, grouped by connection."""

    site: Site
    table: PointTable
    only: frozenset[str] | None = None  # the devices to serve (None: every modbus/modbus-tls device)
    # the gateway's mirror of a driver worker's drivers (drivers/worker.py): points and health entries,
    # never a connection (start() is never called, added devices are not polled here)
    dormant: bool = False
    connections: dict[tuple[str, int, int], ModbusConnection] = field(default_factory=dict)
    device_connection: dict[str, ModbusConnection] = field(default_factory=dict)
    _ssl_contexts: dict[tuple[str, str, str], ssl.SSLContext] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        groups: dict[tuple[str, int], list[DeviceBinding]] = {}
        plain: list[str] = []
        for binding in self._bindings(self.site, self.only):
            if binding.endpoint.driver == "modbus":
                plain.append(binding.name)
            groups.setdefault((binding.endpoint.host, binding.endpoint.port), []).append(binding)
            self.table.define(binding.name, [p.name for p in POINTS[binding.kind]])
        for (host, port), devices in groups.items():
            _check_same_security(host, port, devices)
            n = min(MAX_CONNECTIONS_PER_ENDPOINT, max(1, -(-len(devices) // DEVICES_PER_CONNECTION)))
            for k in range(n):
                share = devices[k::n]
                label = f"{host}:{port}" + (f" #{k + 1}" if n > 1 else "")
                conn = ModbusConnection(host, port, share, self.table, self.site.gateway.stale_time_s, label=label,
                                        sslctx=self._ssl_context(devices[0]))
                self.connections[(host, port, k)] = conn
                for d in share:
                    self.device_connection[d.name] = conn
        if plain:
            shown = ", ".join(plain[:PLAIN_DEVICES_NAMED]) + (f" and {len(plain) - PLAIN_DEVICES_NAMED} more"
                                                              if len(plain) > PLAIN_DEVICES_NAMED else "")
            log.warning("%d device%s on plain Modbus TCP (no encryption): %s", len(plain),
                        "s" if len(plain) != 1 else "", shown)

    def _bindings(self, site: Site, only: frozenset[str] | None) -> list[DeviceBinding]:
        scan = site.gateway.scan_groups_s
        out = []
        for name, kind, ep in site.devices():
            if only is not None and name not in only:
                continue
            if ep.driver not in MODBUS_DRIVERS:
                if only is not None:  # the registry sent a device that is not ours: say so, never skip it
                    raise ValueError(f"{name}: driver {ep.driver} is not a Modbus driver")
                continue
            profile = load_profile(ep.profile)
            blocks = [b for table in profile.tables()
                      for b in read_blocks(profile, table) if any(p.access != "w" for p in b.points)]
            out.append(DeviceBinding(name, kind, ep, profile, scan.get(ep.scan_group, 1.0), blocks))
        return out

    # ---- a site reload: devices added and removed while running -------------------------------------
    def check_add(self, site: Site, devices: list[str]) -> list[str]:
        """Why these devices of `site` could not be added live ([] if they can): bad profiles, TLS files,
        or an endpoint shared with running devices under other security settings."""
        try:
            bindings = self._bindings(site, frozenset(devices))
        except (OSError, ValueError, KeyError) as exc:
            return [str(exc)]
        problems = []
        by_endpoint: dict[tuple[str, int], list[DeviceBinding]] = {}
        for b in bindings:
            by_endpoint.setdefault((b.endpoint.host, b.endpoint.port), []).append(b)
        for (host, port), new in by_endpoint.items():
            running = [d for c in self.connections.values() if (c.host, c.port) == (host, port) for d in c.devices]
            try:
                _check_same_security(host, port, running + new)
                self._ssl_context(new[0])
            except (OSError, ValueError) as exc:
                problems.append(str(exc))
        return problems

    def add_devices(self, site: Site, devices: list[str]) -> None:
        """Define the points of these devices of `site` and poll them: on the connection that already
        serves their endpoint (the one with the fewest devices), else on a new one, started now."""
        self.site = site
        self.only = None if self.only is None else self.only | frozenset(devices)
        plain: list[str] = []
        for binding in self._bindings(site, frozenset(devices)):
            ep = binding.endpoint
            self.table.define(binding.name, [p.name for p in POINTS[binding.kind]])
            serving = [c for c in self.connections.values() if (c.host, c.port) == (ep.host, ep.port)]
            if serving:
                conn = min(serving, key=lambda c: len(c.devices))
                conn.add(binding)
            else:
                conn = ModbusConnection(ep.host, ep.port, [binding], self.table, site.gateway.stale_time_s,
                                        sslctx=self._ssl_context(binding))
                self.connections[(ep.host, ep.port, 0)] = conn
                if not self.dormant:
                    conn.start()
            self.device_connection[binding.name] = conn
            if ep.driver == "modbus":
                plain.append(binding.name)
        if plain:
            shown = ", ".join(plain[:PLAIN_DEVICES_NAMED]) + (f" and {len(plain) - PLAIN_DEVICES_NAMED} more"
                                                              if len(plain) > PLAIN_DEVICES_NAMED else "")
            log.warning("%d added device%s on plain Modbus TCP (no encryption): %s", len(plain),
                        "s" if len(plain) != 1 else "", shown)

    async def remove_devices(self, devices: list[str]) -> None:
        """Stop polling these devices (a connection left with none is closed) and drop their points."""
        for name in devices:
            conn = self.device_connection.pop(name, None)
            if conn is None:
                continue
            if len(conn.devices) == 1 and name in conn.by_name:
                conn.by_name[name].removed = True
                await conn.stop()
                key = next(k for k, c in self.connections.items() if c is conn)
                del self.connections[key]
            else:
                await conn.remove(name)
            self.table.remove(name)
        if self.only is not None:
            self.only = self.only - frozenset(devices)

    @classmethod
    def for_devices(cls, site: Site, table: PointTable, devices: list[str]) -> "ModbusDriver":
        """The registry's factory (drivers.base): a driver for these Modbus and Modbus/TLS devices."""
        return cls(site, table, only=frozenset(devices))

    def _ssl_context(self, device: DeviceBinding) -> ssl.SSLContext | None:
        """The client context of a Modbus/TCP Security endpoint (one per distinct set of files), else None."""
        ep = device.endpoint
        if ep.driver != "modbus-tls":
            return None
        files = (ep.tls_cert, ep.tls_key, ep.tls_ca)
        if None in files:
            raise ValueError(f"{device.name}: driver modbus-tls needs tls cert, key and ca")
        if files not in self._ssl_contexts:
            try:
                self._ssl_contexts[files] = tls.client_context(*files)
            except OSError as exc:  # the loader checked them; a file changed since
                missing = [f for f in files if not os.path.isfile(f)]
                which = f"{missing[0]} is gone" if missing else f"{', '.join(files)}: {exc}"
                raise OSError(f"{device.name}: cannot load its TLS certificate, key or CA ({which})") from None
        return self._ssl_contexts[files]

    async def start(self) -> None:
        if self.dormant:
            raise RuntimeError("a dormant ModbusDriver (a driver worker's mirror) never polls")
        for conn in self.connections.values():
            conn.start()

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.connections.values()))

    def connection(self, device: str) -> ModbusConnection:
        return self.device_connection[device]

    def health(self) -> list[ConnectionHealth]:
        return [c.health for c in self.connections.values()]
