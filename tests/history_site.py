"""A site's recorded history, days of it in seconds: what `cmcs train --history` learns from.

The plant replays a long scenario faster than real time; every scan, each device's values go
through its register map (encoded as the simulator serves them, decoded as the Modbus driver
reads them), into the gateway's point table (change-only, as the drivers feed it) and from there
through the historian's own feed (`gateway.historian.PointTableFeed`) into `history.sqlite3`, under
the node keys of the site's real address space (`information_model.build_site`). Timestamps are
wall-clock ones ending now (the scenario's time of day follows them), so the history looks like
one a gateway recorded over the last days; it stays within the historian's retention.

What is left out against a live gateway: the network (Modbus TCP, OPC UA) and the CMCS's own
outputs (RiskScore, PredictedLoad, Cmcs.Mode are not recorded: nothing computes them here).

    python -m tests.history_site DATA_DIR [--days 6] [--config SITE] [--scan-s 10] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# a site's own load, fixed for all its days (the training draws a new one per scenario): the demo
# hall runs the simulator's default profile (what `cmcs run` replays)
DEFAULT_STEP_S = 2.0  # plant step: 2 s keeps a 6-day replay under a minute (the load's AR and noise
# are drawn per step; the sampled statistics do not depend on it)


@dataclass
class RecordedHistory:
    data_dir: Path
    start_epoch_s: float
    end_epoch_s: float
    scans: int
    rows_written: int
    wall_s: float
    gaps: tuple = ()
    scenario: object = None  # the plant's scenario (plant time 0 = start_epoch_s - scan_s)


def _quantizer(point):
    """decode_point(encode_point(v, clamp=True)) over an array: what the driver reads back."""
    from siteconfig.profiles import BIT_TYPE, REGISTER_TYPES, _int_range

    if point.type == BIT_TYPE or point.kind == "bool":
        return lambda v: np.asarray(v).astype(bool)
    if point.type == "float32":
        def q(v):
            raw = (np.asarray(v, float) / point.scale).astype(np.float32).astype(float)
            out = raw * point.scale
            return np.round(out, point.ndigits) if point.ndigits is not None else out
        return q
    low, high = _int_range(REGISTER_TYPES[point.type][0])

    def q(v):
        v = np.asarray(v, float)
        raw = np.clip(np.round(np.where(np.isfinite(v), v, 0.0) / point.scale), low, high)
        if point.kind == "int" or point.kind.startswith("enum:"):
            return np.round(raw * point.scale).astype(np.int64)
        out = raw * point.scale
        return np.round(out, point.ndigits) if point.ndigits is not None else out
    return q


async def record_history(site, data_dir: Path, days: float, *, scan_s: float = 10.0, seed: int = 1, load=None,
                         faults: tuple = (), end_epoch_s: float | None = None, step_s: float = DEFAULT_STEP_S,
                         gaps: tuple[tuple[float, float], ...] = (), progress: bool = False) -> RecordedHistory:
    """Record `days` of the site into `<data_dir>/history.sqlite3`. `gaps`: (start, end) plant seconds
    during which the gateway was down (nothing recorded)."""
    from asyncua import Server

    from drivers.pointtable import PointTable
    from gateway.historian import DB_FILE_NAME, Historian, HistorianStorage, PointTableFeed
    from information_model.instantiate import build_site, load_information_model
    from siteconfig.points import POINTS
    from siteconfig.profiles import decode_point, encode_point, load_profile
    from simulator.plant import Plant
    from simulator.scenario import LoadProfile, Scenario

    t_wall = time.perf_counter()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    duration = float(days) * 86400.0
    end = time.time() if end_epoch_s is None else float(end_epoch_s)
    start = math.floor((end - duration) / scan_s) * scan_s
    # the address space the gateway would build: its node keys and types
    server = Server()
    await server.init()
    await load_information_model(server)
    model = await build_site(server, site)
    namespaces = await server.get_namespace_array()
    historian = Historian(data_dir / DB_FILE_NAME, flush_interval_s=0.5)
    storage = HistorianStorage(historian, namespaces)
    table = PointTable()
    historized = set(model.historized)
    groups = []  # (kind, device indices, device names, [(point, quantizer)])
    by_kind: dict[tuple[str, str], list[tuple[int, str]]] = {}
    index = {"source": {s.name: i for i, s in enumerate(sorted(site.sources, key=lambda s: int(s.selection)))},
             "pdb": {p.name: i for i, p in enumerate(site.pdbs)}, "ats": {u.name: i for i, u in enumerate(site.units)},
             "des": {u.storage.name: i for i, u in enumerate(site.units) if u.storage is not None}}
    for name, kind, endpoint in site.devices():
        table.define(name, [p.name for p in POINTS[kind]])
        by_kind.setdefault((kind, endpoint.profile), []).append((index[kind][name], name))
    checks = []
    for (kind, profile_name), devs in by_kind.items():
        profile = load_profile(profile_name)
        maps = {p.name: p for p in profile.points}
        points = [(maps[p.name], _quantizer(maps[p.name])) for p in POINTS[kind]
                  if p.name in maps and model.points.get((devs[0][1], p.name)) in historized]
        groups.append((kind, np.array([i for i, _ in devs]), [n for _, n in devs], points))
        checks += [(kind, i, pm) for pm, _ in points for i, _ in devs[:2]]
    feed = PointTableFeed(historian, storage, model, table)
    table.attach(feed)
    scenario = Scenario(name=f"history-{site.name}", duration_s=duration + scan_s, step_s=step_s, seed=seed,
                        start_time_of_day_s=start % 86400.0, load=load or LoadProfile(), faults=tuple(faults))
    plant = Plant(site, scenario)
    times = np.arange(scan_s, duration + 1e-9, scan_s)
    scans = 0
    try:
        for j, t in enumerate(times):
            plant.advance_to(float(t))
            if any(a <= t < b for a, b in gaps):
                continue
            snap = plant.snapshot()
            if j < 3:  # the vectorised round trip is the driver's, value for value
                for kind, i, pm in checks:
                    v = snap[kind][pm.name][i]
                    want = decode_point(pm, encode_point(pm, v.item() if hasattr(v, "item") else v, clamp=True))
                    got = next(q for p, q in next(g for g in groups if g[0] == kind)[3] if p is pm)(
                        np.array([v]))[0]
                    assert got == want, (kind, i, pm.name, got, want)
            ts = start + float(t)
            for kind, idx, names, points in groups:
                cols = [(pm.name, q(np.asarray(snap[kind][pm.name])[idx]).tolist()) for pm, q in points]
                for k, name in enumerate(names):
                    table.update_device(name, {p: vals[k] for p, vals in cols}, source_ts=ts)
            scans += 1
            if progress and j % 8640 == 0:
                print(f"  day {t / 86400:.1f}: {historian.stats['rows_written']} rows", file=sys.stderr)
        historian.flush_sync(timeout=300)
    finally:
        historian.close_sync()
    return RecordedHistory(data_dir, start + float(times[0]), start + float(times[-1]), scans,
                           historian.stats["rows_written"], time.perf_counter() - t_wall, tuple(gaps), scenario)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--days", type=float, default=6.0)
    p.add_argument("--config", type=Path, default=None, help="site file (default: the demo hall)")
    p.add_argument("--scan-s", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--load", default=None, help="load profile as k=v,... (LoadProfile fields)")
    a = p.parse_args(argv)
    from siteconfig.demo import demo_site
    from siteconfig.loader import load_site
    from simulator.scenario import LoadProfile

    site = load_site(a.config) if a.config else demo_site()
    load = None
    if a.load:
        load = LoadProfile(**{k: float(v) for k, v in (kv.split("=") for kv in a.load.split(","))})
    rec = asyncio.run(record_history(site, a.data_dir, a.days, scan_s=a.scan_s, seed=a.seed, load=load, progress=True))
    print(f"{rec.data_dir}: {a.days:g} days of {site.name}, {rec.scans} scans, {rec.rows_written} rows, "
          f"{rec.wall_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
