"""The driver worker's two ends without processes: the worker's hold under back-pressure keeps
quality changes, the gateway's table applies what the worker's table changed, and a call read
after its deadline is not carried out."""

from __future__ import annotations

import asyncio
import pickle
import time

from drivers.base import DeviceUnreachable
from drivers.pointtable import Change, PointTable, Quality, Sink
from drivers.worker import _HEADER, HOLD_AFTER_S, _Forward, _Worker


def batch(device, point, value, q, ts):
    return [Change(device, point, value, q, ts)]


def test_kept_up_every_change_goes_in_order():
    f = _Forward()
    f.changes(batch("D", "V", 1.0, Quality.GOOD, 1.0))
    f.changes(batch("D", "V", 2.0, Quality.GOOD, 2.0))
    assert f.take() == [("D", [("V", 1.0, 0, 1.0)]), ("D", [("V", 2.0, 0, 2.0)])]
    assert f.coalesced == 0


def test_held_values_keep_the_latest_but_not_a_quality_change_they_overtake():
    f = _Forward()
    f.last_take = time.monotonic() - HOLD_AFTER_S - 1  # the gateway has not pulled: hold
    f.changes(batch("D", "V", 10.0, Quality.GOOD, 1.0))
    f.changes(batch("D", "V", 11.0, Quality.GOOD, 2.0))  # overwritten unsent: coalesced
    f.changes(batch("D", "V", 11.0, Quality.UNCERTAIN_LAST_USABLE, 3.0))
    f.changes(batch("D", "V", 12.0, Quality.GOOD, 4.0))
    out = f.take()
    assert f.coalesced == 1
    table = PointTable()
    table.define("D", ["V"])
    seen = []

    class Watch(Sink):
        def changes(self, b):
            seen.extend((c.value, c.quality) for c in b)

    table.attach(Watch())
    for device, items in out:
        table.apply(device, items)
    # the outage is seen, in order, and the last value wins
    assert (11.0, Quality.UNCERTAIN_LAST_USABLE) in seen
    assert seen.index((11.0, Quality.UNCERTAIN_LAST_USABLE)) < seen.index((12.0, Quality.GOOD))
    assert table.get("D", "V").value == 12.0 and table.get("D", "V").quality is Quality.GOOD


def test_apply_notifies_sinks_and_device_quality_as_update_device_does():
    table = PointTable()
    table.define("D", ["A", "B"])
    qualities = []

    class Watch(Sink):
        def device_quality(self, device, quality, ts):
            qualities.append(quality)

    table.attach(Watch())
    assert table.apply("D", [("A", 1.0, 0, 5.0), ("B", 2.0, 0, 5.0), ("nope", 3.0, 0, 5.0)]) == 2
    assert qualities == [Quality.GOOD]
    assert table.get("D", "A").source_ts == 5.0
    assert table.apply("gone", [("A", 1.0, 0, 5.0)]) == 0  # a device removed meanwhile


class _Writer:
    def __init__(self):
        self.frames = []

    def write(self, data: bytes) -> None:
        (n,) = _HEADER.unpack(data[:_HEADER.size])
        self.frames.append(pickle.loads(data[_HEADER.size:_HEADER.size + n]))


class _Conn:
    def __init__(self):
        self.written = []

    async def write_command(self, device, command, **args):
        self.written.append((device, command, args))


class _Drivers:
    def __init__(self):
        self.conn = _Conn()

    def connection(self, device):
        return self.conn


def test_a_call_read_after_its_deadline_is_not_carried_out():
    w = _Worker(None, _Writer())
    w.drivers = _Drivers()
    asyncio.run(w._call(7, "write_command", ("MATS-01-01", "SetPreferredSource", {"Source": 2}),
                        time.monotonic() - 0.1))
    assert w.drivers.conn.written == []
    (answer,) = [f for f in w.writer.frames if f[0] == "r"]
    assert answer[1] == 7 and answer[2] is False and isinstance(answer[3], DeviceUnreachable)
    # within its deadline it goes through
    asyncio.run(w._call(8, "write_command", ("MATS-01-01", "SetPreferredSource", {"Source": 2}),
                        time.monotonic() + 10))
    assert w.drivers.conn.written == [("MATS-01-01", "SetPreferredSource", {"Source": 2})]
