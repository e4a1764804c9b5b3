"""The load phase of `cmcs bench robustness`, short: several SCADA clients at once.

The same code as the bench's 10-minute run (bench/robustness.py `load`, clients in their own process,
bench/load_clients.py): the demo site's simulators and gateway as processes, 5 clients over
Basic256Sha256 SignAndEncrypt with a user name, each subscribed to 100 variables (500 ms publishing),
browsing an aisle's subtree and reading 3 variables' history every 4 s, for 20 s, on a gateway restarted on a
seeded history (bench/robustness.py `seed_history`: 30 min of rows for every variable). No errors, every
client gets its notifications, the gateway's memory stays flat after a 5 s warm-up, and the latency
from the plant step that produced a value to its arrival at the client (bench/arrival.py) has p99 < 1.5 s.

The scan period here is 0.25 s: plant-to-client latency is at least the wait for the next poll plus
the wait for the next publish (plus the simulator's 100 ms tick and the gateway's 20 ms flush), so
with the demo's 1 s scan and 500 ms publishing its p99 is ~1.45 s before any work is done (bench figures: docs/interface.md section 7, `load_latency_p99_s`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bench.robustness import LOAD_TARGETS, SEED_SPAN_S, SEED_STEP_S, Processes, bench_site, load, seed_history
from gateway.security import ensure_cmcs_client
from siteconfig.demo import demo_site

from .conftest import free_port

SCAN_S = 0.25


async def test_five_secure_clients_subscribe_browse_and_read_history_without_errors_and_flat_memory(tmp_path: Path):
    site = demo_site()
    site = dataclasses.replace(site, gateway=dataclasses.replace(
        site.gateway, scan_groups_s={k: SCAN_S for k in site.gateway.scan_groups_s}))
    site = bench_site(site, tmp_path / "site.yaml")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    identity = ensure_cmcs_client(data_dir)
    procs = Processes(tmp_path / "site.yaml", free_port(), str(data_dir))
    await procs.start()
    try:
        # as the bench does: a gateway with 30 min of history for every variable, restarted on it
        seeded = await seed_history(procs)
        assert seeded["history_nodes_fed"] > 0.9 * seeded["history_nodes"], seeded
        assert seeded["seeded_rows"] == seeded["history_nodes_fed"] * int(SEED_SPAN_S / SEED_STEP_S), seeded
        assert procs.gateway_alive()
        r = await load(procs, site, identity, clients=5, items=100, load_s=20.0, warmup_s=5.0, workers=1,
                       browse_every_s=4.0, history_every_s=4.0, sample_s=1.0)
    finally:
        await procs.stop()
    print({k: r[k] for k in ("rss_growth_pct", "latency_p50_s", "latency_p99_s", "source_latency_p99_s",
                             "browse_p99_s", "history_p99_s", "notifications_per_s", "cpu_percent")})
    assert r["connected"] == 5 and r["gateway_alive"]
    assert r["errors"] == 0, r["first_errors"]
    assert r["not_good_values"] == 0
    # every client kept receiving: each of its 100 variables changes about every other second
    assert r["notifications_min_per_client"] > 100 * 20 / 4, r["notifications_min_per_client"]
    assert r["browse_requests"] >= 5 * 2 * 4 and r["history_reads"] >= 5 * 4  # each browse is two requests
    assert r["history_values"] > 0
    assert r["rss_growth_pct"] < LOAD_TARGETS["rss_growth_pct"], r["rss_samples"]
    assert r["latency_p99_s"] < LOAD_TARGETS["latency_p99_s"], r
    # every notification was stamped on arrival (bench/arrival.py), before the client decoded it
    assert r["unstamped_publishes"] == 0, r
    assert r["decoded_latency_p99_s"] is not None, r
    assert r["browse_p99_s"] < 1.0 and r["history_p99_s"] < 1.0
