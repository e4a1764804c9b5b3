"""The historian: every change of a historized variable in one SQLite file, served to HistoryRead.

One `sample` table for all values (node, source time, server lag, status, type, value; indexed
on (node, ts)) and one `event` table. A dedicated writer thread commits what arrived during each
flush interval in one transaction (WAL, synchronous=NORMAL): a kill -9 loses at most the last
interval and never corrupts the file. Retention deletes old rows in small chunks between
flushes. Nodes are keyed "<namespace URI>|<identifier>" (e.g.
"urn:cmcs-gateway:site:demo-hall|s=SourceA.Voltage"), so history survives a restart even if
namespace indices move.

Wiring (gateway/app.py, once the OPC UA server has built its address space):

    self.historian = await attach(self.server, self.data_dir)  # Gateway.start, after server.start()
    await self.historian.close()                                # Gateway.stop, after server.stop() (idempotent)

Point-table changes come through a lossless sink, `historian.feed` (PointTableFeed), that the
gateway's wiring attaches to the point table (gateway/app.py `Gateway.sinks`): its birth records
the values the table already holds; its buffer is drained by the writer thread at each flush and
never drops (past `max_pending_rows` it reports back-pressure, in Diagnostics). The few
historized variables written without the point table (Cmcs.Mode, CMCS outputs) come through
address-space datachange callbacks.
Events: `await historian.storage.save_event(event)` with the asyncua Event that was triggered.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

from asyncua import ua
from asyncua.common.events import Event
from asyncua.common.utils import Buffer
from asyncua.server.history import HistoryStorageInterface
from asyncua.ua.ua_binary import Primitives, variant_from_binary, variant_to_binary

from drivers.pointtable import Birth, Change, LosslessBuffer, PointTable, Quality, Sink
from information_model.instantiate import SITE_NAMESPACE_PREFIX

log = logging.getLogger(__name__)

DEFAULT_RETENTION_S = 7 * 86400.0
DB_FILE_NAME = "history.sqlite3"
OLD_DB_FILE_NAME = "history.db"  # earlier versions: moved to DB_FILE_NAME at start-up (with its -wal and -shm)
SCHEMA_VERSION = "1"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_US = timedelta(microseconds=1)
_TS_MIN, _TS_MAX = -(2**63), 2**63 - 1
# A DateTime at or before this is "not specified" (Part 11 6.4.3: DateTime.MinValue, 1601-01-01).
_UNSPECIFIED_BEFORE = datetime(1601, 1, 2, tzinfo=timezone.utc)
_SERVER_OBJECT = ua.NodeId(ua.ObjectIds.Server)

# Same meaning as gateway.server.QUALITY_STATUS, as plain values (the historian needs nothing of the server).
QUALITY_STATUS_CODE = {
    Quality.GOOD: ua.StatusCodes.Good,
    Quality.UNCERTAIN_LAST_USABLE: ua.StatusCodes.UncertainLastUsableValue,
    Quality.BAD_COMM: ua.StatusCodes.BadCommunicationError,
    Quality.BAD_WAITING: ua.StatusCodes.BadWaitingForInitialData,
}

# Scalars stored as native SQLite values; anything else (arrays, structures, DateTime...) is
# stored as the Variant's OPC UA binary encoding under the pseudo type _VT_BINARY.
_NATIVE = frozenset(int(t) for t in (
    ua.VariantType.Boolean, ua.VariantType.SByte, ua.VariantType.Byte, ua.VariantType.Int16,
    ua.VariantType.UInt16, ua.VariantType.Int32, ua.VariantType.UInt32, ua.VariantType.Int64,
    ua.VariantType.UInt64, ua.VariantType.Float, ua.VariantType.Double, ua.VariantType.String,
    ua.VariantType.ByteString))
_VT_NULL = 0
_VT_BINARY = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS node (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE);
-- ts: SourceTimestamp, microseconds since 1970 UTC; server_lag: ServerTimestamp - ts, microseconds
CREATE TABLE IF NOT EXISTS sample (
    node INTEGER NOT NULL, ts INTEGER NOT NULL, server_lag INTEGER NOT NULL,
    status INTEGER NOT NULL, vtype INTEGER NOT NULL, value);
CREATE INDEX IF NOT EXISTS sample_node_ts ON sample (node, ts);
CREATE TABLE IF NOT EXISTS event (
    ts INTEGER NOT NULL, source INTEGER, emitter INTEGER, event_type INTEGER, severity INTEGER,
    fields BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS event_ts ON event (ts);
CREATE VIEW IF NOT EXISTS sample_readable AS
    SELECT node.key AS node, strftime('%Y-%m-%dT%H:%M:%fZ', ts / 1e6, 'unixepoch') AS source_time,
           server_lag / 1000.0 AS server_lag_ms, status, vtype, value
    FROM sample JOIN node ON node.id = sample.node;
"""


class Sample(NamedTuple):
    """One stored value, as `Historian.read_samples` returns it."""

    ts_us: int  # SourceTimestamp, µs since 1970 UTC
    server_ts_us: int
    status: int  # StatusCode value
    vtype: int  # ua.VariantType value, 0 = null, 256 = binary-encoded Variant
    value: Any


class StoredEvent(NamedTuple):
    ts_us: int
    fields: dict[str, ua.Variant]


# ---- conversions -----------------------------------------------------------------------------

def datetime_to_us(dt: datetime) -> int:
    """Microseconds since 1970 UTC; a naive datetime is taken as UTC (as asyncua does)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return (dt - _EPOCH) // _ONE_US


def us_to_datetime(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _unspecified(dt: datetime | None) -> bool:
    if dt is None:
        return True
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt < _UNSPECIFIED_BEFORE


def encode_variant(variant: ua.Variant | None) -> tuple[int, Any]:
    """(vtype, SQLite value) for a Variant: native for scalars, OPC UA binary otherwise."""
    if variant is None or variant.Value is None or variant.VariantType == ua.VariantType.Null:
        return _VT_NULL, None
    vt = int(variant.VariantType)
    value = variant.Value
    if vt in _NATIVE and not variant.is_array and not isinstance(value, (list, tuple)):
        if vt == ua.VariantType.Boolean:
            return vt, int(bool(value))
        if not (isinstance(value, int) and value > _TS_MAX):  # a UInt64 past SQLite's int64
            return vt, value
    return _VT_BINARY, variant_to_binary(variant)


def decode_variant(vtype: int, value: Any) -> ua.Variant:
    if vtype == _VT_NULL or value is None:
        return ua.Variant()
    if vtype == _VT_BINARY:
        return variant_from_binary(Buffer(value))
    vt = ua.VariantType(vtype)
    if vt == ua.VariantType.Boolean:
        value = bool(value)
    elif vt in (ua.VariantType.Double, ua.VariantType.Float):
        value = float(value)
    return ua.Variant(value, vt)


def _coerce(value, vtype: ua.VariantType):
    """The Python value a Variant of `vtype` holds (as gateway.server._coerce)."""
    if vtype in (ua.VariantType.Double, ua.VariantType.Float):
        return float(value)
    if vtype == ua.VariantType.Boolean:
        return int(bool(value))
    if vtype == ua.VariantType.String:
        return str(value)
    return int(value)


def _encode_fields(fields: dict[str, ua.Variant]) -> bytes:
    return b"".join(Primitives.String.pack(name) + variant_to_binary(v) for name, v in fields.items())


def _decode_fields(blob: bytes) -> dict[str, ua.Variant]:
    buf = Buffer(blob)
    fields = {}
    while len(buf) > 0:
        name = Primitives.String.unpack(buf)
        fields[name] = variant_from_binary(buf)
    return fields


# ---- the store ---------------------------------------------------------------------------------

class Historian:
    """SQLite history of values and events; batched writes in a dedicated thread.

    `append_samples`/`append_event` only queue (cheap, any thread); the writer commits the
    queue once per `flush_interval_s`. Reads use their own connection and see what is committed.
    """

    def __init__(self, path: Path, retention_s: float = DEFAULT_RETENTION_S, flush_interval_s: float = 1.0, *,
                 prune_interval_s: float = 60.0, prune_chunk_rows: int = 5000, max_pending_rows: int = 2_000_000):
        self.path = Path(path)
        self.retention_s = retention_s
        self.flush_interval_s = flush_interval_s
        self.prune_interval_s = prune_interval_s
        self.prune_chunk_rows = prune_chunk_rows
        self.max_pending_rows = max_pending_rows
        self.storage: HistorianStorage | None = None  # set by attach()
        self.feed: PointTableFeed | None = None  # set by attach()
        self.stats = {"rows_written": 0, "events_written": 0, "flushes": 0, "last_flush_ms": 0.0,
                      "max_flush_ms": 0.0, "rows_pruned": 0, "dropped": 0, "write_errors": 0}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect(self.path)
        with conn:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        self._ids: dict[str, int] = dict(conn.execute("SELECT key, id FROM node"))
        self._next_id = max(self._ids.values(), default=0) + 1
        self._lock = threading.Lock()
        self._samples: list[tuple] = []
        self._sources: list[Callable[[], list[tuple]]] = []  # lossless feeds, drained at each flush
        self._events: list[tuple] = []
        self._new_nodes: list[tuple[int, str]] = []
        self._flush_waiters: list[threading.Event] = []
        self._prune_waiters: list[threading.Event] = []
        self._kick = threading.Event()
        self._closing = False
        self._writer_done = False
        self._closed = False
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA query_only=ON")
        self._read_lock = threading.Lock()
        self._writer = threading.Thread(target=self._run, args=(conn,), name=f"historian {self.path.name}",
                                        daemon=True)
        self._writer.start()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a commit survives a process kill; only an OS crash/power loss can drop the last ones
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        # 64 MB: each flush appends to the (node, ts) index leaf of every active node (~4 KB each);
        # once those outgrow the cache every insert costs a page read (measured: ~35 % slower flushes)
        conn.execute("PRAGMA cache_size=-64000")
        conn.execute("PRAGMA journal_size_limit=67108864")
        return conn

    # ---- writing (any thread) --------------------------------------------------------------
    def key_id(self, key: str) -> int:
        """The integer id of a node key, registering it (committed with the next flush)."""
        node_id = self._ids.get(key)
        if node_id is not None:
            return node_id
        with self._lock:
            node_id = self._ids.get(key)
            if node_id is None:
                node_id = self._ids[key] = self._next_id
                self._next_id += 1
                self._new_nodes.append((node_id, key))
            return node_id

    def known_key(self, key: str) -> int | None:
        return self._ids.get(key)

    def add_source(self, take: Callable[[], list[tuple]]) -> None:
        """`take()` is called by the writer thread at each flush and returns rows to commit (a
        lossless feed's buffer); what it returns is written like `append_samples` rows."""
        self._sources.append(take)

    @property
    def closing(self) -> bool:
        return self._closing

    def append_samples(self, rows: list[tuple]) -> None:
        """Queue rows (node id, ts µs, server lag µs, status, vtype, value) for the next flush."""
        if not rows:
            return
        with self._lock:
            if self._closing:
                self.stats["dropped"] += len(rows)
                return
            self._samples.extend(rows)
            excess = len(self._samples) - self.max_pending_rows
            if excess > 0:  # the disk cannot keep up: drop the oldest, never grow without bound
                del self._samples[:excess]
                self.stats["dropped"] += excess

    def append_event(self, ts_us: int, fields: dict[str, ua.Variant], *, source: int | None = None,
                     emitter: int | None = None, event_type: int | None = None, severity: int | None = None) -> None:
        row = (ts_us, source, emitter, event_type, severity, _encode_fields(fields))
        with self._lock:
            if self._closing:
                self.stats["dropped"] += 1
                return
            self._events.append(row)

    def flush_sync(self, timeout: float | None = 30.0) -> None:
        """Block until everything queued before this call is committed."""
        self._wait_for_writer(self._flush_waiters, timeout)

    def _wait_for_writer(self, waiters: list, timeout: float | None) -> None:
        """Wake the writer thread and block until it has served a waiter put on `waiters`."""
        if self._closed:
            return
        done = threading.Event()
        with self._lock:
            if self._writer_done:
                return
            waiters.append(done)
        self._kick.set()
        done.wait(timeout)

    async def flush(self) -> None:
        await asyncio.to_thread(self.flush_sync)

    def prune_sync(self, timeout: float | None = 60.0) -> None:
        """Run a full retention pass now and block until it is done."""
        self._wait_for_writer(self._prune_waiters, timeout)

    async def prune(self) -> None:
        await asyncio.to_thread(self.prune_sync)

    def close_sync(self) -> None:
        """Flush what is queued, stop the writer, close the file. Idempotent."""
        with self._lock:
            if self._closing:
                already = True
            else:
                already, self._closing = False, True
        if not already:
            self._kick.set()
            self._writer.join()
            with self._read_lock:
                self._closed = True
                self._reader.close()
        else:
            self._writer.join()

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    # ---- the writer thread -------------------------------------------------------------------
    def _run(self, conn: sqlite3.Connection) -> None:
        next_flush = time.monotonic() + self.flush_interval_s
        next_prune = time.monotonic()  # a first pass at start: the gateway may have been off for long
        pruning: Iterator[None] | None = None
        pass_waiters: list[threading.Event] = []  # prune() callers this pass answers
        try:
            while True:
                try:
                    timeout = 0.0 if pruning is not None else max(0.0, min(next_flush, next_prune) - time.monotonic())
                    kicked = self._kick.wait(timeout)
                    if kicked:
                        self._kick.clear()
                    now = time.monotonic()
                    if kicked or now >= next_flush:
                        closing = self._write_pending(conn)
                        next_flush = now + self.flush_interval_s
                        if closing:
                            break
                    if pruning is None and (now >= next_prune or self._prune_waiters):
                        with self._lock:
                            pass_waiters, self._prune_waiters = self._prune_waiters, []
                        pruning = self._prune_pass(conn)
                    if pruning is not None:
                        try:
                            next(pruning)  # one chunk, then back to flushing
                        except StopIteration:
                            pruning = None
                            next_prune = time.monotonic() + self.prune_interval_s
                            for w in pass_waiters:
                                w.set()
                            pass_waiters = []
                except Exception:  # noqa: BLE001 - the writer must outlive one bad pass
                    log.exception("historian: writer step failed")
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    pruning = None
                    next_prune = time.monotonic() + self.prune_interval_s
                    time.sleep(min(1.0, self.flush_interval_s))
        finally:
            conn.close()
            with self._lock:
                self._writer_done = True
                waiters = self._flush_waiters + self._prune_waiters + pass_waiters
                self._flush_waiters, self._prune_waiters = [], []
            for w in waiters:
                w.set()

    def _write_pending(self, conn: sqlite3.Connection) -> bool:
        """Commit the queue in one transaction; True when closing (the queue was the last one)."""
        with self._lock:
            samples, self._samples = self._samples, []
            events, self._events = self._events, []
            nodes, self._new_nodes = self._new_nodes, []
            waiters, self._flush_waiters = self._flush_waiters, []
            closing = self._closing
        for take in self._sources:
            samples.extend(take())
        if samples or events or nodes:
            t0 = time.perf_counter()
            try:
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO node (id, key) VALUES (?, ?)", nodes)
                conn.executemany("INSERT INTO sample VALUES (?, ?, ?, ?, ?, ?)", samples)
                conn.executemany("INSERT INTO event VALUES (?, ?, ?, ?, ?, ?)", events)
                conn.execute("COMMIT")
            except sqlite3.OperationalError:  # disk full, locked by another process: retry next time
                log.exception("historian: writing %d values failed; kept for the next flush", len(samples))
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self.stats["write_errors"] += 1
                with self._lock:  # put them back in front of what arrived meanwhile
                    self._samples[:0] = samples
                    self._events[:0] = events
                    self._new_nodes[:0] = nodes
            except (sqlite3.Error, OverflowError, TypeError, ValueError):  # a row SQLite refuses: retrying cannot help
                log.exception("historian: a batch of %d values was refused and dropped", len(samples))
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self.stats["write_errors"] += 1
                self.stats["dropped"] += len(samples) + len(events)
                with self._lock:  # node ids are in use in memory: they must reach the file
                    self._new_nodes[:0] = nodes
            else:
                ms = (time.perf_counter() - t0) * 1000.0
                st = self.stats
                st["rows_written"] += len(samples)
                st["events_written"] += len(events)
                st["flushes"] += 1
                st["last_flush_ms"] = ms
                st["max_flush_ms"] = max(st["max_flush_ms"], ms)
        for w in waiters:
            w.set()
        return closing

    def _prune_pass(self, conn: sqlite3.Connection) -> Iterator[None]:
        """Delete rows older than the retention, a chunk per step, oldest rowids first.

        Rows arrive in about time order, so the scan stops at the first chunk with nothing to
        delete: no index on ts alone is needed (it would cost ~20 bytes a row)."""
        cutoff = int((time.time() - self.retention_s) * 1e6)
        for table in ("sample", "event"):
            cursor = 0
            while True:
                rows = conn.execute(f"SELECT rowid, ts FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                                    (cursor, self.prune_chunk_rows)).fetchall()
                old = [(rowid,) for rowid, ts in rows if ts < cutoff]
                if old:
                    conn.execute("BEGIN")
                    conn.executemany(f"DELETE FROM {table} WHERE rowid = ?", old)
                    conn.execute("COMMIT")
                    self.stats["rows_pruned"] += len(old)
                if not old or len(rows) < self.prune_chunk_rows:
                    break
                cursor = rows[-1][0]
                yield

    # ---- reading (any thread; async wrappers below) --------------------------------------------
    def _page(self, cols: str, table: str, where: str, params: tuple, lower: int | None, upper: int | None,
              limit: int, descending: bool) -> tuple[list[tuple], int | None]:
        """At most `limit` rows ordered by (ts, rowid) and the ts to continue from (None: no more).

        A page never splits the rows of one timestamp, so a continuation that restarts at that
        timestamp (asyncua's continuation points are a DateTime) repeats nothing and skips nothing.
        """
        lo = _TS_MIN if lower is None else lower
        hi = _TS_MAX if upper is None else upper
        order = "DESC" if descending else "ASC"
        base = f"SELECT ts, {cols} FROM {table} WHERE {where}"
        with self._read_lock:
            if self._closed:
                return [], None
            rows = self._reader.execute(f"{base} AND ts >= ? AND ts <= ? ORDER BY ts {order}, rowid {order} LIMIT ?",
                                        (*params, lo, hi, limit + 1)).fetchall()
            if len(rows) <= limit:
                return rows, None
            boundary = rows[limit][0]
            page = rows[:limit]
            while page and page[-1][0] == boundary:
                page.pop()
            if page:
                return page, boundary
            # more than `limit` rows share one timestamp: return them all rather than loop forever
            group = self._reader.execute(f"{base} AND ts = ? ORDER BY rowid {order}", (*params, boundary)).fetchall()
            cmp = "<" if descending else ">"
            after = self._reader.execute(
                f"SELECT ts FROM {table} WHERE {where} AND ts {cmp} ? AND ts >= ? AND ts <= ? "
                f"ORDER BY ts {order} LIMIT 1", (*params, boundary, lo, hi)).fetchone()
            return group, (after[0] if after else None)

    def read_samples(self, key: str, lower_us: int | None = None, upper_us: int | None = None, limit: int = 10000,
                     descending: bool = False) -> tuple[list[Sample], int | None]:
        """Values of one node with lower <= ts <= upper (µs; None = open), oldest first unless
        `descending`; at most `limit` (more if one timestamp has more), and the ts to go on from."""
        node_id = self._ids.get(key)
        if node_id is None:
            return [], None
        rows, cont = self._page("server_lag, status, vtype, value", "sample", "node = ?", (node_id,),
                                lower_us, upper_us, limit, descending)
        return [Sample(ts, ts + lag, status, vt, v) for ts, lag, status, vt, v in rows], cont

    def read_events(self, source_key: str | None, lower_us: int | None = None, upper_us: int | None = None,
                    limit: int = 10000, descending: bool = False) -> tuple[list[StoredEvent], int | None]:
        """Events whose SourceNode or notifier is `source_key` (None: all events)."""
        if source_key is None:
            where, params = "1", ()
        else:
            node_id = self._ids.get(source_key)
            if node_id is None:
                return [], None
            where, params = "(source = ? OR emitter = ?)", (node_id, node_id)
        rows, cont = self._page("fields", "event", where, params, lower_us, upper_us, limit, descending)
        return [StoredEvent(ts, _decode_fields(blob)) for ts, blob in rows], cont


# ---- asyncua history storage -----------------------------------------------------------------

def point_key(site_name: str, device: str, point: str) -> str:
    """The node key HistorianStorage.key gives a site's point variable (ns=<site>;s=<device>.<point>)."""
    return f"{SITE_NAMESPACE_PREFIX}{site_name}|s={device}.{point}"


class HistoryFile:
    """Read-only access to a historian file, without the Historian's writer (which creates the schema and
    prunes past its retention when it opens a file): for tools reading a data dir, e.g. `cmcs train
    --history`. It may be the running gateway's file (WAL readers do not block the writer). Raises
    sqlite3.Error when the file is not a readable history."""

    _BAD = 0x80000000  # StatusCode severity bit (a Bad value is stored as null anyway)

    def __init__(self, path: Path):
        self.path = Path(path)
        self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        try:
            self.conn.execute("PRAGMA query_only=ON")
            self.keys: dict[str, int] = {k: i for i, k in self.conn.execute("SELECT id, key FROM node")}
        except sqlite3.Error:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def sites(self) -> dict[str, int]:
        """Site names of the keys recorded, with their number of keys."""
        out: dict[str, int] = {}
        for key in self.keys:
            ns, _, _ = key.partition("|")
            if ns.startswith(SITE_NAMESPACE_PREFIX):
                name = ns[len(SITE_NAMESPACE_PREFIX):]
                out[name] = out.get(name, 0) + 1
        return out

    def devices(self, site_name: str, point: str) -> list[str]:
        """The devices of a site with this point recorded."""
        prefix, suffix = f"{SITE_NAMESPACE_PREFIX}{site_name}|s=", f".{point}"  # as point_key writes them
        return sorted(k[len(prefix):-len(suffix)] for k in self.keys if k.startswith(prefix) and k.endswith(suffix))

    def numeric_series(self, key: str) -> tuple[list[float], list[float]]:
        """(source timestamps in s since 1970, values; NaN where Bad, null or not a number) of one node,
        in time order."""
        node = self.keys.get(key)
        if node is None:
            return [], []
        rows = self.conn.execute("SELECT ts, status, value FROM sample WHERE node = ? ORDER BY ts, rowid",
                                 (node,)).fetchall()
        nan = float("nan")
        return ([r[0] / 1e6 for r in rows],
                [nan if (r[2] is None or (r[1] & self._BAD) or isinstance(r[2], (bytes, str))) else float(r[2])
                 for r in rows])


class HistorianStorage(HistoryStorageInterface):
    """asyncua's HistoryStorageInterface over a Historian (install with history_manager.set_storage).

    Continuation points: asyncua's HistoryManager turns the DateTime this returns into the
    continuation point and, on the next call, passes it back as the start time. Pages never split
    a timestamp, so that is exact. One case the manager cannot express, reading backwards from
    EndTime with no StartTime: the continuation looks like a forward read from it, so the
    continuation points issued for such reads are remembered (bounded) to keep their direction.
    ReturnBounds is not passed to storages by asyncua and is not supported.
    """

    def __init__(self, historian: Historian, namespaces: list[str], *, server=None,
                 max_history_data_response_size: int = 10000) -> None:
        super().__init__(max_history_data_response_size)
        self.historian = historian
        self.namespaces = list(namespaces)
        self._server = server
        self._reverse_continuations: collections.OrderedDict[tuple, None] = collections.OrderedDict()

    # -- node keys --
    def key(self, node_id: ua.NodeId) -> str:
        """"<namespace URI>|<identifier>", e.g. "urn:cmcs-gateway:site:demo-hall|s=SourceA.Voltage"."""
        ns = node_id.NamespaceIndex
        uri = self.namespaces[ns] if ns < len(self.namespaces) else f"ns{ns}"
        return f"{uri}|{_NS_PREFIX.sub('', node_id.to_string(), count=1)}"

    async def _refresh_namespaces(self, node_id: ua.NodeId) -> None:
        if node_id.NamespaceIndex >= len(self.namespaces) and self._server is not None:
            self.namespaces = list(await self._server.get_namespace_array())

    # -- values --
    async def init(self) -> None:
        pass

    async def new_historized_node(self, node_id: ua.NodeId, period: timedelta | None, count: int = 0) -> None:
        """Registers the node; `period`/`count` are ignored: retention is the historian's, for all."""
        await self._refresh_namespaces(node_id)
        self.historian.key_id(self.key(node_id))

    async def save_node_value(self, node_id: ua.NodeId, datavalue: ua.DataValue) -> None:
        await self._refresh_namespaces(node_id)
        self.record_datavalues([(node_id, datavalue)])

    def record_datavalues(self, updates: Iterable[tuple[ua.NodeId, ua.DataValue]]) -> int:
        """Queue DataValues of any nodes (registering them). Returns how many were queued."""
        now_us = datetime_to_us(datetime.now(timezone.utc))
        rows = []
        h = self.historian
        for node_id, dv in updates:
            rows.append(_row(h.key_id(self.key(node_id)), dv, now_us))
        h.append_samples(rows)
        return len(rows)

    def _direction(self, node: int, start: datetime | None, end: datetime | None, nb_values: int):
        """(lower µs, upper µs, descending, remember the continuation?, end µs) per Part 11 6.4.3.2."""
        s_open, e_open = _unspecified(start), _unspecified(end)
        s_us = None if s_open else datetime_to_us(start)
        e_us = None if e_open else datetime_to_us(end)
        if not s_open and (node, s_us, e_us, nb_values) in self._reverse_continuations:
            self._reverse_continuations.move_to_end((node, s_us, e_us, nb_values))  # kept: a client may retry
            return None, s_us, True, True, e_us
        if s_open:  # backwards from EndTime (or from now when neither is given), newest first
            return None, e_us, True, True, e_us
        if e_open or s_us <= e_us:
            return s_us, e_us, False, False, e_us
        return e_us, s_us, True, False, e_us

    def _limit(self, nb_values: int) -> int:
        cap = self.max_history_data_response_size
        return min(nb_values, cap) if nb_values > 0 else cap

    def _remember(self, node: int, cont_us: int, e_us: int | None, nb_values: int) -> None:
        self._reverse_continuations[(node, cont_us, e_us, nb_values)] = None
        while len(self._reverse_continuations) > 10000:
            self._reverse_continuations.popitem(last=False)

    async def read_node_history(self, node_id: ua.NodeId, start: datetime | None, end: datetime | None,
                                nb_values: int) -> tuple[list[ua.DataValue], datetime | None]:
        await self._refresh_namespaces(node_id)
        node = self.historian.known_key(self.key(node_id))
        if node is None:
            return [], None
        lower, upper, descending, remember, e_us = self._direction(node, start, end, nb_values)
        samples, cont = await asyncio.to_thread(self.historian.read_samples, self.key(node_id), lower, upper,
                                                self._limit(nb_values), descending)
        if cont is not None and remember:
            self._remember(node, cont, e_us, nb_values)
        values = [ua.DataValue(decode_variant(s.vtype, s.value), StatusCode=ua.StatusCode(s.status),
                               SourceTimestamp=us_to_datetime(s.ts_us), ServerTimestamp=us_to_datetime(s.server_ts_us))
                  for s in samples]
        return values, (None if cont is None else us_to_datetime(cont))

    # -- events --
    async def new_historized_event(self, source_id: ua.NodeId, evtypes: list,  # type: ignore[override]
                                   period: timedelta | None, count: int = 0) -> None:
        await self._refresh_namespaces(source_id)
        self.historian.key_id(self.key(source_id))

    def record_event(self, event: Event) -> None:
        """Queue an asyncua Event (all its fields) for history."""
        fields = _event_fields(event)
        when = getattr(event, "Time", None) or datetime.now(timezone.utc)
        h = self.historian

        def node_key(value) -> int | None:
            return h.key_id(self.key(value)) if isinstance(value, ua.NodeId) and not value.is_null() else None

        severity = getattr(event, "Severity", None)
        h.append_event(datetime_to_us(when), fields, source=node_key(getattr(event, "SourceNode", None)),
                       emitter=node_key(event.emitting_node), event_type=node_key(getattr(event, "EventType", None)),
                       severity=int(severity) if severity is not None else None)

    async def save_event(self, event: Event) -> None:
        for nid in (getattr(event, "SourceNode", None), event.emitting_node):
            if isinstance(nid, ua.NodeId):
                await self._refresh_namespaces(nid)
        self.record_event(event)

    async def read_event_history(self, source_id: ua.NodeId, start: datetime | None, end: datetime | None,
                                 nb_values: int, evfilter) -> tuple[list[Event], datetime | None]:
        """Events of `source_id` (the Server object: all events). The filter's where clause is not applied."""
        await self._refresh_namespaces(source_id)
        key = None if source_id == _SERVER_OBJECT else self.key(source_id)
        node = 0 if key is None else self.historian.known_key(key)
        if node is None:
            return [], None
        lower, upper, descending, remember, e_us = self._direction(-1 - node, start, end, nb_values)
        events, cont = await asyncio.to_thread(self.historian.read_events, key, lower, upper, self._limit(nb_values),
                                               descending)
        if cont is not None and remember:
            self._remember(-1 - node, cont, e_us, nb_values)
        return [Event.from_field_dict(e.fields) for e in events], (None if cont is None else us_to_datetime(cont))

    async def stop(self) -> None:
        """asyncua calls this when the server stops: flush and close the file."""
        await self.historian.close()


_NS_PREFIX = re.compile(r"^ns=\d+;")


def _event_fields(event: Event) -> dict[str, ua.Variant]:
    """The event's fields as Variants. Unlike Event.get_event_props_as_fields_dict, tolerates a
    null field and a data type given as a NodeId (asyncua's AuditEvent does both)."""
    fields = {}
    for name, value in vars(event).items():
        if name.startswith("__") or name in event.internal_properties:
            continue
        dt = event.data_types.get(name)
        try:
            if value is None:
                variant = ua.Variant()
            elif isinstance(dt, ua.VariantType):
                variant = ua.Variant(value, dt)
            else:
                variant = ua.Variant(value)
            variant_to_binary(variant)  # refuse here what could not be stored
        except Exception:  # noqa: BLE001 - one odd field must not lose the event
            log.warning("historian: event field %s=%r not stored", name, value)
            continue
        fields[name] = variant
    return fields


def _row(node: int, dv: ua.DataValue, now_us: int) -> tuple:
    src = dv.SourceTimestamp or dv.ServerTimestamp
    ts = now_us if src is None else datetime_to_us(src)
    server_ts = now_us if dv.ServerTimestamp is None else datetime_to_us(dv.ServerTimestamp)
    status = 0 if dv.StatusCode is None else dv.StatusCode.value
    variant = None if ua.StatusCode(status).is_bad() else dv.Value  # Part 4 7.7.1: a Bad value is null
    vtype, value = encode_variant(variant)
    return node, ts, server_ts - ts, status, vtype, value


# ---- the gateway's feed ------------------------------------------------------------------------

class PointTableFeed(Sink):
    """Point-table sink (lossless): every change of a historized variable becomes a history row.

    The rows wait in a LosslessBuffer until the historian's writer thread takes them at its next
    flush (`Historian.add_source`); none is dropped. If the disk falls behind by more than
    `max_pending_rows` rows the buffer still keeps them and reports back-pressure (`overflowing`
    in `stats()`, BackPressure in Diagnostics). Rows that come after the historian is closed are
    counted as dropped."""

    name = "historian"
    kind = "lossless"

    def __init__(self, historian: Historian, storage: HistorianStorage, model, table: PointTable | None = None):
        self.historian = historian
        self.storage = storage
        historized = set(model.historized)
        for nodeid in model.historized:
            historian.key_id(storage.key(nodeid))
        # (device, point) -> (history id, VariantType)
        self._points: dict[tuple[str, str], tuple[int, ua.VariantType]] = {
            dp: (historian.key_id(storage.key(nodeid)), model.point_types[nodeid])
            for dp, nodeid in model.points.items() if nodeid in historized}
        fed = set()
        if table is not None:
            for device in table.devices():
                for point in table.points(device):
                    nodeid = model.points.get((device, point))
                    if nodeid is not None:
                        fed.add(nodeid)
        self._historized = historized
        self._fed_by_table = fed
        self.buffer = LosslessBuffer(max_changes=historian.max_pending_rows)
        self._lock = threading.Lock()  # put on the event loop, take in the writer thread
        self.dropped = 0
        self._warned = False
        historian.add_source(self.take_rows)

    def attach(self, birth: Birth) -> None:
        """The values the table already holds (those that have been read at least once)."""
        self.changes([c for c in birth.changes() if c.value is not None])

    # ---- a site reload (gateway/reload.py) ---------------------------------------------------------
    def add_points(self, added, table: PointTable) -> None:
        """Historize the variables of devices a reload added (`added`: the SiteModel of what was added):
        the table's points from the point table, the others (RiskScore, ...) from the address space.
        A device added again under a name it had keeps its history (the key is the NodeId)."""
        historized = set(added.historized)
        for dp, nodeid in added.points.items():
            if nodeid in historized:
                self._points[dp] = (self.historian.key_id(self.storage.key(nodeid)), added.point_types[nodeid])
        defined = {(device, point) for device in set(table.devices()) & set(added.device_nodes)
                   for point in table.points(device)}
        fed = {nodeid for dp, nodeid in added.points.items() if dp in defined}
        self._historized |= historized
        self._fed_by_table |= fed
        self._watch([n for n in historized if n not in fed])

    def remove_devices(self, devices: set[str]) -> None:
        """Record nothing more of these devices (their history stays, answered by HistoryRead of their NodeIds)."""
        for dp in [dp for dp in self._points if dp[0] in devices]:
            del self._points[dp]

    def changes(self, batch: list[Change]) -> None:
        points = self._points
        server_us = int(time.time() * 1e6)
        rows = []
        for c in batch:
            target = points.get((c.device, c.point))
            if target is None:
                continue
            node, vtype = target
            status = QUALITY_STATUS_CODE[c.quality]
            ts = int(round(c.source_ts * 1e6))
            if c.value is None or c.quality is Quality.BAD_COMM or c.quality is Quality.BAD_WAITING:
                rows.append((node, ts, server_us - ts, status, _VT_NULL, None))
            else:
                rows.append((node, ts, server_us - ts, status, int(vtype), _coerce(c.value, vtype)))
        if not rows:
            return
        if self.historian.closing:
            self.dropped += len(rows)
            return
        with self._lock:
            self.buffer.put(rows)
            overflowing = self.buffer.overflowing
        if overflowing and not self._warned:
            self._warned = True
            log.warning("historian: more than %d rows wait for the disk; kept in memory (back-pressure)",
                        self.buffer.max_changes)

    __call__ = changes  # as a bare function of a batch

    def take_rows(self) -> list[tuple]:
        """Everything buffered, oldest first (called by the writer thread)."""
        with self._lock:
            return self.buffer.take()

    def stats(self) -> dict[str, int | float]:
        """Rows waiting for the writer; dropped: after close, plus whatever the historian itself
        lost (a batch SQLite refused, its own queue past its bound after repeated write errors)."""
        with self._lock:
            return {"queued": self.buffer.queued, "spilled": self.buffer.spilled, "high_water": self.buffer.high_water,
                    "overflowing": self.buffer.overflowing, "dropped": self.dropped + self.historian.stats["dropped"]}

    def watch_address_space(self, server) -> int:
        """Historized variables the point table does not feed (Cmcs.Mode, values the CMCS writes):
        record every value stored in them, whatever the path (write_values, a client's Write), through
        the address space's datachange callbacks, and their current values now. Returns how many."""
        self._aspace = server.iserver.aspace
        watched = [n for n in self._historized if n not in self._fed_by_table]
        self._watch(watched)
        return len(watched)

    def _watch(self, watched: list) -> None:
        aspace = self._aspace
        current = []
        for nodeid in watched:
            async def on_change(_handle, datavalue, nodeid=nodeid):
                if datavalue is not None:
                    self.storage.record_datavalues([(nodeid, datavalue)])

            aspace.add_datachange_callback(nodeid, ua.AttributeIds.Value, on_change)
            dv = aspace.read_attribute_value(nodeid, ua.AttributeIds.Value)
            if dv is not None and dv.Value is not None and dv.Value.VariantType != ua.VariantType.Null:
                current.append((nodeid, dv))
        self.storage.record_datavalues(current)


def _move_old_file(data_dir: Path) -> None:
    """A data dir of an earlier version holds `history.db`: rename it (and its WAL and shared-memory
    files, which hold committed rows) to the contract's name, once, before SQLite opens it."""
    old, new = data_dir / OLD_DB_FILE_NAME, data_dir / DB_FILE_NAME
    if old.exists() and not new.exists():
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{old}{suffix}").exists():
                Path(f"{old}{suffix}").rename(f"{new}{suffix}")
        log.warning("historian: moved %s to %s (the history file's name in the data dir is now history.sqlite3)", old, new)


async def attach(gateway_server, data_dir: Path, *, retention_s: float = DEFAULT_RETENTION_S,
                 flush_interval_s: float = 1.0) -> Historian:
    """Open `<data_dir>/history.sqlite3`, serve HistoryRead from it, and record every change of the
    historized variables: from the point table through `historian.feed` (a sink the caller
    attaches: `table.attach(historian.feed)`), and from the address space for the others.

    Call after `GatewayServer.build()` built the address space (`gateway_server.model`)."""
    model = gateway_server.model
    if model is None:
        raise RuntimeError("attach the historian after GatewayServer.build(): the address space is not built")
    server = gateway_server.server
    _move_old_file(Path(data_dir))
    historian = await asyncio.to_thread(Historian, Path(data_dir) / DB_FILE_NAME, retention_s, flush_interval_s)
    storage = HistorianStorage(historian, await server.get_namespace_array(), server=server)
    server.iserver.history_manager.set_storage(storage)
    feed = PointTableFeed(historian, storage, model, gateway_server.table)
    historian.storage, historian.feed = storage, feed  # the gateway's wiring attaches the feed
    feed.watch_address_space(server)
    log.info("historian: %s, %d historized variables, retention %.1f d", historian.path, len(model.historized),
             retention_s / 86400)
    return historian
