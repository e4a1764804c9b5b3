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
value, quality, ts), ...]), ...], pulled) changes, ("h", {key: fields}) health, ("r", id, ok, value) a
call's answer, ("ready",). Gateway to worker: ("init", site, devices, log_level), ("pull",) (the
answer: ("c", changes, True)), ("call", id, method, args), ("stop",). The worker sends its waiting
changes before every answer, so a read_now's values are in the gateway's table when its call returns.

If the worker dies, its devices turn Uncertain (last usable value), one line is logged, calls in
flight fail as DeviceUnreachable, and it is started again (backoff 1 s doubling to 10 s).
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

from drivers.base import DeviceError, DeviceUnreachable, DriverSet, factory_path
from drivers.pointtable import PointTable, Quality, Sink

log = logging.getLogger(__name__)

# the factories whose drivers run in the worker (Modbus over TCP and TLS). TSN stays in the gateway:
# its frames are scheduled against the cycle, and a hop through a socket would add to the command latency.
WORKER_FACTORIES = frozenset({"drivers.modbus.driver:ModbusDriver.for_devices"})

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 2**20  # a frame longer than this is not from our worker: the stream is dropped
PULL_S = 0.02  # the gateway pulls the worker's changes every 20 ms of its loop (as the address space flushes)
HOLD_AFTER_S = 0.25  # not pulled for this long, or
MAX_PENDING = 200_000  # more changes than this waiting: the worker keeps the latest per point (_Forward)
HEALTH_S = 0.25  # and the connections' health every 250 ms (only the entries that changed)
CALL_TIMEOUT_S = 30.0  # a call the worker does not answer (its own requests time out well before)
RESTART_MIN_S, RESTART_MAX_S = 1.0, 10.0
# ConnectionHealth fields that change while running (the rest are fixed by the site)
HEALTH_FIELDS = ("connected", "last_error", "poll_duration_ms", "polls", "overruns", "reconnects", "devices",
                 "errors", "tls", "decode_errors", "dropped_frames")
_QUALITIES = tuple(Quality)


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
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._pull_task: asyncio.Task | None = None
        self._pulled: asyncio.Future | None = None
        self._supervisor: asyncio.Task | None = None
        self._calls: dict[int, asyncio.Future] = {}
        self._next_call = 0
        self._stopping = False
        self.ready = asyncio.Event()  # the current worker has started its drivers
        self.restarts = 0
        self.frames_in = 0
        self.changes_in = 0
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
                sys.executable, "-m", "drivers.worker", str(theirs.fileno()), pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, stdout=2, env=env)  # its stdout is the gateway's stderr
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=ours, limit=2**18)
        self.ready.clear()
        self._writer.write(_frame(("init", self.site, sorted(self.remote_devices), logging.getLogger().level)))
        self._reader_task = asyncio.create_task(self._read(reader), name="driver worker reader")
        self._pull_task = asyncio.create_task(self._pull(self._writer), name="driver worker pull")

    async def _pull(self, writer: asyncio.StreamWriter) -> None:
        """Ask the worker for its changes every PULL_S of this loop, one request at a time: a loop
        that is behind asks later, and the worker keeps the latest per point meanwhile (_Forward)."""
        loop = asyncio.get_running_loop()
        while not writer.is_closing():
            self._pulled = loop.create_future()
            writer.write(_frame(("pull",)))
            try:
                await asyncio.wait_for(self._pulled, CALL_TIMEOUT_S)
            except asyncio.TimeoutError:
                continue  # a worker that does not answer is found by its stream's end
            await asyncio.sleep(PULL_S)

    async def _supervise(self) -> None:
        backoff = RESTART_MIN_S
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._spawn()
                await self._reader_task  # until the worker's stream ends
            except OSError as exc:
                log.error("driver worker process cannot start: %s", exc)
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
        """The worker ended on its own: its devices keep their last values as Uncertain, its calls fail."""
        log.error("driver worker process ended (exit %s): %d devices Uncertain until it is running again",
                  code, len(self.remote_devices))
        now, defined = time.time(), set(self.table.devices())
        for device in self.remote_devices & defined:
            self.table.set_quality(device, Quality.UNCERTAIN_LAST_USABLE, now)
        for h in self.mirror.health():
            h.connected = False
            h.last_error = "driver worker process ended"
        self._fail_calls("driver worker process ended")

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
        table = self.table
        while True:
            try:
                msg = await _read_frame(reader)
            except (ConnectionError, ValueError, pickle.UnpicklingError) as exc:
                log.error("driver worker stream broken: %s", exc)
                msg = None
            if msg is None:
                return
            self.frames_in += 1
            kind = msg[0]
            if kind == "c":
                for device, items in msg[1]:
                    if device in self.remote_devices:
                        self.changes_in += table.apply(device, items)
                if msg[2] and self._pulled is not None and not self._pulled.done():
                    self._pulled.set_result(None)
            elif kind == "h":
                by_key = self._health_by_key
                for key, values in msg[1].items():
                    h = by_key.get(key)
                    if h is not None:
                        for name, value in zip(HEALTH_FIELDS, values):
                            setattr(h, name, value)
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
                self.ready.set()

    async def call(self, method: str, *args: Any) -> Any:
        """One call in the worker (read_now, write_command, add, remove); its exception is raised here."""
        if self._writer is None or not self.ready.is_set():
            raise DeviceUnreachable("driver worker process not running")
        self._next_call += 1
        call_id = self._next_call
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self._writer.write(_frame(("call", call_id, method, args)))
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

    def check_add(self, site, devices: list[str]) -> list[str]:
        ours = [d for d in devices if factory_path(_endpoint(site, d).driver) in WORKER_FACTORIES]
        rest = [d for d in devices if d not in ours]
        return self.mirror.check_add(site, ours) + (super().check_add(site, rest) if rest else [])

    def add_devices(self, site, devices: list[str]) -> None:
        ours = [d for d in devices if factory_path(_endpoint(site, d).driver) in WORKER_FACTORIES]
        rest = [d for d in devices if d not in ours]
        if ours:
            self.site = site
            self.mirror.add_devices(site, ours)  # defines their points here; dormant: no connection
            self.remote_devices.update(ours)
            self._health_by_key = {h.key: h for h in self.mirror.health()}
            if self._writer is not None:  # the worker polls them from its next message on
                self._writer.write(_frame(("call", 0, "add", (site, ours))))
        if rest:
            super().add_devices(site, rest)

    async def remove_devices(self, devices: list[str]) -> None:
        ours = [d for d in devices if d in self.remote_devices]
        rest = [d for d in devices if d not in self.remote_devices]
        if ours:
            try:
                await self.call("remove", ours)  # no request reaches them after this
            except DeviceError as exc:
                log.warning("driver worker: removing %d devices: %s", len(ours), exc)
            self.remote_devices.difference_update(ours)
            await self.mirror.remove_devices(ours)  # drops their points here
            self._health_by_key = {h.key: h for h in self.mirror.health()}
        if rest:
            await super().remove_devices(rest)


def _endpoint(site, device: str):
    return next(ep for name, _kind, ep in site.devices() if name == device)


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
        points = self.held.setdefault(device, {})
        before = len(points)
        for point, value, q, ts in items:
            points[point] = (value, q, ts)
        self.coalesced += len(items) - (len(points) - before)

    def take(self) -> list[tuple]:
        """Everything waiting, in order (held values first: they are older than what is pending)."""
        out = [] if self.held is None else [(d, [(p, *v) for p, v in points.items()]) for d, points in self.held.items()]
        out += self.pending
        self.held, self.pending, self.pending_changes = None, [], 0
        self.last_take = time.monotonic()
        return out


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
        out = self.forward.take()
        if out or pulled:
            self.writer.write(_frame(("c", out, pulled)))

    async def run(self) -> None:
        init = await _read_frame(self.reader)
        if init is None or init[0] != "init":
            return
        _, site, devices, level = init
        logging.basicConfig(level=level or logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s [driver worker]: %(message)s")
        from drivers.modbus.driver import ModbusDriver

        logging.disable(logging.WARNING)  # the gateway's mirror said it already (plain-TCP warnings)
        try:
            driver = ModbusDriver(site, self.table, only=frozenset(devices))
        except (OSError, ValueError, KeyError) as exc:  # e.g. a TLS file changed since the gateway read it
            logging.disable(logging.NOTSET)
            log.error("cannot build the drivers: %s", exc)
            return
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
                    task = asyncio.create_task(self._call(*msg[1:]))
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

    async def _call(self, call_id: int, method: str, args: tuple) -> None:
        driver = self.drivers
        try:
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
                pickle.dumps(exc)
            except Exception:  # noqa: BLE001 - an exception that does not pickle goes back as its text
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
            if changed:
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


async def _main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**18)
    await _Worker(reader, writer).run()
    writer.close()


if __name__ == "__main__":
    # Ctrl-C and systemd's SIGTERM reach the whole process group: the gateway stops this worker itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    asyncio.run(_main(int(sys.argv[1])))
