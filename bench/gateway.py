"""`cmcs bench gateway`: our gateway against a naive asyncua server on the same points.

For each site (the demo, and a generated 1,000-unit site) and each server (ours; the naive
baseline of bench/naive_server.py, same drivers and command service), three processes run
side by side on this machine: the device simulators, the gateway, and this measuring client.

- startup_s: from launching the gateway process to the client's first Good read;
- updates_per_s: data-change notifications per second received by a client subscribed to
  every variable (publishing interval 500 ms);
- latency: from the plant change to the notification's arrival at the client (the whole response
  received, before asyncua decodes it, bench/arrival.py: asyncua takes tens of ms to decode a
  response of ~2,000 values, a cost of this measuring client; decoded_latency_p99_s is to the end
  of that decode). The plant steps at whole plant seconds; a value read at SourceTimestamp s was
  produced by the last step before s,
  at wall0 + floor((s - wall0) * speed) / speed, wall0 being the wall time of plant t = 0;
- switch_rtt_ms_median: SwitchSource round trip as a client sees it (10 units);
- poll_overruns: device reads a whole scan period late (missed scans); cpu_percent and peak_rss_mb
  of the gateway process over the measuring window.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import timezone
from pathlib import Path

import psutil
from asyncua import Client, ua
from asyncua.common.subscription import Subscription

from bench import mqtt
from bench.arrival import arrival, stamp_arrivals
from bench.report import markdown_table, write_json
from bench.stress import tree_cpu_s, tree_rss
from bench.workers import BENCH_PASSWORD, BENCH_USER, start_worker, stop_worker
from siteconfig.demo import free_port
from siteconfig.points import POINTS

TARGETS_1000 = {"startup_s": 20.0, "latency_p99_s": 1.5, "switch_rtt_ms_median": 50.0, "poll_overruns": 0}
SUBSCRIBE_CHUNK = 1000
ITEMS_PER_SUBSCRIPTION = 7000


class _Meter:
    """Counts notifications and plant-to-client latencies, cheaply."""

    def __init__(self, wall0: float, speed: float, latency_handles: set[int]):
        self.wall0, self.speed = wall0, speed
        self.latency_handles = latency_handles
        self.count = 0
        self.latencies: list[float] = []  # to the notification's arrival (bench/arrival.py)
        self.decoded: list[float] = []  # to the end of this client's decode
        self.unstamped = 0  # results with data recorded without an arrival stamp (should stay 0)
        self.recording = False

    def on_publish(self, result: ua.PublishResult) -> None:
        data = result.NotificationMessage.NotificationData
        if not data:
            return
        decoded = time.time()
        arrived = arrival(result)
        if arrived is None:  # not stamped (bench/arrival.py): counted, and timed at the decode
            self.unstamped += self.recording
            arrived = decoded
        for notif in data:
            if not isinstance(notif, ua.DataChangeNotification):
                continue
            if not self.recording:
                continue
            self.count += len(notif.MonitoredItems)
            for item in notif.MonitoredItems:
                if item.ClientHandle in self.latency_handles and item.Value.SourceTimestamp is not None:
                    s = item.Value.SourceTimestamp.replace(tzinfo=timezone.utc).timestamp()
                    produced = self.wall0 + math.floor((s - self.wall0) * self.speed) / self.speed
                    self.latencies.append(arrived - produced)
                    self.decoded.append(decoded - produced)


class _MeteredSubscription(Subscription):
    meter: _Meter

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:  # noqa: D401
        self.meter.on_publish(publish_result)


def _p99(values: list[float]) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(0.99 * len(values)))], 3) if values else None


async def _health_snapshot(proc: asyncio.subprocess.Process) -> dict:
    proc.send_signal(signal.SIGUSR1)
    return json.loads(await asyncio.wait_for(proc.stdout.readline(), timeout=30))


async def measure(site, site_file: Path, mode: str, window_s: float) -> dict:
    py = sys.executable
    sim, sim_info = await start_worker([py, "-m", "bench.workers", "sim", str(site_file)])
    port = free_port()
    result: dict = {"units": len(site.units), "mode": mode}
    gw = None
    client = None
    try:
        launched = time.time()
        with tempfile.TemporaryDirectory() as data_dir:
            gw, _ = await start_worker([py, "-m", "bench.workers", "gateway", str(site_file), "--mode", mode,
                                  "--port", str(port), "--data-dir", data_dir])
            gw_ps = psutil.Process(gw.pid)
            client = Client(f"opc.tcp://127.0.0.1:{port}/cmcs", timeout=60)
            client.set_user(BENCH_USER)
            client.set_password(BENCH_PASSWORD)
            await client.connect()
            stamp_arrivals(client)
            ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
            probe = client.get_node(ua.NodeId(f"{site.units[0].name}.LoadPower", ns))
            while not (await probe.read_data_value(raise_on_bad_status=False)).StatusCode.is_good():
                await asyncio.sleep(0.05)
            result["startup_s"] = round(time.time() - launched, 3)
            # subscribe to every variable of every device
            keys = [(name, p.name) for name, kind, _ in site.devices() for p in POINTS[kind]]
            result["variables"] = len(keys)
            latency_points = {"LoadPower"}
            meter = _Meter(sim_info["wall0"], sim_info["speed"], set())
            subscribed_at = time.time()
            subs = []
            for start in range(0, len(keys), ITEMS_PER_SUBSCRIPTION):
                params = ua.CreateSubscriptionParameters(RequestedPublishingInterval=500, RequestedLifetimeCount=600,
                                                         RequestedMaxKeepAliveCount=20,
                                                         MaxNotificationsPerPublish=0, PublishingEnabled=True)
                sub = _MeteredSubscription(client.uaclient, params, handler=None)
                sub.meter = meter
                await sub.init()
                subs.append(sub)
                part = keys[start:start + ITEMS_PER_SUBSCRIPTION]
                for c0 in range(0, len(part), SUBSCRIBE_CHUNK):
                    chunk = part[c0:c0 + SUBSCRIBE_CHUNK]
                    nodes = [client.get_node(ua.NodeId(f"{d}.{p}", ns)) for d, p in chunk]
                    handles = await sub.subscribe_data_change(nodes, queuesize=1)
                    for (d, p), h in zip(chunk, handles):
                        if p in latency_points and isinstance(h, int):
                            # server-side MonitoredItemId != client handle; map through the sub's items
                            pass
                meter.latency_handles.update(
                    ch for ch, item in sub._monitored_items.items()
                    if isinstance(item.node.nodeid.Identifier, str) and item.node.nodeid.Identifier.endswith(".LoadPower"))
            result["subscribe_s"] = round(time.time() - subscribed_at, 3)
            await asyncio.sleep(3.0)  # initial values flood past
            health0 = await _health_snapshot(gw)
            cpu0 = tree_cpu_s(gw_ps)  # every process of the gateway, children included
            t0 = time.time()
            meter.recording = True
            peak_rss = tree_rss(gw_ps)
            while time.time() - t0 < window_s:
                await asyncio.sleep(0.5)
                peak_rss = max(peak_rss, tree_rss(gw_ps))
            meter.recording = False
            elapsed = time.time() - t0
            health1 = await _health_snapshot(gw)
            result["poll_overruns"] = health1["poll_overruns"] - health0["poll_overruns"]
            result["polls_in_window"] = health1["polls"] - health0["polls"]
            cpu1 = tree_cpu_s(gw_ps)
            result["updates_per_s"] = round(meter.count / elapsed, 1)
            result["latency_p50_s"] = round(statistics.median(meter.latencies), 3) if meter.latencies else None
            result["latency_p99_s"] = _p99(meter.latencies)
            result["decoded_latency_p99_s"] = _p99(meter.decoded)
            result["unstamped_publishes"] = meter.unstamped
            result["cpu_percent"] = round(100.0 * (cpu1 - cpu0) / elapsed, 1)
            result["peak_rss_mb"] = round(peak_rss / 2**20, 1)
            for sub in subs:
                try:
                    await sub.delete()
                except Exception:  # noqa: BLE001 - a dropped subscription is itself a result
                    pass
            # SwitchSource round trips, each on its own unit (the dwell time applies per unit)
            rtts = []
            for unit in site.units[:10]:
                obj = client.get_node(ua.NodeId(unit.name, ns))
                active = await client.get_node(ua.NodeId(f"{unit.name}.ActiveSource", ns)).read_value()
                target = 2 if int(active) == 1 else 1
                t = time.perf_counter()
                try:
                    await obj.call_method(ua.NodeId(f"{unit.name}.SwitchSource", ns), ua.Variant(target, ua.VariantType.Int32))
                    rtts.append((time.perf_counter() - t) * 1000.0)
                except ua.UaStatusCodeError as exc:
                    result.setdefault("switch_refusals", []).append(ua.StatusCode(exc.code).name)
            result["switch_rtt_ms_median"] = round(statistics.median(rtts), 2) if rtts else None
            peak_rss = max(peak_rss, tree_rss(gw_ps))
            result["peak_rss_mb"] = round(peak_rss / 2**20, 1)
            await client.disconnect()
            client = None
            stopped = await stop_worker(gw)
            gw = None
            result["poll_overruns_since_start"] = stopped.get("poll_overruns")
    except Exception as exc:  # noqa: BLE001 - report what failed, as a figure of its own
        result["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if client is not None:
            try:
                await client.disconnect()
            except Exception:  # noqa: BLE001
                pass
        if gw is not None:
            info = await stop_worker(gw)
            result.setdefault("poll_overruns", info.get("poll_overruns"))
        await stop_worker(sim)
    return result


def run(out: Path, json_path: Path | None, quick: bool = False, stress: str = "include") -> dict:
    """The benchmark; `stress`: "include" the stress case (bench/stress.py), run "only" it, or "skip" it."""
    from siteconfig.demo import demo_site, generate_site, relocate_site, site_to_yaml

    window = 10.0 if quick else 20.0
    sites = {} if stress == "only" else {"demo": demo_site(), "1000-units": generate_site(20, 50)}
    figures: dict = {"sites": {}, "baseline_naive_asyncua": {}, "window_s": window,
                     "machine": {"cpus": os.cpu_count()}}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, site in sites.items():
            site_file = Path(tmp) / f"{name}.yaml"
            # Security None on the bench's loopback endpoint: the naive baseline has no security, so
            # both are measured on the same plain data path (encryption is a cost of its own)
            bench_site = relocate_site(site)  # a demo may be running on the fixed ports
            opcua = dataclasses.replace(bench_site.gateway.opcua, allow_security_none=True)
            bench_site = dataclasses.replace(bench_site, gateway=dataclasses.replace(bench_site.gateway, opcua=opcua))
            site_file.write_text(site_to_yaml(bench_site))
            for mode, key in (("ours", "sites"), ("naive", "baseline_naive_asyncua")):
                print(f"  {name} / {mode} ...", flush=True)
                r = asyncio.run(measure(site, site_file, mode, window))
                figures[key][name] = r
                print(f"    {json.dumps(r)}", flush=True)
    # Sparkplug B edge node into its own mosquitto (bench/mqtt.py); CMCS_BENCH_MQTT_OUTAGE_S shortens the 5-min outage
    outage = os.environ.get("CMCS_BENCH_MQTT_OUTAGE_S")
    if sites:  # not with --stress only
        figures["mqtt"] = mqtt.run_for_gateway_bench(sites, quick=quick, outage_s=float(outage) if outage else None)
        print(f"    mqtt: {json.dumps(figures['mqtt'])}", flush=True)
    rows = []
    cols = ["startup_s", "updates_per_s", "latency_p50_s", "latency_p99_s", "switch_rtt_ms_median", "poll_overruns",
            "cpu_percent", "peak_rss_mb"]
    for name in sites:
        for label, key in (("ours", "sites"), ("naive asyncua", "baseline_naive_asyncua")):
            r = figures[key][name]
            rows.append([name, label, r.get("variables", "")] + [r.get(c, "") if r.get(c) is not None else "-"
                                                                  for c in cols] + [r.get("error", "")])
    ratios = {}
    for name in sites:
        ours, naive = figures["sites"][name], figures["baseline_naive_asyncua"][name]
        ratios[name] = {c: (round(naive[c] / ours[c], 2) if isinstance(ours.get(c), (int, float)) and ours.get(c)
                            and isinstance(naive.get(c), (int, float)) else None)
                        for c in ("startup_s", "latency_p99_s", "switch_rtt_ms_median")}
        ratios[name]["updates_per_s"] = (round(ours["updates_per_s"] / naive["updates_per_s"], 2)
                                         if ours.get("updates_per_s") and naive.get("updates_per_s") else None)
    figures["ratios_naive_over_ours"] = ratios
    stress_md = ""
    if stress != "skip":
        from bench import stress as stress_case

        stress_case.run_into(figures, quick=quick)
        stress_md = stress_case.markdown(figures)
        print(stress_md)
    table = markdown_table(["site", "server", "variables"] + cols + ["error"], rows)
    if sites:
        _plot(out, figures, list(sites))
    (out / "gateway.md").write_text(
        "# cmcs bench gateway\n\nThree processes on this machine: simulators, gateway, measuring client "
        f"(subscribed to every variable, 500 ms publishing). Window {window:g} s.\n\n{table}\n\n"
        f"Ratios (naive / ours; updates: ours / naive): `{json.dumps(ratios)}`\n\n"
        f"Targets for 1,000 units: `{json.dumps(TARGETS_1000)}`\n\n![gateway](gateway.png)\n\n"
        f"## MQTT / Sparkplug B (bench/mqtt.py)\n\n`{json.dumps(figures.get('mqtt'))}`\n\n{stress_md}")
    write_json(json_path, figures)
    print(table)
    return figures


def _plot(out: Path, figures: dict, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("startup_s", "start-up, s"), ("updates_per_s", "updates/s to client"),
               ("latency_p99_s", "p99 latency, s"), ("switch_rtt_ms_median", "SwitchSource RTT, ms")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(13, 3.4), dpi=110)
    for ax, (metric, label) in zip(axes, metrics):
        xs = range(len(names))
        ours = [figures["sites"][n].get(metric) or 0 for n in names]
        naive = [figures["baseline_naive_asyncua"][n].get(metric) or 0 for n in names]
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="ours", color="#3b6ea8")
        ax.bar([x + 0.2 for x in xs], naive, 0.4, label="naive asyncua", color="#aaaaaa")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gateway.png")
    plt.close(fig)
