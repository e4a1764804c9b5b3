"""The store-and-forward queue: order, durability across a reopen, the bound (oldest first, counted)."""

from __future__ import annotations

from gateway.sparkplug.store import MessageStore


def test_order_survives_a_reopen_and_only_acknowledged_rows_go(tmp_path):
    store = MessageStore(tmp_path / "q.sqlite3", max_bytes=10_000_000)
    ids = [store.append("DDATA", "MATS-01-01", False, 1, bytes([i])) for i in range(10)]
    store.commit()
    store.delete(ids[:3])
    store.commit()
    store.close()
    again = MessageStore(tmp_path / "q.sqlite3", max_bytes=10_000_000)
    rows = again.after(0, 100)
    assert [r[4] for r in rows] == [bytes([i]) for i in range(3, 10)] and again.count == 7
    again.mark_historical()
    assert all(r[3] == 1 for r in again.after(0, 100))
    again.close()


def test_past_the_bound_the_oldest_go_first_and_are_counted(tmp_path):
    store = MessageStore(tmp_path / "q.sqlite3", max_bytes=1000)
    first = store.append("DDATA", "d", True, 5, b"x" * 100)
    for _ in range(20):
        store.append("DDATA", "d", True, 5, b"y" * 100, keep=[first])
    store.commit()
    assert store.bytes <= 1000 and store.dropped_messages > 0 and store.dropped_metrics == 5 * store.dropped_messages
    rows = store.after(0, 100)
    assert rows[0][0] == first  # in flight: kept
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert store.count == len(rows)
