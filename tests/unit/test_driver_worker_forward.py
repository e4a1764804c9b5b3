"""The driver worker's two ends without processes: the worker's hold under back-pressure keeps
quality changes, the gateway's table applies what the worker's table changed, and a call read
after its deadline is not carried out."""

from __future__ import annotations

import asyncio
import pickle
import time

from drivers.base import DeviceUnreachable
from drivers.pointtable import Change, PointTable, Quality, Sink
from drivers.worker import _HEADER, FRAME_CHANGES, HOLD_AFTER_S, _Forward, _Worker, change_frames


def batch(device, point, value, q, ts):
    return [Change(device, point, value, q, ts)]


def watched_table(device: str, points: list[str]) -> tuple[PointTable, list[Change]]:
    """A table with these points and the list of every Change its sinks are given."""
    table = PointTable()
    table.define(device, points)
    seen: list[Change] = []

    class Watch(Sink):
        def changes(self, b):
            seen.extend(b)

    table.attach(Watch())
    return table, seen


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
    table, changes = watched_table("D", ["V"])
    for device, items in out:
        table.apply(device, items)
    seen = [(c.value, c.quality) for c in changes]
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


def test_a_value_that_came_back_while_held_is_no_change_at_the_gateway():
    """Held: A, B, A of one point goes as A; the gateway's table, which holds A, notifies nothing
    and keeps the SourceTimestamp of the last real change (no second history row)."""
    table, changes = watched_table("D", ["V"])
    assert table.apply("D", [("V", 10.0, 0, 1.0)]) == 1
    f = _Forward()
    f.last_take = time.monotonic() - HOLD_AFTER_S - 1
    f.changes(batch("D", "V", 11.0, Quality.GOOD, 2.0))
    f.changes(batch("D", "V", 10.0, Quality.GOOD, 3.0))
    for device, items in f.take():
        table.apply(device, items)
    assert [(c.value, c.source_ts) for c in changes] == [(10.0, 1.0)] and table.get("D", "V").source_ts == 1.0
    # the same value with another quality is a change
    assert table.apply("D", [("V", 10.0, int(Quality.UNCERTAIN_LAST_USABLE), 4.0)]) == 1
    assert (changes[-1].value, changes[-1].source_ts) == (10.0, 4.0)


def test_a_large_hold_goes_in_frames_of_bounded_size_in_order():
    """More changes than a frame carries (a hold over a very large site) go in several frames, each
    of at most FRAME_CHANGES changes, `pulled` on the last only; applied in order they give the same
    table as one frame would."""
    n_dev, per = 7, FRAME_CHANGES // 3 + 5  # 7 devices x ~1/3 of a frame each: splits inside devices
    w = _Worker(None, _Writer())
    w.forward.last_take = time.monotonic() - HOLD_AFTER_S - 1
    for d in range(n_dev):
        w.forward.changes([Change(f"D{d}", f"P{i}", float(i + d), Quality.GOOD, 1.0) for i in range(per)])
    w.send_changes(True)
    frames = w.writer.frames
    assert len(frames) == -(-n_dev * per // FRAME_CHANGES) > 1
    assert all(sum(len(items) for _, items in f[1]) <= FRAME_CHANGES for f in frames)
    assert [f[2] for f in frames] == [False] * (len(frames) - 1) + [True]
    table = PointTable()
    for d in range(n_dev):
        table.define(f"D{d}", [f"P{i}" for i in range(per)])
    applied = sum(table.apply(device, items) for f in frames for device, items in f[1])
    assert applied == n_dev * per
    assert all(table.get(f"D{d}", f"P{i}").value == float(i + d) for d in range(n_dev) for i in (0, per - 1))
    # nothing waiting and pulled: one empty frame that answers the pull
    w.writer.frames.clear()
    w.send_changes(True)
    assert w.writer.frames == [("c", [], True)]
    w.send_changes(False)
    assert len(w.writer.frames) == 1


def test_change_frames_keep_the_order_of_every_item():
    out = [("A", [(f"a{i}",) for i in range(5)]), ("B", [("b0",)]), ("C", [(f"c{i}",) for i in range(4)])]
    frames = list(change_frames(out, limit=3))
    assert [sum(len(i) for _, i in f) for f in frames] == [3, 3, 3, 1]
    flat = [(d, it) for f in frames for d, items in f for it in items]
    assert flat == [(d, it) for d, items in out for it in items]
