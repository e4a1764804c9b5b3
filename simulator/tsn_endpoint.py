"""Plant-backed TSN endpoint: the site's `driver: tsn` devices on one Ethernet interface.

Each device publishes its telemetry DataSet (the same points as its Modbus profile, read from
the plant at the time of sending) every scan period of its scan group, in the telemetry window
of the gate control list; it executes the gateway's commands on the plant and acknowledges them
in the command window. Frames use `tsnwire` (the codec, security and schedule the gateway's
driver uses; the simulator imports nothing of the gateway or its drivers).

Telemetry goes to TELEMETRY_GROUP_MAC (a locally administered group address: the gateway's
AF_PACKET socket sees it); acknowledgements go back to the command's source address. Frames
refused by the security are dropped and counted per device (`drops`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from siteconfig.model import DeviceEndpoint, TsnConfig
from simulator.plant import InterlockRefused
from tsnwire import uadp
from tsnwire.keys import load_key_file
from tsnwire.link import LinkUnavailable, open_link, receive
from tsnwire.schedule import COMMAND, TELEMETRY, GateControlList, TransmitScheduler
from tsnwire.security import Dropped, Publisher, Subscriber

log = logging.getLogger(__name__)

TELEMETRY_GROUP_MAC = bytes.fromhex("030000b62c01")  # locally administered multicast (IEEE 802 bit 0|1 set)
RESULT_ACCEPTED, RESULT_REFUSED, RESULT_INVALID_ARGUMENT = 1, 2, 3  # siteconfig.profiles.CommandResult


@dataclass
class TsnSimDevice:
    name: str
    kind: str
    endpoint: DeviceEndpoint
    mac: bytes
    period_s: float
    telemetry_out: Publisher
    commands_in: Subscriber
    layout: uadp.DataSetLayout
    drops: Counter = field(default_factory=Counter)
    commands: int = 0
    dataset_sequence: int = 0
    online: bool = True


class TsnEndpoint:
    """Serves TSN devices of a SimulatorHost on `interface` (the device end of the link)."""

    def __init__(self, host, devices: list[tuple[str, str, DeviceEndpoint]], cfg: TsnConfig, interface: str):
        self.host, self.cfg, self.interface = host, cfg, interface
        self.gcl = GateControlList.from_config(cfg)
        self.devices: dict[bytes, TsnSimDevice] = {}
        scan = host.site.gateway.scan_groups_s
        max_age_ns = int(cfg.max_frame_age_ms * 1e6)
        for name, kind, ep in devices:
            key = load_key_file(ep.key_file)
            dev = TsnSimDevice(name, kind, ep, uadp.mac_bytes(ep.mac), scan.get(ep.scan_group, 1.0),
                               Publisher(ep.publisher_id, key, cfg.security),
                               Subscriber(key, cfg.security, max_age_ns), uadp.telemetry_layout(kind))
            self.devices[dev.mac] = dev
        self.by_name = {d.name: d for d in self.devices.values()}
        self.scheduler: TransmitScheduler | None = None
        self._sock = None
        self._tasks: list[asyncio.Task] = []
        self.unknown_frames = 0

    @property
    def running(self) -> bool:
        return self._sock is not None

    async def start(self) -> None:
        """Open the interface and start publishing; raises LinkUnavailable (interface, privilege)."""
        self._sock = open_link(self.interface)
        self.scheduler = TransmitScheduler(self._sock.send, self.gcl,
                                           realtime_priority=self.cfg.realtime_priority or None)
        self.scheduler.start()
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._on_readable)
        n = len(self.devices)
        for k, dev in enumerate(self.devices.values()):
            self._tasks.append(asyncio.create_task(self._publish(dev, dev.period_s * k / max(n, 1)),
                                                   name=f"tsn publish {dev.name}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ---- telemetry ------------------------------------------------------------------------------------
    async def _publish(self, dev: TsnSimDevice, phase_s: float) -> None:
        await asyncio.sleep(phase_s)
        next_due = time.monotonic()
        while True:
            if dev.online:
                self.publish_telemetry(dev)
            next_due += dev.period_s
            await asyncio.sleep(max(0.0, next_due - time.monotonic()))

    def publish_telemetry(self, dev: TsnSimDevice) -> None:
        """Queue one telemetry frame of `dev` with the plant's values now."""
        self.host.sync()
        values = self.host.plant.read_device(dev.name)
        dev.dataset_sequence += 1
        payload = uadp.encode_dataset_message(dev.dataset_sequence, dev.layout.pack(values))
        frame = (uadp.ethernet_header(TELEMETRY_GROUP_MAC, dev.mac, dev.endpoint.vlan, self.gcl.pcp_of(TELEMETRY))
                 + dev.telemetry_out.seal(uadp.TELEMETRY_WRITER_ID, payload))
        self.scheduler.enqueue(TELEMETRY, frame)

    # ---- commands -------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        for _ in range(256):
            try:
                frame = receive(self._sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("tsn endpoint: receive failed: %s", exc)
                return
            if frame is not None:
                self.handle_frame(frame.payload, frame.src_mac, frame.dst_mac, frame.vlan_id, frame.rx_unix_ns)

    def handle_frame(self, payload: bytes, src_mac: bytes, dst_mac: bytes, vlan_id: int | None,
                     rx_unix_ns: int | None = None) -> None:
        """Check and execute one frame addressed to one of our devices."""
        dev = self.devices.get(dst_mac)
        if dev is None or vlan_id != dev.endpoint.vlan:
            self.unknown_frames += 1
            return
        try:
            msg = uadp.decode_network_message(payload)
        except ValueError:
            dev.drops["undecodable"] += 1
            return
        if msg.publisher_id != uadp.GATEWAY_PUBLISHER_ID or msg.dataset_writer_id != uadp.COMMAND_WRITER_ID:
            dev.drops["not_a_command"] += 1
            return
        try:
            _seq, data = uadp.decode_dataset_message(dev.commands_in.open(msg, rx_unix_ns))
            fields = uadp.COMMAND_LAYOUT.unpack(data)
        except Dropped as exc:
            dev.drops[exc.reason] += 1
            log.info("%s: frame dropped: %s", dev.name, exc)
            return
        except ValueError:
            dev.drops["undecodable"] += 1
            return
        if not dev.online:
            return
        result, returned = self._execute(dev, fields)
        self._acknowledge(dev, src_mac, fields, result, returned)
        if fields["CommandCode"] == uadp.COMMAND_CODES["ReadNow"] or result == RESULT_ACCEPTED:
            self.publish_telemetry(dev)  # the new state at once, not a period later

    def _execute(self, dev: TsnSimDevice, fields: dict) -> tuple[int, float]:
        try:
            command, args = uadp.command_args(dev.kind, fields)
        except KeyError:
            return RESULT_INVALID_ARGUMENT, 0.0
        if command == "ReadNow":
            return RESULT_ACCEPTED, 0.0
        self.host.sync()  # the command lands at the plant time of its arrival
        try:
            result = self.host.plant.command(dev.name, command, **args) or {}
        except InterlockRefused as exc:
            log.info("%s: %s%s refused: %s", dev.name, command, args, exc)
            return RESULT_REFUSED, 0.0
        except ValueError as exc:
            log.info("%s: %s%s rejected: %s", dev.name, command, args, exc)
            return RESULT_INVALID_ARGUMENT, 0.0
        dev.commands += 1
        log.info("%s: %s%s accepted %s (TSN)", dev.name, command, args, result)
        returned = next((float(v) for v in result.values() if isinstance(v, (int, float))), 0.0)
        return RESULT_ACCEPTED, returned

    def _acknowledge(self, dev: TsnSimDevice, gateway_mac: bytes, fields: dict, result: int, returned: float) -> None:
        ack = {"RequestId": fields["RequestId"], "CommandCode": fields["CommandCode"], "Result": result,
               "Return": returned}
        dev.dataset_sequence += 1
        payload = uadp.encode_dataset_message(dev.dataset_sequence, uadp.ACK_LAYOUT.pack(ack))
        frame = (uadp.ethernet_header(gateway_mac, dev.mac, dev.endpoint.vlan, self.gcl.pcp_of(COMMAND))
                 + dev.telemetry_out.seal(uadp.ACK_WRITER_ID, payload))
        self.scheduler.enqueue(COMMAND, frame)

    def describe(self) -> str:
        return f"{len(self.devices)} TSN devices on {self.interface}"


__all__ = ["LinkUnavailable", "TELEMETRY_GROUP_MAC", "TsnEndpoint"]
