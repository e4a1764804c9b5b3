"""The Modbus driver against a device that misbehaves: a real TCP server in place of the device
answers properly, then with garbage, wrong lengths, wrong transaction ids, non-Modbus bytes, or
not at all, then properly again. What operators rely on: the values go Uncertain then Bad, the
log says once that the device is unavailable (with the reason) and once that it is back, never a
traceback, decode errors are counted in the connection's health, and the values are Good again
within two poll periods of the device answering properly."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import pytest

from drivers.modbus.driver import ModbusDriver
from drivers.pointtable import PointTable, Quality
from siteconfig.demo import demo_site, free_port

pytestmark = pytest.mark.asyncio

POLL_PERIOD_S = 0.4
STALE_TIME_S = 1.0
REQUEST_TIMEOUT_S = 0.25
DEVICE = "SourceA"
DRIVER_LOGGER = "drivers.modbus.driver"


class MisbehavingDevice:
    """A Modbus TCP server that answers read requests with zeros, or in the way `mode` says."""

    def __init__(self) -> None:
        self.mode = "good"
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task] = set()

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)

    async def stop(self) -> None:
        self._server.close()
        for w in self._writers:
            w.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self._handlers.add(asyncio.current_task())
        try:
            while True:
                header = await reader.readexactly(7)
                length = int.from_bytes(header[4:6], "big")
                pdu = await reader.readexactly(length - 1)
                self.requests += 1
                answer = self.answer(header, pdu)
                if answer:
                    writer.write(answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def answer(self, header: bytes, pdu: bytes) -> bytes:
        tid, unit, fc = header[0:2], header[6:7], pdu[0]
        count = int.from_bytes(pdu[3:5], "big")
        data = bytes(2 * count) if fc in (3, 4) else bytes((count + 7) // 8)
        body = bytes([fc, len(data)]) + data

        def frame(tid_: bytes, body_: bytes, length: int | None = None, pid: bytes = b"\x00\x00") -> bytes:
            n = len(body_) + 1 if length is None else length
            return tid_ + pid + n.to_bytes(2, "big") + unit + body_

        mode = self.mode
        if mode == "good":
            return frame(tid, body)
        if mode == "garbage":  # a whole frame whose function code means nothing: pymodbus cannot decode it
            return frame(tid, bytes([0x55]) + b"\xde\xad\xbe\xef")
        if mode == "short":  # a well-framed answer with fewer registers than asked for
            return frame(tid, bytes([fc, len(data) - 2]) + data[:-2])
        if mode == "long":  # the header promises more bytes than ever come
            return frame(tid, body, length=len(body) + 21)
        if mode == "wrong_tid":
            return frame((int.from_bytes(tid, "big") + 7).to_bytes(2, "big"), body)
        if mode == "not_modbus":  # protocol id other than 0
            return frame(tid, body, pid=b"\x12\x34")
        if mode == "stall":
            return b""
        if mode == "refuse":  # a well-formed Modbus exception: illegal data address
            return frame(tid, bytes([fc | 0x80, 0x02]))
        raise ValueError(mode)


def one_device_site(port: int):
    site = demo_site()
    sources = tuple(dataclasses.replace(s, device=dataclasses.replace(s.device, host="127.0.0.1", port=port))
                    for s in site.sources)
    gateway = dataclasses.replace(site.gateway, scan_groups_s={**site.gateway.scan_groups_s, "normal": POLL_PERIOD_S},
                                  stale_time_s=STALE_TIME_S)
    return dataclasses.replace(site, sources=sources, gateway=gateway)


async def wait_quality(table: PointTable, wanted: Quality, timeout_s: float) -> list[Quality]:
    """The device qualities seen (in order, without repeats) until `wanted`; fails after timeout_s."""
    seen: list[Quality] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        q = table.device_quality(DEVICE)
        if not seen or seen[-1] is not q:
            seen.append(q)
        if q is wanted:
            return seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"{DEVICE} never became {wanted.name}: {[q.name for q in seen]}")


def state_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == DRIVER_LOGGER and ("is unavailable" in r.getMessage() or "is back online" in r.getMessage())]


# (mode, counted as a decode error, the connection made again, what the down line says). Garbage and
# silence break the connection; a well-formed refusal is the device's alone, over a working connection.
MISBEHAVIOURS = [
    ("garbage", True, True, "undecodable answer"),
    ("short", True, True, "wrong length"),
    ("long", True, True, "incomplete answer"),
    ("wrong_tid", True, True, "wrong transaction or unit id"),
    ("not_modbus", True, True, "not a Modbus TCP frame"),
    ("stall", False, True, f"no answer within {REQUEST_TIMEOUT_S:g} s"),
    ("refuse", False, False, "exception 0x02"),
]


async def test_a_misbehaving_device_goes_uncertain_then_bad_is_logged_once_and_recovers(caplog):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    device = MisbehavingDevice()
    await device.start(port)
    table = PointTable()
    driver = ModbusDriver.for_devices(one_device_site(port), table, [DEVICE])
    conn = driver.connection(DEVICE)
    conn.timeout_s = REQUEST_TIMEOUT_S
    await driver.start()
    try:
        await wait_quality(table, Quality.GOOD, 5.0)
        assert state_lines(caplog) == []  # coming up the first time is not news
        for mode, decode_error, reconnect, reason in MISBEHAVIOURS:
            caplog.clear()
            decode_errors, reconnects = conn.health.decode_errors, conn.health.reconnects
            device.mode = mode
            seen = await wait_quality(table, Quality.BAD_COMM, STALE_TIME_S + 3.0)
            assert seen[-2:] == [Quality.UNCERTAIN_LAST_USABLE, Quality.BAD_COMM], (mode, seen)
            assert (conn.health.decode_errors > decode_errors) is decode_error, mode
            assert (conn.health.reconnects > reconnects) is reconnect, mode
            device.mode = "good"
            answering = time.monotonic()
            await wait_quality(table, Quality.GOOD, 5.0)
            took = time.monotonic() - answering
            assert took <= 2 * POLL_PERIOD_S + REQUEST_TIMEOUT_S * (mode in ("stall", "long")), (mode, took)
            lines = state_lines(caplog)
            assert len(lines) == 2, (mode, lines)
            who = f"Modbus 127.0.0.1:{port} ({DEVICE})" if reconnect else f"{DEVICE} (Modbus 127.0.0.1:{port})"
            assert lines[0].startswith(f"{who} is unavailable: ") and reason in lines[0], (mode, lines)
            assert lines[1] == f"{who} is back online"
            assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
                (mode, [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR])
            assert "Traceback" not in caplog.text and "Fatal error" not in caplog.text
        assert device.requests > 0
    finally:
        await driver.stop()
        await device.stop()
