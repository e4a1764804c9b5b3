"""The SQLite historian: batched writes, raw reads in both directions, paging through asyncua's
HistoryManager, retention, reopening, a kill -9 in the middle of a batch, and the point-table feed."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from asyncua import ua
from asyncua.common.event_objects import BaseEvent
from asyncua.server.history import HistoryManager

from drivers.pointtable import PointTable, Quality
from gateway.historian import (Historian, HistorianStorage, PointTableFeed, datetime_to_us, encode_variant,
                               us_to_datetime)

NS = ["http://opcfoundation.org/UA/", "urn:cmcs-gateway:UA:PowerDistribution", "urn:test:site"]
BASE_US = datetime_to_us(datetime(2026, 1, 1, tzinfo=timezone.utc))
DOUBLE = int(ua.VariantType.Double)
REPO = Path(__file__).resolve().parents[2]
KEEP_ALL = 100 * 365 * 86400.0  # retention for tests whose timestamps are fixed dates


@pytest.fixture
async def hist(tmp_path):
    h = Historian(tmp_path / "history.sqlite3", retention_s=KEEP_ALL, flush_interval_s=0.05)
    yield h
    await h.close()


@pytest.fixture
def storage(hist):
    return HistorianStorage(hist, NS)


def nid(name: str) -> ua.NodeId:
    return ua.NodeId(name, 2)


def fill(hist: Historian, storage: HistorianStorage, name: str | ua.NodeId, count: int, step_us: int = 1000,
         start_us: int = BASE_US, per_ts: int = 1) -> int:
    """`count` Double values 0, 1, 2... `per_ts` of them per timestamp; returns the node's id."""
    node = hist.key_id(storage.key(name if isinstance(name, ua.NodeId) else nid(name)))
    hist.append_samples([(node, start_us + (i // per_ts) * step_us, 7, 0, DOUBLE, float(i)) for i in range(count)])
    return node


def manager(storage: HistorianStorage) -> HistoryManager:
    m = HistoryManager(None)  # the server is only needed for asyncua's own subscriptions
    m.set_storage(storage)
    return m


async def read_pages(storage, nodeid, start, end, per_page) -> list[list[ua.DataValue]]:
    """HistoryRead raw as a client does it: the same details, plus each continuation point."""
    details = ua.ReadRawModifiedDetails(IsReadModified=False, StartTime=start or ua.get_win_epoch(),
                                        EndTime=end or ua.get_win_epoch(), NumValuesPerNode=per_page)
    m, pages, cp = manager(storage), [], None
    while True:
        params = ua.HistoryReadParameters(HistoryReadDetails=details,
                                          NodesToRead=[ua.HistoryReadValueId(NodeId=nodeid, ContinuationPoint=cp)])
        result = (await m.read_history(params))[0]
        pages.append(result.HistoryData.DataValues)
        cp = result.ContinuationPoint
        if not cp:
            return pages
        assert len(pages) < 1000, "no progress"


def values(dvs) -> list:
    return [dv.Value.Value for dv in dvs]


# ---- values ---------------------------------------------------------------------------------------

async def test_batches_read_back_a_range(hist, storage):
    node = hist.key_id(storage.key(nid("U1.Voltage")))
    for batch in range(5):  # five batches, one flush each
        hist.append_samples([(node, BASE_US + (batch * 100 + i) * 1000, 250, 0, DOUBLE, 230.0 + batch * 100 + i)
                             for i in range(100)])
        await hist.flush()
    assert hist.stats["rows_written"] == 500
    dvs, cont = await storage.read_node_history(nid("U1.Voltage"), us_to_datetime(BASE_US + 120_000),
                                                us_to_datetime(BASE_US + 379_000), 0)
    assert cont is None
    assert values(dvs) == [230.0 + i for i in range(120, 380)]  # both ends inclusive
    assert dvs[0].SourceTimestamp == us_to_datetime(BASE_US + 120_000)
    assert dvs[0].ServerTimestamp == us_to_datetime(BASE_US + 120_250)
    assert all(dv.StatusCode.is_good() for dv in dvs)
    # a node without history, and one never heard of
    assert await storage.read_node_history(nid("Nothing"), us_to_datetime(BASE_US), us_to_datetime(BASE_US + 1), 0) \
        == ([], None)


async def test_reverse_order_when_end_is_before_start(hist, storage):
    fill(hist, storage, "P", 100)
    await hist.flush()
    dvs, cont = await storage.read_node_history(nid("P"), us_to_datetime(BASE_US + 89_000),
                                                us_to_datetime(BASE_US + 10_000), 0)
    assert values(dvs) == [float(i) for i in range(89, 9, -1)] and cont is None
    # EndTime only + NumValuesPerNode: the newest values before EndTime, newest first (Part 11 6.4.3.2)
    dvs, _ = await storage.read_node_history(nid("P"), None, us_to_datetime(BASE_US + 49_000), 3)
    assert values(dvs) == [49.0, 48.0, 47.0]
    # StartTime only: forward from it
    dvs, _ = await storage.read_node_history(nid("P"), us_to_datetime(BASE_US + 95_000), None, 0)
    assert values(dvs) == [95.0, 96.0, 97.0, 98.0, 99.0]


@pytest.mark.parametrize("direction", ["forward", "reverse", "backward from EndTime only"])
async def test_10000_values_in_10_pages_of_1000(hist, storage, direction):
    fill(hist, storage, "P", 10_000)
    fill(hist, storage, "Other", 3000)  # interleaved in the file, must not leak into P's pages
    await hist.flush()
    first, last = us_to_datetime(BASE_US), us_to_datetime(BASE_US + 9_999_000)
    start, end = {"forward": (first, last), "reverse": (last, first),
                  "backward from EndTime only": (None, last)}[direction]
    pages = await read_pages(storage, nid("P"), start, end, 1000)
    assert [len(p) for p in pages] == [1000] * 10
    got = [v for p in pages for v in values(p)]
    expected = [float(i) for i in range(10_000)]
    assert got == (expected if direction == "forward" else expected[::-1])  # no duplicates, no gaps
    stamps = [dv.SourceTimestamp for p in pages for dv in p]
    assert stamps == sorted(stamps, reverse=direction != "forward")


async def test_no_limit_pages_at_the_response_size(hist, tmp_path):
    small = HistorianStorage(hist, NS, max_history_data_response_size=300)
    fill(hist, small, "P", 1000)
    await hist.flush()
    pages = await read_pages(small, nid("P"), us_to_datetime(BASE_US), us_to_datetime(BASE_US + 10**9), 0)
    assert [len(p) for p in pages] == [300, 300, 300, 100]
    assert [v for p in pages for v in values(p)] == [float(i) for i in range(1000)]


async def test_a_page_never_splits_one_timestamp(hist, storage):
    fill(hist, storage, "Triples", 2500, per_ts=3)  # three values per timestamp
    fill(hist, storage, "Crowd", 7, per_ts=7)  # more values at one timestamp than a page holds
    fill(hist, storage, "Crowd", 2, start_us=BASE_US + 5000)
    await hist.flush()
    span = (us_to_datetime(BASE_US), us_to_datetime(BASE_US + 10**9))
    pages = await read_pages(storage, nid("Triples"), *span, 1000)
    assert [v for p in pages for v in values(p)] == [float(i) for i in range(2500)]
    assert all(len(p) <= 1000 for p in pages)
    pages = await read_pages(storage, nid("Crowd"), *span, 2)
    assert sorted(v for p in pages for v in values(p)) == [0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert len(pages[0]) == 7  # the whole group, rather than a continuation that cannot advance


async def test_types_and_statuses_round_trip(hist, storage):
    t = us_to_datetime(BASE_US)
    cases = {
        "Double": ua.DataValue(ua.Variant(231.5, ua.VariantType.Double)),
        "Float": ua.DataValue(ua.Variant(0.5, ua.VariantType.Float)),
        "Bool": ua.DataValue(ua.Variant(False, ua.VariantType.Boolean)),
        "Enum": ua.DataValue(ua.Variant(2, ua.VariantType.Int32)),
        "Count": ua.DataValue(ua.Variant(4_000_000_000, ua.VariantType.UInt32)),
        "Big": ua.DataValue(ua.Variant(2**64 - 1, ua.VariantType.UInt64)),
        "Text": ua.DataValue(ua.Variant("v1.2 ünïcode", ua.VariantType.String)),
        "Array": ua.DataValue(ua.Variant([1.0, 2.0], ua.VariantType.Double)),
        "Range": ua.DataValue(ua.Variant(ua.Range(0.0, 400.0), ua.VariantType.ExtensionObject)),
        "Stale": ua.DataValue(ua.Variant(230.0, ua.VariantType.Double),
                              StatusCode=ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)),
        "Lost": ua.DataValue(ua.Variant(230.0, ua.VariantType.Double),
                             StatusCode=ua.StatusCode(ua.StatusCodes.BadCommunicationError)),
    }
    for dv in cases.values():
        dv.SourceTimestamp = dv.ServerTimestamp = t
    storage.record_datavalues([(nid(name), dv) for name, dv in cases.items()])
    await hist.flush()
    for name, dv in cases.items():
        (back,), _ = await storage.read_node_history(nid(name), t, t, 0)
        assert back.StatusCode == dv.StatusCode, name
        if name == "Lost":
            assert back.Value == ua.Variant()  # Part 4 7.7.1: a Bad value is null
        else:
            assert back.Value == dv.Value, name
    assert encode_variant(ua.Variant(True, ua.VariantType.Boolean)) == (1, 1)


# ---- retention, restart, kill -9 ------------------------------------------------------------------

async def test_retention_deletes_old_rows_in_chunks(tmp_path):
    hist = Historian(tmp_path / "history.sqlite3", retention_s=3600, flush_interval_s=0.05, prune_chunk_rows=100)
    storage = HistorianStorage(hist, NS)
    now_us = int(time.time() * 1e6)
    old_start = now_us - 2 * 3600 * 10**6
    fill(hist, storage, "A", 700, start_us=old_start)  # 0.7 s of values two hours ago
    fill(hist, storage, "B", 300, start_us=old_start)
    fill(hist, storage, "A", 250, start_us=now_us - 60 * 10**6)  # recent
    old_event, new_event = BaseEvent(nid("A"), "old"), BaseEvent(nid("A"), "new")
    old_event.Time, new_event.Time = us_to_datetime(old_start), us_to_datetime(now_us)
    storage.record_event(old_event)
    storage.record_event(new_event)
    await hist.flush()
    pruned_before = hist.stats["rows_pruned"]
    await hist.prune()
    assert hist.stats["rows_pruned"] - pruned_before == 1001  # 1000 values + 1 event
    db = sqlite3.connect(tmp_path / "history.sqlite3")
    assert db.execute("SELECT count(*), min(ts) FROM sample").fetchone() == (250, now_us - 60 * 10**6)
    assert db.execute("SELECT count(*) FROM event").fetchone() == (1,)
    db.close()
    await hist.close()


async def test_reopen_after_close_keeps_data(tmp_path):
    path = tmp_path / "history.sqlite3"
    hist = Historian(path, retention_s=KEEP_ALL, flush_interval_s=3600)  # nothing flushes on its own: close() must
    fill(hist, HistorianStorage(hist, NS), "P", 500)
    await hist.close()
    await hist.close()  # idempotent
    hist.append_samples([(1, 0, 0, 0, DOUBLE, 1.0)])  # after close: dropped, not raised
    assert hist.stats["dropped"] == 1

    # the namespace index moved (another namespace registered first): keys use the URI
    moved = ["http://opcfoundation.org/UA/", "urn:other", "urn:cmcs-gateway:UA:PowerDistribution", "urn:test:site"]
    hist = Historian(path, retention_s=KEEP_ALL, flush_interval_s=0.05)
    storage = HistorianStorage(hist, moved)
    fill(hist, storage, ua.NodeId("P", 3), 10, start_us=BASE_US + 500_000)
    fill(hist, storage, ua.NodeId("New", 3), 1)
    await hist.flush()
    dvs, _ = await storage.read_node_history(ua.NodeId("P", 3), us_to_datetime(BASE_US),
                                             us_to_datetime(BASE_US + 10**9), 0)
    assert values(dvs) == [float(i) for i in range(500)] + [float(i) for i in range(10)]
    db = sqlite3.connect(path)
    assert db.execute("SELECT id, key FROM node ORDER BY id").fetchall() == [(1, "urn:test:site|s=P"),
                                                                           (2, "urn:test:site|s=New")]
    db.close()
    await hist.close()


# timestamps 0, 1, 2... µs (1970): a retention longer than that keeps them
KILLED_CHILD = textwrap.dedent("""
    import sys
    from gateway.historian import Historian
    hist = Historian(sys.argv[1], retention_s=3e9, flush_interval_s=3600, max_pending_rows=10**7)
    node = hist.key_id("urn:test:site|s=P")
    flushed, batch = int(sys.argv[2]), int(sys.argv[3])
    hist.append_samples([(node, i, 0, 0, 11, float(i)) for i in range(flushed)])
    hist.flush_sync()
    print("flushed", flush=True)
    hist.append_samples([(node, flushed + i, 0, 0, 11, float(i)) for i in range(batch)])
    print("writing", flush=True)
    hist.flush_sync(timeout=None)
    print("done", flush=True)
    sys.stdin.read()
""")


def test_kill_9_mid_batch_loses_only_the_unflushed_batch(tmp_path):
    path, flushed, batch = tmp_path / "history.sqlite3", 20_000, 1_500_000
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(path), str(flushed), str(batch)],
                             cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "flushed"
        wal = Path(f"{path}-wal")
        wal_at_flush = wal.stat().st_size
        assert child.stdout.readline().strip() == "writing"
        # kill once the big transaction spills into the WAL (mid-batch); the asserts hold whenever it lands
        deadline = time.monotonic() + 20
        while wal.stat().st_size <= wal_at_flush + 4 * 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    remainder = child.stdout.read()
    print(f"\nkill -9: {'after' if 'done' in remainder else 'during'} the batch commit, "
          f"WAL {wal.stat().st_size / 1e6:.1f} MB")
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    count, high = db.execute("SELECT count(*), max(ts) FROM sample").fetchone()
    assert count in (flushed, flushed + batch)  # every flushed row; the batch all or nothing
    assert high == count - 1
    db.close()
    hist = Historian(path, retention_s=KEEP_ALL, flush_interval_s=0.05)  # and the historian carries on with the file
    hist.append_samples([(hist.key_id("urn:test:site|s=P"), 10**12, 0, 0, DOUBLE, 1.0)])
    hist.flush_sync()
    samples, _ = hist.read_samples("urn:test:site|s=P", lower_us=count - 1)
    assert [s.ts_us for s in samples] == [count - 1, 10**12]
    hist.close_sync()


# ---- events ---------------------------------------------------------------------------------------

def _select(*names: str) -> ua.EventFilter:
    evfilter = ua.EventFilter()
    for name in names:
        op = ua.SimpleAttributeOperand(TypeDefinitionId=ua.NodeId(ua.ObjectIds.BaseEventType),
                                       BrowsePath=[ua.QualifiedName(name, 0)], AttributeId=ua.AttributeIds.Value)
        evfilter.SelectClauses.append(op)
    return evfilter


async def test_events_round_trip_through_the_history_manager(hist, storage):
    for i, (source, severity) in enumerate([("MATS-01-01", 700), ("PDB-01-A", 500), ("MATS-01-01", 300)]):
        ev = BaseEvent(nid(source), f"event {i}", severity)
        ev.Time = us_to_datetime(BASE_US + i * 1000)
        ev.EventId = bytes([i])
        await storage.save_event(ev)
    await hist.flush()
    details = ua.ReadEventDetails(StartTime=us_to_datetime(BASE_US), EndTime=us_to_datetime(BASE_US + 10**6),
                                  NumValuesPerNode=0, Filter=_select("Message", "Severity", "SourceNode", "Time"))
    m = manager(storage)

    async def read(nodeid):
        params = ua.HistoryReadParameters(HistoryReadDetails=details,
                                          NodesToRead=[ua.HistoryReadValueId(NodeId=nodeid)])
        return [[f.Value for f in e.EventFields] for e in (await m.read_history(params))[0].HistoryData.Events]

    got = await read(nid("MATS-01-01"))
    assert [(r[0].Text, r[1], r[2]) for r in got] == [("event 0", 700, nid("MATS-01-01")),
                                                      ("event 2", 300, nid("MATS-01-01"))]
    assert got[1][3] == us_to_datetime(BASE_US + 2000)
    everything = await read(ua.NodeId(ua.ObjectIds.Server))  # the Server object sees every event
    assert [r[0].Text for r in everything] == ["event 0", "event 1", "event 2"]


# ---- the point-table feed ---------------------------------------------------------------------------

def small_model():
    points = {("U1", "LoadPower"): nid("U1.LoadPower"), ("U1", "ActiveSource"): nid("U1.ActiveSource"),
              ("U1", "Position"): nid("U1.Position")}
    types = {nid("U1.LoadPower"): ua.VariantType.Double, nid("U1.ActiveSource"): ua.VariantType.Int32,
             nid("U1.Position"): ua.VariantType.Double}
    return SimpleNamespace(points=points, point_types=types, historized=[nid("U1.LoadPower"), nid("U1.ActiveSource")])


async def test_point_table_changes_of_historized_points_are_recorded(hist, storage):
    table = PointTable()
    table.define("U1", ["LoadPower", "ActiveSource", "Position"])
    table.update_device("U1", {"LoadPower": 4.0, "ActiveSource": 1, "Position": 3.0}, source_ts=1767225600.25)
    feed = PointTableFeed(hist, storage, small_model(), table)
    table.attach(feed)  # its birth: what the table held before the feed was attached
    table.update_device("U1", {"LoadPower": 5, "ActiveSource": 1, "Position": 4.0}, source_ts=1767225601.5)
    table.set_quality("U1", Quality.UNCERTAIN_LAST_USABLE, source_ts=1767225603.0)
    table.set_quality("U1", Quality.BAD_COMM, source_ts=1767225606.0)
    await hist.flush()
    span = (us_to_datetime(0), us_to_datetime(2 * 10**15))
    power, _ = await storage.read_node_history(nid("U1.LoadPower"), *span, 0)
    assert [(dv.Value.Value, dv.StatusCode.name) for dv in power] == [
        (4.0, "Good"), (5.0, "Good"), (5.0, "UncertainLastUsableValue"), (None, "BadCommunicationError")]
    assert power[1].Value.VariantType == ua.VariantType.Double  # an int from the device, stored as the node's type
    assert power[1].SourceTimestamp == datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=timezone.utc)
    source, _ = await storage.read_node_history(nid("U1.ActiveSource"), *span, 0)
    assert [dv.Value.Value for dv in source] == [1, 1, None]  # unchanged value: not a change, quality changes are
    assert (await storage.read_node_history(nid("U1.Position"), *span, 0))[0] == []  # not historized


async def test_the_feed_never_drops_when_the_disk_falls_behind(tmp_path):
    """A lossless sink: past its bound the feed keeps every row and says so (back-pressure)."""
    hist = Historian(tmp_path / "slow.db", retention_s=KEEP_ALL, flush_interval_s=3600)  # flushes only when asked
    storage = HistorianStorage(hist, NS)
    table = PointTable()
    table.define("U1", ["LoadPower", "ActiveSource", "Position"])
    feed = PointTableFeed(hist, storage, small_model(), table)
    feed.buffer.max_changes = 10
    table.attach(feed)
    for i in range(30):  # 30 rows queued before the writer's next flush
        table.update_device("U1", {"LoadPower": float(i)}, source_ts=1767225600.0 + i)
    stats = feed.stats()
    assert stats["queued"] == 30 and stats["overflowing"] and stats["dropped"] == 0
    await hist.flush()
    power, _ = await storage.read_node_history(nid("U1.LoadPower"), us_to_datetime(0), us_to_datetime(2 * 10**15), 0)
    assert [dv.Value.Value for dv in power] == [float(i) for i in range(30)]
    assert feed.stats()["queued"] == 0 and not feed.stats()["overflowing"]
    hist.close_sync()


# ---- figures (printed, not asserted: the machine is shared) ------------------------------------------

async def test_measure_insert_throughput_and_size(tmp_path):
    nodes, per_second, seconds = 12_000, 30_000, 34  # ~1M rows: the demo hall x 35 at 2.5 changes/s/point
    hist = Historian(tmp_path / "history.sqlite3", flush_interval_s=3600)
    keys = [hist.key_id(f"urn:test:site|s=U{i // 30}.P{i % 30}") for i in range(nodes)]
    rng = random.Random(1)
    t0_us = int(time.time() * 1e6)
    flush_ms = []
    for second in range(seconds):
        rows = []
        for j in range(per_second):
            rows.append((keys[(second * per_second + j) % nodes], t0_us + second * 10**6 + j * 33, 4000 + j % 997,
                         0, DOUBLE, round(rng.uniform(0, 400), 3)))
        hist.append_samples(rows)
        hist.flush_sync()
        flush_ms.append(hist.stats["last_flush_ms"])
    total = per_second * seconds
    db = sqlite3.connect(tmp_path / "history.sqlite3")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    size = (tmp_path / "history.sqlite3").stat().st_size
    hist.close_sync()

    # the loop-side cost: point-table changes through the feed into the queue
    table = PointTable()
    devices = [f"D{i}" for i in range(400)]
    for d in devices:
        table.define(d, [f"P{k}" for k in range(30)])
    model = SimpleNamespace(points={(d, f"P{k}"): ua.NodeId(f"{d}.P{k}", 2) for d in devices for k in range(30)},
                            point_types={}, historized=[])
    model.point_types = {n: ua.VariantType.Double for n in model.points.values()}
    model.historized = list(model.points.values())
    hist2 = Historian(tmp_path / "feed.db", flush_interval_s=3600)
    feed = PointTableFeed(hist2, HistorianStorage(hist2, NS), model, table)
    table.add_sink(feed)
    t = time.perf_counter()
    for rnd in range(3):
        for d in devices:
            table.update_device(d, {f"P{k}": rnd + k * 0.001 for k in range(30)})
    feed_us = (time.perf_counter() - t) / (3 * len(devices) * 30) * 1e6
    hist2.close_sync()

    flush_ms.sort()
    median = flush_ms[len(flush_ms) // 2]
    print(f"\nhistorian: {nodes} nodes, {per_second} values per 1 s flush, {seconds} flushes: "
          f"commit median {median:.0f} ms, max {flush_ms[-1]:.0f} ms -> {per_second / median * 1000:,.0f} values/s "
          f"capacity; {size / total * 1e6 / 1e6:.1f} MB per million rows ({size / total:.0f} B/row); "
          f"point table + feed {feed_us:.2f} µs per change")
    assert hist.stats["rows_written"] == total


async def test_a_data_dir_of_an_earlier_version_keeps_its_history(tmp_path):
    """Earlier versions named the file history.db: at start-up it becomes history.sqlite3 (the data
    dir's documented name) with its WAL, and every committed row is read back from the new name."""
    from gateway.historian import DB_FILE_NAME, OLD_DB_FILE_NAME, _move_old_file

    hist = Historian(tmp_path / OLD_DB_FILE_NAME, retention_s=KEEP_ALL, flush_interval_s=3600)
    fill(hist, HistorianStorage(hist, NS), "P", 300)
    await hist.close()
    _move_old_file(tmp_path)
    assert not (tmp_path / OLD_DB_FILE_NAME).exists() and (tmp_path / DB_FILE_NAME).exists()
    db = sqlite3.connect(tmp_path / DB_FILE_NAME)
    assert db.execute("SELECT count(*) FROM sample").fetchone() == (300,)
    db.close()
    # a data dir that has both (a downgrade and upgrade again) keeps the current file untouched
    (tmp_path / OLD_DB_FILE_NAME).write_bytes(b"old")
    _move_old_file(tmp_path)
    assert (tmp_path / OLD_DB_FILE_NAME).read_bytes() == b"old"
