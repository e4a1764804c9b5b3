"""The store-and-forward queue: every message the edge node will publish, on disk, until the broker acknowledged it.

SQLite in WAL mode in the data dir (`sparkplug-queue.sqlite3`). Rows are written before they are
published and deleted only on PUBACK, so a gateway killed (kill -9) or a broker gone loses nothing
the broker did not confirm; after a reconnect the rows left are sent again, oldest first (at least
once: a message whose PUBACK was lost on the way comes twice). Past `max_bytes` the oldest rows go
first, counted in `dropped_messages` / `dropped_metrics`, and logged.

Used by one thread only (the edge node's publisher thread).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,          -- DDATA, NDATA, DBIRTH, DDEATH
    device TEXT NOT NULL,        -- '' for node messages
    historical INTEGER NOT NULL, -- 0 live; 1 to be sent with is_historical; 2 is_historical already set
    metrics INTEGER NOT NULL,
    body BLOB NOT NULL           -- a serialized Payload without seq (seq is per connection)
)
"""


class MessageStore:
    """A bounded, ordered, durable queue of messages."""

    def __init__(self, path: Path, max_bytes: int):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a process crash loses no commit
        self.db.execute(_SCHEMA)
        self.bytes, self.count = self.db.execute(
            "SELECT COALESCE(SUM(length(body)), 0), COUNT(*) FROM queue").fetchone()
        self.dropped_messages = 0
        self.dropped_metrics = 0
        self._in_tx = False
        if self.count:
            log.info("store-and-forward: %d messages (%.1f MB) left from before, sent after the births",
                     self.count, self.bytes / 1e6)

    def _begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False

    def append(self, kind: str, device: str, historical: int, metrics: int, body: bytes,
               keep: Iterable[int] = ()) -> int:
        """Queue a message (in the open transaction; `commit()` makes it durable); returns its id.
        `keep`: ids that must not be dropped for room (in flight)."""
        self._begin()
        cur = self.db.execute("INSERT INTO queue (kind, device, historical, metrics, body) VALUES (?, ?, ?, ?, ?)",
                              (kind, device, int(historical), metrics, body))
        self.bytes += len(body)
        self.count += 1
        if self.bytes > self.max_bytes:
            self._make_room(set(keep))
        return int(cur.lastrowid)

    def _make_room(self, keep: set[int]) -> None:
        """Drop the oldest rows (not in flight) until the queue is at 90 % of its bound."""
        target = int(self.max_bytes * 0.9)
        dropped = 0
        for row_id, size, metrics in self.db.execute("SELECT id, length(body), metrics FROM queue ORDER BY id").fetchall():
            if self.bytes <= target:
                break
            if row_id in keep:
                continue
            self.db.execute("DELETE FROM queue WHERE id = ?", (row_id,))
            self.bytes -= size
            self.count -= 1
            self.dropped_messages += 1
            self.dropped_metrics += metrics
            dropped += 1
        log.warning("store-and-forward queue full (%.0f MB): dropped the oldest %d messages "
                    "(%d messages, %d metrics dropped so far)", self.max_bytes / 1e6, dropped,
                    self.dropped_messages, self.dropped_metrics)

    def after(self, row_id: int, limit: int) -> list[tuple[int, str, str, int, bytes]]:
        """Up to `limit` messages queued after `row_id`, oldest first."""
        return self.db.execute("SELECT id, kind, device, historical, body FROM queue WHERE id > ? ORDER BY id LIMIT ?",
                               (row_id, limit)).fetchall()

    def delete(self, ids: list[int]) -> None:
        """Messages the broker acknowledged."""
        if not ids:
            return
        self._begin()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            size, n = self.db.execute(f"SELECT COALESCE(SUM(length(body)), 0), COUNT(*) FROM queue WHERE id IN ({marks})",
                                      chunk).fetchone()
            self.db.execute(f"DELETE FROM queue WHERE id IN ({marks})", chunk)
            self.bytes -= size
            self.count -= n

    def mark_historical(self) -> None:
        """Everything still queued is sent again after the next births: as history."""
        self._begin()
        self.db.execute("UPDATE queue SET historical = 1 WHERE historical = 0")

    def close(self) -> None:
        self.commit()
        self.db.close()
