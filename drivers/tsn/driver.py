"""TSN driver: devices that publish cyclic UADP telemetry and take commands over raw Ethernet.

The frames, their security and the schedule are in `tsnwire` (shared with the simulator's TSN
endpoint; docs/tsn.md). This module binds them to the driver contract (drivers/base.py):

* Receive: one AF_PACKET socket on `gateway.tsn.interface`, read on the asyncio loop
  (add_reader). A frame is taken from a device only with that device's VLAN and PublisherId;
  then its signature, key id, replay window and age are checked (tsnwire.security) and a refused
  frame is dropped and counted in the device's ConnectionHealth.dropped_frames (and its reason
  in last_error). Telemetry updates the point table; acknowledgements complete commands.
* Transmit: commands go to the transmit scheduler (tsnwire.schedule), a thread that opens the
  command gate (PCP of the command window) once per cycle.
* Quality: Good on a telemetry frame; UncertainLastUsableValue after three scan periods without
  one; BadCommunicationError after the stale time; Good again on the next frame.
* read_now sends ReadNow (the device publishes its telemetry at once) and returns the next
  telemetry frame; write_command waits for the device's acknowledgement.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from drivers.base import (ConnectionHealth, DeviceProtocolError, DeviceRefused, DeviceRejectedArgument,
                          DeviceUnreachable, DriverUnavailable)
from drivers.pointtable import PointTable, Quality
from siteconfig.model import DeviceEndpoint, Site
from siteconfig.points import COMMANDS, POINTS
from tsnwire import uadp
from tsnwire.keys import KeyFileError
from tsnwire.link import LinkUnavailable, interface_mac, open_link, receive
from tsnwire.schedule import COMMAND, GateControlList, TransmitScheduler
from tsnwire.security import Dropped, Publisher, Subscriber, load_key_file

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 1.0  # a command not acknowledged within this is reported unreachable
MISSED_PERIODS_UNCERTAIN = 3  # telemetry periods without a frame before values turn Uncertain
RESULT_ACCEPTED, RESULT_REFUSED, RESULT_INVALID_ARGUMENT = 1, 2, 3  # siteconfig.profiles.CommandResult


@dataclass
class TsnDevice:
    name: str
    kind: str
    endpoint: DeviceEndpoint
    mac: bytes
    period_s: float
    commands_out: Publisher  # the gateway's frames to this device, under its key
    frames_in: Subscriber  # its frames, checked under its key
    health: ConnectionHealth
    layout: uadp.DataSetLayout
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    telemetry_waiters: list[asyncio.Future] = field(default_factory=list)
    drops: Counter = field(default_factory=Counter)  # reason -> frames dropped
    last_frame: float = 0.0  # monotonic time of the last good telemetry frame
    last_return: float = 0.0  # the Return of the last accepted command (its CommandReturn)
    dataset_sequence: int = 0


class TsnDriver:
    """Every `driver: tsn` device of a site, on the interface of `gateway.tsn`."""

    def __init__(self, site: Site, table: PointTable, devices: list[str]):
        cfg = site.gateway.tsn
        if cfg is None:
            raise ValueError("driver tsn needs a gateway.tsn block in the site file")
        self.site, self.table, self.cfg = site, table, cfg
        self.gcl = GateControlList.from_config(cfg)
        self.command_pcp = self.gcl.pcp_of(COMMAND)
        self.devices: dict[str, TsnDevice] = {}
        self.by_publisher: dict[int, TsnDevice] = {}
        wanted = set(devices)
        for name, kind, ep in site.devices():
            if name not in wanted:
                continue
            try:
                key = load_key_file(ep.key_file)
            except KeyFileError as exc:
                raise ValueError(f"{name}: {exc}") from None
            health = ConnectionHealth(cfg.interface, ep.vlan or 0, devices=1, label=f"{cfg.interface} {name}",
                                      kind="TSN", tls=f"UADP {cfg.security}, key id {key.key_id}")
            dev = TsnDevice(name, kind, ep, uadp.mac_bytes(ep.mac),
                            site.gateway.scan_groups_s.get(ep.scan_group, 1.0),
                            Publisher(uadp.GATEWAY_PUBLISHER_ID, key, cfg.security),
                            Subscriber(key, cfg.security, int(cfg.max_frame_age_ms * 1e6)),
                            health, uadp.telemetry_layout(kind))
            self.devices[name] = dev
            self.by_publisher[ep.publisher_id] = dev
            table.define(name, [p.name for p in POINTS[kind]])
        self._request_ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._own_mac = b"\0" * 6
        self.scheduler: TransmitScheduler | None = None
        self._watch: asyncio.Task | None = None
        self.unknown_frames = 0  # frames from no device of ours (other VLAN or PublisherId)

    @classmethod
    def for_devices(cls, site: Site, table: PointTable, devices: list[str]) -> "TsnDriver":
        """The registry's factory (drivers.base)."""
        return cls(site, table, devices)

    # ---- life cycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            self._sock = open_link(self.cfg.interface)
        except LinkUnavailable as exc:
            raise DriverUnavailable(f"driver tsn: {exc}") from None
        self._own_mac = interface_mac(self.cfg.interface)
        self.scheduler = TransmitScheduler(self._sock.send, self.gcl, realtime_priority=self.cfg.realtime_priority or None)
        self.scheduler.start()
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._on_readable)
        for dev in self.devices.values():
            dev.health.connected = True  # the link is up; quality follows the frames
        self._watch = asyncio.create_task(self._watch_quality(), name="tsn quality")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for dev in self.devices.values():
            dev.health.connected = False
            for fut in [*dev.pending.values(), *dev.telemetry_waiters]:
                if not fut.done():
                    fut.set_exception(DeviceUnreachable(f"{dev.name}: driver stopped"))

    def connection(self, device: str) -> "TsnDriver":
        if device not in self.devices:
            raise KeyError(device)
        return self

    def health(self) -> list[ConnectionHealth]:
        return [d.health for d in self.devices.values()]

    # ---- receive ------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        sock = self._sock
        for _ in range(256):  # bounded: the loop has other work
            try:
                frame = receive(sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("tsn: receive failed: %s", exc)
                return
            if frame is not None:
                self.handle_frame(frame.payload, frame.src_mac, frame.vlan_id, frame.rx_unix_ns)

    def handle_frame(self, payload: bytes, src_mac: bytes, vlan_id: int | None, rx_unix_ns: int | None = None) -> None:
        """Check one received NetworkMessage and apply it (telemetry or acknowledgement)."""
        try:
            msg = uadp.decode_network_message(payload)
        except ValueError:
            self.unknown_frames += 1
            return
        dev = self.by_publisher.get(msg.publisher_id)
        if dev is None or vlan_id != dev.endpoint.vlan:
            self.unknown_frames += 1
            return
        if src_mac != dev.mac:
            self._drop(dev, "wrong_source", uadp.mac_text(src_mac))
            return
        try:
            plain = dev.frames_in.open(msg, rx_unix_ns)
            _seq, data = uadp.decode_dataset_message(plain)
            if msg.dataset_writer_id == uadp.TELEMETRY_WRITER_ID:
                values = dev.layout.unpack(data)
            elif msg.dataset_writer_id == uadp.ACK_WRITER_ID:
                values = uadp.ACK_LAYOUT.unpack(data)
            else:
                raise ValueError(f"DataSetWriterId {msg.dataset_writer_id}")
        except Dropped as exc:
            self._drop(dev, exc.reason, str(exc))
            return
        except ValueError as exc:
            dev.health.decode_errors += 1
            dev.health.last_error = f"undecodable frame: {exc}"
            return
        if msg.dataset_writer_id == uadp.TELEMETRY_WRITER_ID:
            self._telemetry(dev, values)
        else:
            self._acknowledgement(dev, values)

    def _drop(self, dev: TsnDevice, reason: str, detail: str) -> None:
        dev.drops[reason] += 1
        dev.health.dropped_frames += 1
        dev.health.last_error = f"frame dropped ({detail})"

    def _telemetry(self, dev: TsnDevice, values: dict) -> None:
        now = time.monotonic()
        if dev.last_frame:
            dev.health.poll_duration_ms = (now - dev.last_frame) * 1000.0  # the telemetry interval seen
        dev.last_frame = now
        dev.health.polls += 1
        self.table.update_device(dev.name, values, time.time())
        waiters, dev.telemetry_waiters = dev.telemetry_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(values)

    def _acknowledgement(self, dev: TsnDevice, ack: dict) -> None:
        fut = dev.pending.pop(ack["RequestId"], None)
        if fut is not None and not fut.done():
            fut.set_result(ack)

    async def _watch_quality(self) -> None:
        stale_s = self.site.gateway.stale_time_s
        while True:
            await asyncio.sleep(0.1)
            now, wall = time.monotonic(), time.time()
            for dev in self.devices.values():
                silent_s = now - dev.last_frame if dev.last_frame else None
                quality = self.table.device_quality(dev.name)
                if silent_s is None:
                    continue
                if silent_s > stale_s and quality is not Quality.BAD_COMM:
                    self.table.set_quality(dev.name, Quality.BAD_COMM, wall)
                    dev.health.last_error = f"no telemetry for {silent_s:.1f} s"
                elif silent_s > MISSED_PERIODS_UNCERTAIN * dev.period_s and quality is Quality.GOOD:
                    self.table.set_quality(dev.name, Quality.UNCERTAIN_LAST_USABLE, wall)
                    dev.health.overruns += 1

    # ---- transmit -----------------------------------------------------------------------------------
    def _send_command(self, dev: TsnDevice, command: str, args: dict) -> asyncio.Future:
        if self.scheduler is None:
            raise DeviceUnreachable(f"{dev.name}: driver tsn not started")
        request_id = next(self._request_ids) & 0xFFFFFFFF
        fields = uadp.command_fields(dev.kind, command, request_id, args)
        dev.dataset_sequence += 1
        payload = uadp.encode_dataset_message(dev.dataset_sequence, uadp.COMMAND_LAYOUT.pack(fields))
        frame = (uadp.ethernet_header(dev.mac, self._own_mac, dev.endpoint.vlan, self.command_pcp)
                 + dev.commands_out.seal(uadp.COMMAND_WRITER_ID, payload))
        fut = asyncio.get_running_loop().create_future()
        dev.pending[request_id] = fut
        if not self.scheduler.enqueue(COMMAND, frame):
            dev.pending.pop(request_id, None)
            raise DeviceUnreachable(f"{dev.name}: command queue full")
        return fut

    async def _await_ack(self, dev: TsnDevice, fut: asyncio.Future, command: str) -> dict:
        try:
            return await asyncio.wait_for(fut, ACK_TIMEOUT_S)
        except asyncio.TimeoutError:
            for rid, f in list(dev.pending.items()):
                if f is fut:
                    del dev.pending[rid]
            dev.health.errors += 1
            dev.health.last_error = f"{command}: no acknowledgement within {ACK_TIMEOUT_S:g} s"
            raise DeviceUnreachable(f"{dev.name}: {command} not acknowledged within {ACK_TIMEOUT_S:g} s") from None

    async def write_command(self, device: str, command: str, **args) -> None:
        """Send one command in the command window; raises a DeviceError subclass unless it is accepted."""
        dev = self.devices[device]
        if command not in COMMANDS[dev.kind]:
            raise DeviceProtocolError(f"{device}: a {dev.kind} has no command {command}")
        missing = [a for a in COMMANDS[dev.kind][command] if a not in args]
        if missing:
            raise DeviceRejectedArgument(f"{device}: {command} needs {', '.join(missing)}")
        ack = await self._await_ack(dev, self._send_command(dev, command, args), command)
        result = ack["Result"]
        if result == RESULT_ACCEPTED:
            dev.last_return = ack["Return"]
            return
        if result == RESULT_REFUSED:
            raise DeviceRefused(f"{device}: {command} refused by the device")
        if result == RESULT_INVALID_ARGUMENT:
            raise DeviceRejectedArgument(f"{device}: {command} argument out of range")
        raise DeviceProtocolError(f"{device}: {command} answered with result {result}")

    async def read_now(self, device: str) -> dict:
        """Ask the device to publish now (ReadNow) and return that telemetry (with CommandReturn)."""
        dev = self.devices[device]
        waiter = asyncio.get_running_loop().create_future()
        dev.telemetry_waiters.append(waiter)
        await self._await_ack(dev, self._send_command(dev, "ReadNow", {}), "ReadNow")
        try:
            values = await asyncio.wait_for(waiter, ACK_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise DeviceUnreachable(f"{device}: no telemetry within {ACK_TIMEOUT_S:g} s of ReadNow") from None
        return {**values, "CommandReturn": dev.last_return}
