"""The Modbus drivers in a process of their own, feeding the gateway's point table through a socket.

Why: at 1,000 units the Modbus driver was half of the gateway's one event loop (pymodbus' request
path, the block decode, the scan bookkeeping: docs/notes/asyncua.md, "Throughput"); whatever the
OPC UA server did waited behind it, and at 3,000 units the loop ran at 104 % of a core with
thousands of missed scans. Here the drivers run on the second core, and the gateway's loop only
applies what changed.

The flow stays one way and the command path stays where it was:

    devices --Modbus--> worker: DriverSet + its own PointTable --(changes, health)--> socket
        --> gateway: WorkerDriverSet applies them to the gateway's PointTable --> sinks

    CommandService (interlocks, audit) --> WorkerDriverSet.connection(d).write_command
        --(call)--> worker: that device's ModbusConnection.write_command --> device

A command still reaches a device only through the command service: the worker executes what the
gateway sends and nothing else (it has no OPC UA, MQTT or CMCS of its own).

The gateway keeps a *mirror* of the worker's drivers: the same ModbusDriver built from the same
site, never started (`dormant`). It defines every device's points in the gateway's table and holds
the connections' ConnectionHealth entries (Diagnostics, metrics), which the worker's health
reports keep current. What the worker's table changes (values and qualities, deadbands and
de-duplication already applied there) is applied as is (`PointTable.apply`), so every sink sees the
batches it would have seen in one process, and device qualities follow from the same points.

Frames on the socket: a 4-byte big-endian length and a pickle (both ends are this program, on a
socketpair made here: nothing else can write to it). Worker to gateway: ("c", [(device, [(point,
value, quality, ts), ...]), ...], pulled) changes (at most FRAME_CHANGES a frame: a larger batch goes
in several, `pulled` on the last), ("h", {key: fields}) health, ("r", id, ok, value) a call's answer,
("s", counters), ("ready",), ("fail", why) (it cannot build its drivers: the gateway's one line says
why). Gateway to worker: ("init", site, devices, log_level, gateway_pid), ("pull",) (the answer:
("c", changes, True)), ("call", id, method, args, deadline), ("stop",). The worker sends its waiting
changes before every answer, so a read_now's values are in the gateway's table when its call returns.

If the worker dies, or sends nothing for the stale time + 5 s (stopped, its loop blocked: it is then
killed), one line is logged, its devices that were Good turn Uncertain (last usable value; Bad ones
stay Bad), calls in flight and calls made until another worker is ready fail at once as
DeviceUnreachable, and it is started again (backoff 1 s doubling to 10 s); devices of which no worker
has sent anything since go Bad after the stale time, as the driver would have. Every call carries a
deadline (CLOCK_MONOTONIC, one clock for both processes): a call the worker reads after it, because
the gateway has given up on it and answered the caller, is refused there, never carried out late.
After a reload changed the devices, the next worker's connections are grouped afresh, and so is the
mirror (counters carried over).
`gateway.driver_process: false` in the site file keeps the drivers in the gateway's process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from drivers.base import DeviceError, DeviceUnreachable, DriverSet, devices_by_factory, factory_path
from drivers.pointtable import PointTable, Quality, Sink

log = logging.getLogger(__name__)

# the factories whose drivers run in the worker (Modbus over TCP and TLS). TSN stays in the gateway:
# its frames are scheduled against the cycle, and a hop through a socket would add to the command latency.
WORKER_FACTORIES = frozenset({"drivers.modbus.driver:ModbusDriver.for_devices"})

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 2**20  # a frame longer than this is not from our worker: the stream is dropped
FRAME_CHANGES = 50_000  # the worker sends at most this many changes a frame (~2 MB pickled), far below MAX_FRAME
PULL_S = 0.02  # the gateway pulls the worker's changes every 20 ms of its loop (as the address space flushes)
HOLD_AFTER_S = 0.25  # not pulled for this long, or
MAX_PENDING = 200_000  # more changes than this waiting: the worker keeps the latest per point (_Forward)
HEALTH_S = 0.25  # and the connections' health every 250 ms (only the entries that changed)
CALL_TIMEOUT_S = 30.0  # a call the worker does not answer (its own requests time out well before); the
# worker refuses a call it reads after this deadline (CLOCK_MONOTONIC is one clock for both processes), so a
# command the gateway gave up on (and audited as failed) never reaches a device later
WATCHDOG_EXTRA_S = 5.0  # a worker silent for the stale time + this is taken as hung: devices Uncertain, restarted
MAX_TRANSITIONS = 10_000  # quality changes kept in order while changes are held (_Forward), beyond: coalesced
RESTART_MIN_S, RESTART_MAX_S = 1.0, 10.0
# ConnectionHealth fields that change while running (the rest are fixed by the site)
HEALTH_FIELDS = ("connected", "last_error", "poll_duration_ms", "polls", "overruns", "reconnects", "devices",
                 "errors", "tls", "decode_errors", "dropped_frames")
COUNTERS = frozenset({"polls", "overruns", "reconnects", "errors", "decode_errors", "dropped_frames"})  # never go back


def worker_devices(site) -> list[str]:
    """The site's devices whose driver runs in the worker process."""
    return [name for name, _kind, ep in site.devices() if factory_path(ep.driver) in WORKER_FACTORIES]


def make_driver_set(site, table: PointTable) -> DriverSet:
    """The drivers of `cmcs run`: the Modbus ones in a worker process (gateway.driver_process, default
    on) when the site has Modbus devices, else all in this process."""
    if site.gateway.driver_process and worker_devices(site):
        return WorkerDriverSet(site, table)
    return DriverSet(site, table)


def _frame(msg: Any) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> Any | None:
    """The next message, or None at the end of the stream."""
    try:
        head = await reader.readexactly(_HEADER.size)
        (n,) = _HEADER.unpack(head)
        if n > MAX_FRAME:
            raise ValueError(f"frame of {n} bytes")
        return pickle.loads(await reader.readexactly(n))
    except asyncio.IncompleteReadError:
        return None


# ---- the gateway's side ------------------------------------------------------------------------------
class _RemoteConnection:
    """What the command service holds for a device served by the worker: its calls go there; label,
    host, port and health are the mirror connection's."""

    def __init__(self, owner: WorkerDriverSet, device: str) -> None:
        self._owner, self._device = owner, device

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner.mirror.connection(self._device), name)

    async def read_now(self, device: str) -> dict:
        return await self._owner.call("read_now", device)

    async def write_command(self, device: str, command: str, **args: Any) -> None:
        await self._owner.call("write_command", device, command, args)


class WorkerDriverSet(DriverSet):
    """DriverSet whose Modbus drivers run in a worker process (module docstring); other drivers
    (TSN) run here as before."""

    def __init__(self, site, table: PointTable) -> None:
        from drivers.modbus.driver import ModbusDriver

        self.site, self.table = site, table
        remote = worker_devices(site)
        super().__init__(site, table, skip=frozenset(remote))  # TSN and any other driver: here
        self.mirror = ModbusDriver(site, table, only=frozenset(remote), dormant=True)  # defines their points
        self.remote_devices = set(remote)
        self._health_by_key = {h.key: h for h in self.mirror.health()}
        self._counter_base: dict[str, dict[str, int]] = {}  # a restarted worker's counters start from these
        self._layout_changed = False  # a reload added or removed devices: the next worker's connections differ
        self._last_frame = time.monotonic()
        self._loss_reason = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._pull_task: asyncio.Task | None = None
        self._pulled: asyncio.Future | None = None
        self._supervisor: asyncio.Task | None = None
        self._calls: dict[int, asyncio.Future] = {}
        self._background: set[asyncio.Task] = set()
        self._lost_at: float | None = None
        self._unconfirmed: set[str] = set()
        self._next_call = 0
        self._stopping = False
        self.ready = asyncio.Event()  # the current worker has started its drivers
        self.restarts = 0
        self._failed_starts = 0  # workers in a row that ended before they were ready
        self._last_loss = ""  # why the last one ended, as logged
        self.coalesced = 0  # changes the worker held back while this loop was behind (latest per point sent)
        self._coalesced_before = 0

    # ---- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        await super().start()  # the drivers of this process
        self._stopping = False
        self._supervisor = asyncio.create_task(self._supervise(), name="driver worker")
        # no wait for the worker's ready: the address space is built meanwhile, on the other core

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "drivers.worker", str(theirs.fileno()), str(os.getpid()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, stdout=2, env=env)  # its stdout is the gateway's stderr
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=ours, limit=2**18)
        self.ready.clear()
        if self._layout_changed:
            self._rebuild_mirror()
        self._last_frame = time.monotonic()
        self._loss_reason = ""
        self._writer.write(_frame(("init", self.site, sorted(self.remote_devices), logging.getLogger().level,
                                   os.getpid())))
        self._reader_task = asyncio.create_task(self._read(reader), name="driver worker reader")
        self._pull_task = asyncio.create_task(self._pull(self._writer), name="driver worker pull")

    def _rebuild_mirror(self) -> None:
        """After a reload changed the devices, a new worker groups them into connections afresh: so
        does the mirror (on a scratch table: the points are defined here already), keeping each
        connection's counters where they were."""
        from drivers.modbus.driver import ModbusDriver

        logging.disable(logging.WARNING)  # the plain-TCP warning was given at start-up and by the reload
        try:
            mirror = ModbusDriver(self.site, PointTable(), only=frozenset(self.remote_devices), dormant=True)
        finally:
            logging.disable(logging.NOTSET)
        mirror.table = self.table  # later reloads define and drop points in the gateway's table
        self.mirror = mirror
        self._health_by_key = {h.key: h for h in mirror.health()}
        self._layout_changed = False

    async def _pull(self, writer: asyncio.StreamWriter) -> None:
        """Ask the worker for its changes every PULL_S of this loop, one request at a time: a loop
        that is behind asks later, and the worker keeps the latest per point meanwhile (_Forward).
        A worker that sends nothing at all for the stale time + WATCHDOG_EXTRA_S (stopped, its loop
        blocked) is taken as hung: killed, and the supervisor reports it and starts another."""
        loop = asyncio.get_running_loop()
        limit = self.site.gateway.stale_time_s + WATCHDOG_EXTRA_S
        while not writer.is_closing():
            self._pulled = loop.create_future()
            writer.write(_frame(("pull",)))
            while not self._pulled.done():
                try:
                    await asyncio.wait_for(asyncio.shield(self._pulled), 1.0)
                except asyncio.TimeoutError:
                    self.check_stale()
                    silent = time.monotonic() - self._last_frame
                    if silent > limit and self._proc is not None and self._proc.returncode is None:
                        self._loss_reason = f"sent nothing for {silent:.0f} s: killed"
                        self._proc.kill()
                        return
            if self._lost_at is not None:
                self.check_stale()
            await asyncio.sleep(PULL_S)

    async def _supervise(self) -> None:
        backoff = RESTART_MIN_S
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._spawn()
                await self._reader_task  # until the worker's stream ends
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever it was, the devices must not stay Good
                self._loss_reason = f"cannot start ({type(exc).__name__}: {exc})"  # _worker_lost says it
            if self._pull_task is not None:
                self._pull_task.cancel()
            if self._stopping:
                break
            code = await self._reap()
            self._worker_lost(code)
            if time.monotonic() - started > 60:
                backoff = RESTART_MIN_S
            await asyncio.sleep(backoff)
            backoff = min(RESTART_MAX_S, backoff * 2)
            self.restarts += 1
            self.check_stale()

    async def _reap(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        try:
            return await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            proc.kill()
            return await proc.wait()

    def _worker_lost(self, code: int | None) -> None:
        """The worker ended (or was killed as hung): the devices that were Good keep their last values
        as Uncertain (Bad ones stay Bad), calls fail at once until another one is ready. One line is
        logged; a worker that keeps failing to start for the same reason is not logged again each time
        (the line says it is retried; the next worker that starts says how many failed before it)."""
        failed_start = not self.ready.is_set()
        self.ready.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        why = self._loss_reason or f"ended (exit {code})"
        if failed_start:
            self._failed_starts += 1
        if not (failed_start and why == self._last_loss):
            log.error("driver worker process %s: its devices Uncertain until it is running again%s", why,
                      "; retried every 1-10 s, said once" if failed_start else "")
        self._last_loss = why
        now, defined = time.time(), set(self.table.devices())
        for device in sorted(self.remote_devices & defined):
            if self.table.device_quality(device) is Quality.GOOD:
                self.table.set_quality(device, Quality.UNCERTAIN_LAST_USABLE, now)
        self._lost_at = time.monotonic()
        self._unconfirmed = self.remote_devices & defined  # until the (next) worker sends something of them
        for h in self.mirror.health():
            h.connected = False
            h.last_error = f"driver worker process {why}"
        self._counter_base = {h.key: {f: getattr(h, f) for f in COUNTERS} for h in self.mirror.health()}
        self._fail_calls(f"driver worker process {why}")

    def check_stale(self) -> None:
        """After a worker was lost, the devices it served of which no worker has sent anything since go
        from Uncertain to Bad after the stale time, as the driver would have (a new worker starts from an
        empty table: a device that does not answer it never changes there, so it would say nothing)."""
        lost = self._lost_at
        if lost is None or time.monotonic() - lost < self.site.gateway.stale_time_s:
            return
        now, defined = time.time(), set(self.table.devices())
        for device in sorted(self._unconfirmed & self.remote_devices & defined):
            if self.table.device_quality(device) is Quality.UNCERTAIN_LAST_USABLE:
                self.table.set_quality(device, Quality.BAD_COMM, now)
        self._lost_at, self._unconfirmed = None, set()

    def _fail_calls(self, reason: str) -> None:
        calls, self._calls = self._calls, {}
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(DeviceUnreachable(reason))

    async def stop(self) -> None:
        self._stopping = True
        if self._writer is not None:
            try:
                self._writer.write(_frame(("stop",)))
                await self._writer.drain()
            except (ConnectionError, RuntimeError):
                pass
        if self._proc is not None and self._proc.returncode is None:
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except asyncio.TimeoutError:
                log.warning("driver worker did not stop within 10 s: killed")
                self._proc.kill()
                await self._proc.wait()
        for task in (self._pull_task, self._reader_task, self._supervisor):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                    pass
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._fail_calls("gateway stopping")
        await super().stop()

    # ---- the worker's stream ----------------------------------------------------------------------------
    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Every message of the worker, until its stream ends; a message that cannot be read or applied
        ends it too (the supervisor then kills the worker and starts another)."""
        while True:
            try:
                msg = await _read_frame(reader)
                if msg is None:
                    return
                self._last_frame = time.monotonic()
                self._dispatch(msg)
            except asyncio.CancelledError:
                raise
            except ConnectionError:
                return  # the worker's end closed (it died, or was killed): the supervisor says which
            except Exception as exc:  # noqa: BLE001 - a broken stream is a lost worker, never a dead reader
                self._loss_reason = self._loss_reason or f"sent what cannot be read ({type(exc).__name__}: {exc}): killed"
                if self._proc is not None and self._proc.returncode is None:
                    self._proc.kill()
                return

    def _dispatch(self, msg: tuple) -> None:
        """One message of the worker: changes, health, an answer, counters, ready."""
        table = self.table
        kind = msg[0]
        if kind == "c":
            unconfirmed = self._unconfirmed
            for device, items in msg[1]:
                if device in self.remote_devices:
                    table.apply(device, items)
                    if unconfirmed:
                        unconfirmed.discard(device)
            if msg[2] and self._pulled is not None and not self._pulled.done():
                self._pulled.set_result(None)
        elif kind == "h":
            by_key = self._health_by_key
            for key, values in msg[1].items():
                h = by_key.get(key)
                if h is not None:
                    base = self._counter_base.get(key, {})
                    for name, value in zip(HEALTH_FIELDS, values):
                        setattr(h, name, value + base[name] if name in base else value)
        elif kind == "r":
            _, call_id, ok, value = msg
            fut = self._calls.pop(call_id, None)
            if fut is not None and not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
        elif kind == "s":
            self.coalesced = self._coalesced_before + msg[1]["coalesced"]
        elif kind == "ready":
            self._coalesced_before = self.coalesced  # a restarted worker counts from 0
            if self._failed_starts:
                log.warning("driver worker process running again (after %d failed starts)", self._failed_starts)
            self._failed_starts, self._last_loss = 0, ""
            self.ready.set()
        elif kind == "fail":
            self._loss_reason = msg[1]

    async def call(self, method: str, *args: Any, starting: bool = False) -> Any:
        """One call in the worker (read_now, write_command, add, remove); its exception is raised here.
        `starting`: also to a worker that has not started its drivers yet (it reads the call after them)."""
        if self._writer is None or not (self.ready.is_set() or starting) \
                or self._proc is None or self._proc.returncode is not None:
            raise DeviceUnreachable("driver worker process not running")
        self._next_call += 1
        call_id = self._next_call
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        deadline = time.monotonic() + CALL_TIMEOUT_S
        self._writer.write(_frame(("call", call_id, method, args, deadline)))
        try:
            return await asyncio.wait_for(fut, CALL_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise DeviceUnreachable(f"driver worker did not answer {method} within {CALL_TIMEOUT_S:.0f} s") from None
        finally:
            self._calls.pop(call_id, None)

    # ---- DriverSet -----------------------------------------------------------------------------------
    def connection(self, device: str):
        if device in self.remote_devices:
            return _RemoteConnection(self, device)
        return super().connection(device)

    def driver_of(self, device: str):
        return self if device in self.remote_devices else super().driver_of(device)

    def health(self):
        return [*self.mirror.health(), *super().health()]

    @staticmethod
    def _split(site, devices: list[str]) -> tuple[list[str], list[str]]:
        """(the devices the worker serves, the others), by their driver's factory (drivers.base)."""
        ours = [d for path, names in devices_by_factory(site, devices).items() if path in WORKER_FACTORIES for d in names]
        return ours, [d for d in devices if d not in ours]

    def check_add(self, site, devices: list[str]) -> list[str]:
        ours, rest = self._split(site, devices)
        return self.mirror.check_add(site, ours) + (super().check_add(site, rest) if rest else [])

    def add_devices(self, site, devices: list[str]) -> None:
        ours, rest = self._split(site, devices)
        if ours:
            self.site = site
            self.mirror.add_devices(site, ours)  # defines their points here; dormant: no connection
            self.remote_devices.update(ours)
            self._health_by_key = {h.key: h for h in self.mirror.health()}
            self._layout_changed = True
            if self._writer is not None:  # the worker polls them from its next message on
                task = asyncio.get_running_loop().create_task(self._add_in_worker(site, ours))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        if rest:
            super().add_devices(site, rest)

    async def _add_in_worker(self, site, devices: list[str]) -> None:
        try:
            await self.call("add", site, devices, starting=True)
        except DeviceError as exc:  # a worker started after this has them in its init
            if self.ready.is_set():
                log.error("driver worker: adding %d devices failed: %s", len(devices), exc)

    async def remove_devices(self, devices: list[str]) -> None:
        ours = [d for d in devices if d in self.remote_devices]
        rest = [d for d in devices if d not in self.remote_devices]
        if ours:
            try:
                await self.call("remove", ours, starting=True)  # no request reaches them after this
            except DeviceError as exc:
                log.warning("driver worker: removing %d devices: %s", len(ours), exc)
            self.remote_devices.difference_update(ours)  # a worker started after this never polls them
            self._layout_changed = True
            await self.mirror.remove_devices(ours)  # drops their points here
            self._health_by_key = {h.key: h for h in self.mirror.health()}
        if rest:
            await super().remove_devices(rest)


# ---- the worker's side ------------------------------------------------------------------------------
class _Forward(Sink):
    """The worker table's one sink: every batch, kept until the gateway pulls them (`take`).

    The gateway pulls once per PULL_S of its own loop (WorkerDriverSet._pull): a gateway whose loop
    is behind pulls later, and so takes what it can, not more. Changes wait in order; once the
    gateway has not pulled for HOLD_AFTER_S, or more than MAX_PENDING changes wait, they are held
    instead, the latest per point (`coalesced` counts those overwritten unsent): what waits is then
    bounded by the number of points, never a backlog that grows, and an overloaded gateway gets the
    newest values, as it would by polling less often with the drivers in its own loop. A gateway
    that keeps up gets every change."""

    name = "driver worker"
    kind = "lossless"

    def __init__(self) -> None:
        self.pending: list[tuple] = []
        self.pending_changes = 0
        self.held: dict[str, dict[str, tuple]] | None = None  # device -> point -> (value, quality, ts)
        self.transitions: list[tuple] = []  # held values a quality change overtook, in order (_hold)
        self.coalesced = 0
        self.last_take = time.monotonic()

    def changes(self, batch) -> None:
        items = [(c.point, c.value, int(c.quality), c.source_ts) for c in batch]
        if self.held is not None:
            self._hold(batch[0].device, items)
            return
        self.pending.append((batch[0].device, items))
        self.pending_changes += len(items)
        if self.pending_changes > MAX_PENDING or time.monotonic() - self.last_take > HOLD_AFTER_S:
            self.held = {}
            pending, self.pending, self.pending_changes = self.pending, [], 0
            for device, its in pending:
                self._hold(device, its)

    def _hold(self, device: str, items: list[tuple]) -> None:
        """Keep the latest per point; a held value whose quality the new one changes is kept in order
        (`transitions`), so that a device that went Uncertain and came back while held still shows
        the outage to the gateway's lossless sinks and alarms."""
        points = self.held.setdefault(device, {})
        transitions = self.transitions
        for point, value, q, ts in items:
            old = points.get(point)
            if old is not None:
                if old[1] != q and len(transitions) < MAX_TRANSITIONS:
                    transitions.append((device, [(point, *old)]))
                else:
                    self.coalesced += 1
            points[point] = (value, q, ts)

    def take(self) -> list[tuple]:
        """Everything waiting, in order: the quality changes overtaken while held, the held values (older
        than what is pending), what is pending."""
        out = self.transitions
        if self.held is not None:
            out += [(d, [(p, *v) for p, v in points.items()]) for d, points in self.held.items()]
        out += self.pending
        self.held, self.pending, self.pending_changes, self.transitions = None, [], 0, []
        self.last_take = time.monotonic()
        return out


def change_frames(out: list[tuple], limit: int = FRAME_CHANGES):
    """`out` ([(device, items), ...]) cut into lists of at most `limit` items in all, in order (a
    device's items split over two frames if need be)."""
    chunk: list[tuple] = []
    n = 0
    for device, items in out:
        start = 0
        while start < len(items):
            take = min(limit - n, len(items) - start)
            chunk.append((device, items[start:start + take] if (start or take < len(items)) else items))
            n += take
            start += take
            if n >= limit:
                yield chunk
                chunk, n = [], 0
    if chunk:
        yield chunk


class _Worker:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.forward = _Forward()
        self.table = PointTable()
        self.drivers: DriverSet | None = None
        self._sent_health: dict[str, tuple] = {}
        self._sent_coalesced = 0

    def send(self, msg: Any) -> None:
        self.writer.write(_frame(msg))

    def send_changes(self, pulled: bool) -> None:
        """What waits, in frames of at most FRAME_CHANGES changes (a hold over a very large site can
        exceed what one frame may carry), in order; `pulled` goes with the last."""
        frames = list(change_frames(self.forward.take()))
        if not frames and pulled:
            frames = [[]]
        for i, chunk in enumerate(frames):
            self.writer.write(_frame(("c", chunk, pulled and i == len(frames) - 1)))

    async def run(self) -> int:
        init = await _read_frame(self.reader)
        if init is None or init[0] != "init":
            return 1
        _, site, devices, level = init[:4]
        logging.basicConfig(level=level or logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s [driver worker]: %(message)s")
        from drivers.modbus.driver import ModbusDriver

        logging.disable(logging.WARNING)  # the gateway's mirror said it already (plain-TCP warnings)
        try:
            driver = ModbusDriver(site, self.table, only=frozenset(devices))
        except (OSError, ValueError, KeyError) as exc:  # e.g. a TLS file changed since the gateway read it
            logging.disable(logging.NOTSET)
            self.send(("fail", f"cannot build its drivers ({exc})"))  # the gateway's one line says it
            try:
                await self.writer.drain()
            except ConnectionError:
                pass
            return 1
        logging.disable(logging.NOTSET)
        self.drivers = driver
        self.table.attach(self.forward)
        await driver.start()
        self.send(("ready",))
        health = asyncio.create_task(self._health())
        calls: set[asyncio.Task] = set()
        try:
            while True:
                msg = await _read_frame(self.reader)
                if msg is None or msg[0] == "stop":
                    break
                if msg[0] == "pull":
                    self.send_changes(True)
                elif msg[0] == "call":
                    task = asyncio.create_task(self._call(*msg[1:5]))
                    calls.add(task)
                    task.add_done_callback(calls.discard)
        finally:
            health.cancel()
            for task in list(calls):
                task.cancel()
            await driver.stop()
            self.send_changes(False)
            try:
                await self.writer.drain()
            except ConnectionError:
                pass
        return 0

    async def _call(self, call_id: int, method: str, args: tuple, deadline: float | None = None) -> None:
        driver = self.drivers
        try:
            if deadline is not None and time.monotonic() > deadline:
                # the gateway has given up on it and told the caller so: it must not happen now
                raise DeviceUnreachable(f"driver worker: {method} read after its deadline, not carried out")
            if method == "read_now":
                value = await driver.connection(args[0]).read_now(args[0])
            elif method == "write_command":
                device, command, kwargs = args
                value = await driver.connection(device).write_command(device, command, **kwargs)
            elif method == "add":
                site, names = args
                driver.add_devices(site, names)
                value = None
            elif method == "remove":
                await driver.remove_devices(args[0])
                value = None
            else:
                raise DeviceError(f"driver worker: no method {method}")
            ok = True
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            ok, value = False, exc
            try:
                pickle.loads(pickle.dumps(exc))
            except Exception:  # noqa: BLE001 - an exception that does not travel goes back as its text
                value = DeviceError(f"{type(exc).__name__}: {exc}")
        if call_id:
            self.send_changes(False)  # changes first: an answer never overtakes the values it read
            self.send(("r", call_id, ok, value))
        elif not ok:
            log.error("driver worker: %s failed: %s", method, value)

    async def _health(self) -> None:
        while True:
            changed = {}
            for h in self.drivers.health():
                values = tuple(getattr(h, name) for name in HEALTH_FIELDS)
                if self._sent_health.get(h.key) != values:
                    self._sent_health[h.key] = values
                    changed[h.key] = values
            if changed and self.writer.transport.get_write_buffer_size() < 2**20:  # the gateway reads: else next time
                self.send(("h", changed))
            if self.forward.coalesced != self._sent_coalesced:
                self._sent_coalesced = self.forward.coalesced
                self.send(("s", {"coalesced": self._sent_coalesced}))
            await asyncio.sleep(HEALTH_S)


def _die_with_parent() -> None:
    """SIGKILL this worker if the gateway dies (Linux); the end of the socket's stream stops it otherwise."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def _main(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**18)
    code = await _Worker(reader, writer).run()
    writer.close()
    return code or 0


if __name__ == "__main__":
    # Ctrl-C and systemd's SIGTERM reach the whole process group: the gateway stops this worker itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    if len(sys.argv) > 2 and os.getppid() != int(sys.argv[2]):
        sys.exit(1)  # the gateway died before the death signal was set: nobody to work for
    sys.exit(asyncio.run(_main(int(sys.argv[1]))))
