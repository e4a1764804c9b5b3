"""The `mqtt` figures of `cmcs bench gateway` (docs/interface.md section 7): the Sparkplug B edge node
of a site's gateway into its own mosquitto (TLS, client certificates), a historian-like subscriber.

Three processes, as on a site: the device simulators (real Modbus TCP on loopback, `bench.workers
sim`), the gateway side in this process (the real drivers, point table and edge node,
gateway/sparkplug), and a historian-like subscriber in a process of its own; mosquitto is a child
process. (Until session 10 all three shared one Python process: on a 2-CPU VM the simulator and the
subscriber took the edge node's interpreter lock, and the figures measured that, not the gateway.)

- messages_per_s, metrics_per_s: what the subscriber receives from the edge node per second over
  the live window (DDATA/NDATA), i.e. what one gateway of that size sends a broker;
- latency_p99_s: from the point-table change (the metric's timestamp: when the driver read it) to
  the subscriber's receipt, same clock;
- replay_metrics_per_s: the broker is stopped for `outage_s` (default 300 s: the issue's 5 minutes),
  the data goes to the store-and-forward queue, then the broker comes back: historical metrics
  received per second from the first to the last replayed message (QoS 1, the inflight window);
  replay_lost counts outage metrics the subscriber never got and the node no longer holds (0
  expected); replay_pending_* what the node still held, on disk, when the bench stopped waiting
  (max(120 s, outage) after the broker came back: a slow or busy machine);
- cpu_percent_process: the gateway side's process (drivers, point table, edge node) over the live
  window; cpu_percent_simulator and cpu_percent_subscriber beside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.mqtt_broker import LOCALHOST, Mosquitto, Subscriber, make_pki
from bench.workers import start_worker, stop_worker
from drivers.base import DriverSet
from drivers.pointtable import PointTable
from gateway.sparkplug import EdgeNode
from gateway.sparkplug.edge import QUEUE_FILE
from gateway.sparkplug.catalogue import Payload
from siteconfig.demo import relocate_site, site_to_yaml
from siteconfig.model import MqttConfig, Site
from siteconfig.points import POINTS


class _Counter(Subscriber):
    """The subscriber, counting instead of keeping every message (a 1,000-unit site sends a lot)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.recording = False
        self.messages_live = 0
        self.metrics_live = 0
        self.latencies: list[float] = []
        self.hist_metrics = 0
        self.hist_first = self.hist_last = None
        self.births = 0

    def _on_message(self, _c, _u, msg):
        now = time.time()
        kind = msg.topic.split("/")[2]
        if kind in ("NBIRTH", "DBIRTH"):
            self.births += 1
            return
        if kind not in ("DDATA", "NDATA"):
            return
        payload = Payload.FromString(msg.payload)
        with self.lock:
            metrics = payload.metrics
            if metrics and metrics[0].is_historical:
                self.hist_metrics += len(metrics)
                self.hist_first = self.hist_first or now
                self.hist_last = now
                return
            if self.recording:
                self.messages_live += 1
                self.metrics_live += len(metrics)
                if len(self.latencies) < 500_000:
                    self.latencies.append(now - metrics[0].timestamp / 1000.0)

    def snapshot(self) -> dict:
        with self.lock:
            lat = sorted(self.latencies)
            return {"messages_live": self.messages_live, "metrics_live": self.metrics_live,
                    "latency_p50_s": round(statistics.median(lat), 4) if lat else None,
                    "latency_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 4) if lat else None,
                    "hist_metrics": self.hist_metrics, "hist_first": self.hist_first, "hist_last": self.hist_last,
                    "births": self.births}


def _subscriber_main(ca: str, cert: str, key: str, port: int) -> None:
    """`python -m bench.mqtt subscriber CA CERT KEY PORT`: the historian's process. One JSON line when
    it is connected, then one answer (its counts) per request line on stdin: record, pause, stats, quit."""
    import types

    pki = types.SimpleNamespace(ca=ca, client_cert=cert, client_key=key)
    sub = _Counter(pki, port, client_id="bench-historian")
    sub.start()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = line.strip()
        if request == "record":
            sub.recording = True
        elif request == "pause":
            sub.recording = False
        elif request == "quit":
            sub.stop()
        print(json.dumps(sub.snapshot()), flush=True)
        if request == "quit":
            return
    sub.stop()


class _SubscriberProcess:
    """The bench's handle on the subscriber's process."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.pid = proc.pid
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, pki, port: int) -> "_SubscriberProcess":
        proc, _ = await start_worker([sys.executable, "-m", "bench.mqtt", "subscriber", str(pki.ca),
                                      str(pki.client_cert), str(pki.client_key), str(port)], stdin=True)
        return cls(proc)

    async def ask(self, request: str = "stats") -> dict:
        async with self._lock:
            self.proc.stdin.write(f"{request}\n".encode())
            await self.proc.stdin.drain()
            return json.loads(await asyncio.wait_for(self.proc.stdout.readline(), timeout=60))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                await self.ask("quit")
            except (OSError, asyncio.TimeoutError, ValueError):
                pass
        await stop_worker(self.proc)


def measure(site: Site, window_s: float = 30.0, outage_s: float = 300.0) -> dict:
    """Run the edge node of `site` against a fresh mosquitto; the figures as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(_measure(site, Path(tmp), window_s, outage_s))


def _cpu_s(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return 0.0


async def _measure(site: Site, tmp: Path, window_s: float, outage_s: float) -> dict:
    site = relocate_site(site)
    site_file = tmp / "site.yaml"
    site_file.write_text(site_to_yaml(site))
    pki = make_pki(tmp / "pki")
    broker = Mosquitto(tmp / "broker", pki)
    broker.start()
    loop = asyncio.get_running_loop()
    sub = sim = None
    try:
        sub = await _SubscriberProcess.start(pki, broker.port)
        sim, _ = await start_worker([sys.executable, "-m", "bench.workers", "sim", str(site_file)])
        return await _measure_with(site, tmp, pki, broker, sub, sim, window_s, outage_s)
    finally:
        if sim is not None:
            await stop_worker(sim)
        if sub is not None:
            await sub.stop()
        broker.stop()


async def _measure_with(site: Site, tmp: Path, pki, broker: Mosquitto, sub: "_SubscriberProcess",
                        sim: asyncio.subprocess.Process, window_s: float, outage_s: float) -> dict:
    loop = asyncio.get_running_loop()
    ask = sub.ask
    table = PointTable()
    drivers = DriverSet(site, table)
    config = MqttConfig(host=LOCALHOST, port=broker.port, tls_ca=str(pki.ca), tls_cert=str(pki.gateway_cert),
                        tls_key=str(pki.gateway_key), store_forward_mb=512)
    node = EdgeNode(site, config, tmp / "data")
    proc = psutil.Process()
    try:
        await drivers.start()
        table.attach(node)
        node.start()
        await asyncio.sleep(5.0)  # births, first reads of every device
        await ask("record")
        cpu0, t0 = proc.cpu_times(), time.monotonic()
        sim0, sub0 = _cpu_s(sim.pid), _cpu_s(sub.pid)
        await asyncio.sleep(window_s)
        live = await ask("pause")
        elapsed = time.monotonic() - t0
        cpu1 = proc.cpu_times()
        sim1, sub1 = _cpu_s(sim.pid), _cpu_s(sub.pid)
        figures = {
            "units": len(site.units), "devices": len(site.devices()),
            "metrics_in_births": sum(len(p) for p in (POINTS[k] for _d, k, _e in site.devices())),
            "messages_per_s": round(live["messages_live"] / elapsed, 1),
            "metrics_per_s": round(live["metrics_live"] / elapsed, 1),
            "latency_p50_s": live["latency_p50_s"],
            "latency_p99_s": live["latency_p99_s"],
            "cpu_percent_process": round(100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / elapsed, 1),
            "cpu_percent_simulator": round(100 * (sim1 - sim0) / elapsed, 1),
            "cpu_percent_subscriber": round(100 * (sub1 - sub0) / elapsed, 1),
            "window_s": window_s,
        }
        # the outage: broker gone, the queue fills; back: births, replay, live
        await loop.run_in_executor(None, broker.stop)
        acked_before = node.acked
        held_before = node.held_metrics
        await asyncio.sleep(outage_s)
        held = node.held_metrics - held_before
        queued_messages = node.stats()["queue_messages"]
        queued_bytes = node.stats()["queue_bytes"]
        await loop.run_in_executor(None, broker.start)
        deadline = time.monotonic() + max(120.0, outage_s)
        while time.monotonic() < deadline and node.stats()["queue_messages"] > 50:
            await asyncio.sleep(0.5)
        # the subscriber may lag behind the broker's PUBACKs (mosquitto holds the rest for its persistent
        # session): wait until it has every held metric, or gets nothing more for 5 s
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline + 120.0:
            got = (await ask())["hist_metrics"]
            if got >= held:
                break
            if got != last:
                last, quiet_since = got, time.monotonic()
            elif time.monotonic() - quiet_since > 5.0:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(3.0)
        final = await ask()
        # what the node still holds (the replay did not finish by the deadline: a slow machine) is
        # pending, not lost: it is on disk and goes out next; counted apart (a read-only look at the queue)
        pending_messages, pending_metrics = _pending(tmp / "data" / QUEUE_FILE)
        first, last_at = final["hist_first"], final["hist_last"]
        replay_s = (last_at - first) if first and last_at else None
        replayed = final["hist_metrics"]
        figures.update({
            "outage_s": outage_s,
            "queued_messages": queued_messages, "queued_mb": round(queued_bytes / 1e6, 2),
            "held_metrics": held,
            "replayed_metrics": replayed,
            # at least once: a replay may repeat a message whose PUBACK was lost, never miss one
            "replay_lost": max(0, held - replayed - pending_metrics),
            "replay_pending_messages": pending_messages, "replay_pending_metrics": pending_metrics,
            "replay_s": round(replay_s, 2) if replay_s else None,
            "replay_metrics_per_s": round(replayed / replay_s, 1) if replay_s else None,
            "replayed_messages_acked": node.acked - acked_before,
            "dropped_messages": node.stats()["dropped_messages"],
        })
        return figures
    finally:
        node.stop()
        await drivers.stop()


def _pending(queue_file: Path) -> tuple[int, int]:
    """(messages, metrics) still in the edge node's store-and-forward queue (SQLite WAL: a reader
    beside the writer is safe)."""
    import sqlite3

    db = sqlite3.connect(f"file:{queue_file}?mode=ro", uri=True)
    try:
        n, metrics = db.execute("SELECT COUNT(*), COALESCE(SUM(metrics), 0) FROM queue WHERE historical > 0 "
                                "AND kind IN ('DDATA', 'NDATA')").fetchone()
        return int(n), int(metrics)
    finally:
        db.close()


def run_for_gateway_bench(sites: dict[str, Site], quick: bool = False, outage_s: float | None = None) -> dict:
    """The `mqtt` block of `cmcs bench gateway`: the 1,000-unit site (or the largest given)."""
    name = "1000-units" if "1000-units" in sites else max(sites, key=lambda n: len(sites[n].units))
    outage = outage_s if outage_s is not None else (20.0 if quick else 300.0)
    print(f"  {name} / mqtt (Sparkplug B, TLS, outage {outage:g} s) ...", flush=True)
    try:
        figures = measure(sites[name], window_s=10.0 if quick else 15.0, outage_s=outage)
    except Exception as exc:  # noqa: BLE001 - the rest of the bench report still counts
        return {"site": name, "error": f"{type(exc).__name__}: {exc}"}
    figures["site"] = name
    return figures


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "subscriber":
        _subscriber_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit("usage: python -m bench.mqtt subscriber CA CERT KEY PORT")
