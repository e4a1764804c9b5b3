"""`cmcs bench robustness`: hostile clients, hostile devices and unsafe commands (docs/interface.md section 7).

It starts its own device simulators and gateway (bench/workers.py processes, SecurityNone allowed on
loopback for the plain-transport depths) on free ports, and measures:

- orphans: 1,000 sessions each subscribe to up to 700 variables and close without deleting their
  subscriptions (CloseSession DeleteSubscriptions=false); the gateway's RSS before, at the peak and
  once its subscription count is back to zero (rss_growth_pct), and how long that took;
- opcua: our own OPC UA binary fuzzer at three depths (bench/fuzz_opcua.py) with a liveness probe
  (a normal client read) every PROBE_EVERY inputs;
- modbus: a hostile device in place of one aisle's endpoint (bench/fuzz_modbus.py): the gateway
  must stay up, mark the aisle Bad, and be Good again within two poll periods once it behaves;
- interlocks: unsafe commands over random plant states (tests/unit/test_interlock_properties.py
  runs the same property with hypothesis);
- load: its own simulators and gateway on the 1,000-unit site (generate_site(20, 50)); 50 OPC UA
  clients (bench/load_clients.py, in two processes of their own) over Basic256Sha256
  SignAndEncrypt with a user name, each subscribed to 500 variables (500 ms publishing), browsing an
  aisle's subtree and reading 3 variables' history every 10 s, for 10 minutes, on a gateway
  restarted on 30 min of seeded history (`seed_history`, as a running site has it): the gateway's RSS
  every 5 s (load_rss_growth_pct: from the end of the first minute to the end), the latency from the
  plant step that produced a value to its arrival at a client (load_latency_p99_s: the whole
  response received, before asyncua decodes it, bench/arrival.py; from the SourceTimestamp too, and
  to the end of the client's own decode), browse and history round trips, errors, and the CPU of
  the gateway, the simulator and the clients (so that one can tell which side was the bottleneck).

CMCS_BENCH_PHASES (comma-separated, default orphans,opcua,modbus,load,interlocks) runs only some.
The JSON has the keys of docs/interface.md section 7, load_rss_growth_pct and load_latency_p99_s,
plus a "details" object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
from asyncua import Client, ua

from bench.report import write_json
from siteconfig.points import POINTS

SUMMARY_KEYS = ("opcua_inputs", "modbus_frames", "crashes", "liveness_failures", "rss_growth_pct", "recovery_s_max",
                "unsafe_commands_refused_pct")


# ---- the processes ------------------------------------------------------------------------------------
class Processes:
    """The simulators and the gateway as bench/workers.py processes (`env`: e.g. another PYTHONPATH)."""

    def __init__(self, site_file: Path, port: int, data_dir: str, env: dict | None = None,
                 gateway_site_file: Path | None = None):
        self.site_file, self.port, self.data_dir = site_file, port, data_dir
        self.gateway_site_file = gateway_site_file or site_file  # e.g. with one endpoint moved to a hostile device
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.sim: asyncio.subprocess.Process | None = None
        self.gateway: asyncio.subprocess.Process | None = None
        self.ready: dict[str, dict] = {}  # each worker's ready line (the simulator's: wall0 and speed of its plant clock)

    async def _start(self, *args: str) -> asyncio.subprocess.Process:
        log_path = Path(self.data_dir).parent / f"{args[0]}.log"  # the worker's log, for the report
        with open(log_path, "ab") as log_file:
            # another checkout (env PYTHONPATH) runs from its own directory: `-m` puts the cwd first on the path
            cwd = self.env.get("PYTHONPATH", "").split(os.pathsep)[0] or None
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.workers", *args, cwd=cwd,
                                                        stdout=asyncio.subprocess.PIPE, stderr=log_file, env=self.env)
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=300)
        if not line:
            raise RuntimeError(f"bench.workers {args[0]} did not start")
        self.ready[args[0]] = json.loads(line)
        return proc

    async def start(self, with_sim: bool = True) -> None:
        if with_sim:
            self.sim = await self._start("sim", str(self.site_file))
        self.gateway = await self._start("gateway", str(self.gateway_site_file), "--port", str(self.port),
                                         "--data-dir", self.data_dir)

    def rss_mb(self) -> float:
        return psutil.Process(self.gateway.pid).memory_info().rss / 1e6

    def gateway_alive(self) -> bool:
        return self.gateway is not None and self.gateway.returncode is None

    async def stop(self, gateway_only: bool = False) -> None:
        for proc in (self.gateway,) if gateway_only else (self.gateway, self.sim):
            if proc is None or proc.returncode is not None:
                continue
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def bench_site(site, path: Path):
    """`site` with its devices on free ports and SecurityNone allowed (loopback only), written to `path`."""
    from siteconfig.demo import relocate_site, site_to_yaml

    site = relocate_site(site)
    opcua = dataclasses.replace(site.gateway.opcua, host="127.0.0.1", allow_security_none=True, allow_anonymous=True)
    site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, opcua=opcua))
    path.write_text(site_to_yaml(site))
    return site


def variable_ids(site, ns: int) -> list[ua.NodeId]:
    return [ua.NodeId(f"{name}.{p.name}", ns) for name, kind, _ in site.devices() for p in POINTS[kind]]


async def connect(url: str, timeout: float = 10.0) -> Client:
    client = Client(url, timeout=timeout)  # anonymous (a Viewer may subscribe)
    await client.connect()
    return client


async def abandon(client: Client) -> None:
    """CloseSession with DeleteSubscriptions=false, then close the channel: the subscriptions stay behind."""
    close = client.uaclient.close_session
    client.uaclient.close_session = lambda delete_subscriptions: close(False)
    await client.disconnect()


class Probe:
    """A normal client: reads one variable (liveness) and the server's subscription count, reconnecting
    when its session is gone. A read that fails even after a reconnect is a liveness failure."""

    def __init__(self, url: str, site, timeout_s: float = 10.0):
        self.url, self.site, self.timeout_s = url, site, timeout_s
        self.client: Client | None = None
        self.node: ua.NodeId | None = None
        self.failures = 0
        self.reads = 0

    async def _ensure(self) -> Client:
        if self.client is None or self.client.uaclient.protocol is None:
            if self.client is not None:
                try:
                    await self.client.disconnect()
                except Exception:  # noqa: BLE001 - it is gone already
                    pass
            self.client = await connect(self.url, self.timeout_s)
            ns = await self.client.get_namespace_index(f"urn:cmcs-gateway:site:{self.site.name}")
            self.node = ua.NodeId("SourceA.Available", ns)
        return self.client

    async def _read(self, node_id: ua.NodeId):
        for attempt in range(2):
            try:
                client = await self._ensure()
                return await asyncio.wait_for(client.get_node(node_id).read_data_value(raise_on_bad_status=False),
                                              self.timeout_s)
            except (OSError, asyncio.TimeoutError, ConnectionError, ua.UaError):
                self.client = None if attempt == 0 else self.client
        raise ConnectionError("no answer")

    async def alive(self) -> bool:
        """One normal read; False (and counted) if the gateway does not answer it."""
        self.reads += 1
        try:
            await self._ensure()
            await self._read(self.node)
            return True
        except (OSError, asyncio.TimeoutError, ConnectionError, ua.UaError):
            self.failures += 1
            return False

    async def subscription_count(self) -> int | None:
        """ServerDiagnosticsSummary.CurrentSubscriptionCount (None: not maintained, e.g. on main before limits)."""
        try:
            dv = await self._read(ua.NodeId(ua.ObjectIds.Server_ServerDiagnostics_ServerDiagnosticsSummary_CurrentSubscriptionCount))
        except ConnectionError:
            return None
        value = dv.Value.Value if dv.Value is not None else None
        return int(value) if isinstance(value, int) else None

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.disconnect()
            except Exception:  # noqa: BLE001
                pass


# ---- (a) orphaned subscriptions ----------------------------------------------------------------------
async def orphans(procs: Processes, site, sessions: int, items_per_session: int, concurrency: int = 20,
                  settle_s: float = 120.0) -> dict:
    """`sessions` sessions subscribe and leave; the gateway's RSS and subscription count until they are gone."""
    url = f"opc.tcp://127.0.0.1:{procs.port}/cmcs"
    probe = Probe(url, site)
    await probe.alive()
    ns = await probe.client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
    variables = variable_ids(site, ns)[:items_per_session]
    # without gateway/limits.py (main before it) the diagnostics are not maintained: no count to wait for
    counted = (await probe._read(ua.NodeId("ResourceRefusals.Sessions", ns))).StatusCode.is_good()
    await asyncio.sleep(2.0)
    rss0 = procs.rss_mb()
    cpu0 = psutil.Process(procs.gateway.pid).cpu_times()
    refused = failed = 0
    t0 = time.monotonic()

    async def one() -> None:
        nonlocal refused, failed
        try:
            client = await connect(url)
        except ua.UaStatusCodeError:
            refused += 1
            return
        except (OSError, asyncio.TimeoutError):
            failed += 1
            return
        try:
            sub = await client.create_subscription(500, None)
            await sub.subscribe_data_change([client.get_node(n) for n in variables], queuesize=0)
        except (ua.UaStatusCodeError, asyncio.TimeoutError, OSError):
            refused += 1
        finally:
            try:
                await abandon(client)
            except Exception:  # noqa: BLE001 - the session is left behind either way
                failed += 1

    for start in range(0, sessions, concurrency):
        await asyncio.gather(*(one() for _ in range(min(concurrency, sessions - start))))
        await probe.alive()
    opened_s = time.monotonic() - t0
    peak = procs.rss_mb()
    left = await probe.subscription_count() if counted else None
    closed_at = time.monotonic()
    samples = [(0.0, left, peak)]
    while time.monotonic() - closed_at < settle_s:
        await asyncio.sleep(5.0)
        await probe.alive()
        count = await probe.subscription_count() if counted else None
        samples.append((round(time.monotonic() - closed_at, 1), count, round(procs.rss_mb(), 1)))
        if count == 0:
            break
    freed_s = time.monotonic() - closed_at if samples[-1][1] == 0 else None
    await asyncio.sleep(3.0)
    rss1 = procs.rss_mb()
    cpu1 = psutil.Process(procs.gateway.pid).cpu_times()
    await probe.close()
    return {"liveness_failures": probe.failures, "sessions": sessions, "items_per_session": len(variables), "opened_s": round(opened_s, 1),
            "refused": refused, "failed": failed, "rss_before_mb": round(rss0, 1), "rss_peak_mb": round(peak, 1),
            "rss_after_mb": round(rss1, 1), "rss_growth_pct": round(100.0 * (rss1 - rss0) / rss0, 1),
            "subscriptions_left_at_close": left, "freed_s": round(freed_s, 1) if freed_s is not None else None,
            "cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 1),
            "samples": samples}


async def orphan_experiment(sessions: int = 1000, items: int = 700, env: dict | None = None,
                            settle_s: float = 120.0) -> dict:
    """The orphan run alone on the demo site (`env` lets one run it against another checkout)."""
    from siteconfig.demo import demo_site, free_port

    with tempfile.TemporaryDirectory() as tmp:
        site = bench_site(demo_site(), Path(tmp) / "site.yaml")
        procs = Processes(Path(tmp) / "site.yaml", free_port(), str(Path(tmp) / "data"), env)
        await procs.start()
        try:
            return await orphans(procs, site, sessions, items, settle_s=settle_s)
        finally:
            await procs.stop()
            if os.environ.get("CMCS_BENCH_KEEP_LOGS"):
                import shutil
                shutil.copy(Path(tmp) / "gateway.log", os.environ["CMCS_BENCH_KEEP_LOGS"])


async def opcua_fuzz(procs: Processes, site, identity, per_depth: int, probe_every: int = 1000) -> dict:
    """The three fuzzing depths against the running gateway; a crash is the gateway process gone."""
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    from bench.fuzz_opcua import fuzz_channel, fuzz_raw, fuzz_session

    url = f"opc.tcp://127.0.0.1:{procs.port}/cmcs"
    probe = Probe(url, site)
    await probe.alive()
    ns = await probe.client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
    rss0 = procs.rss_mb()
    cert, key, uri = identity

    async def secure_client() -> Client:
        client = Client(url, timeout=10)
        client.application_uri = uri
        await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)
        await client.load_client_certificate(str(cert))
        await client.load_private_key(key)
        await client.connect()
        return client

    result: dict = {}
    t0 = time.monotonic()
    result["raw"] = await fuzz_raw("127.0.0.1", procs.port, url, per_depth, seed=1, probe=probe.alive,
                                   probe_every=probe_every)
    result["channel"] = await fuzz_channel("127.0.0.1", procs.port, url, per_depth, seed=2, probe=probe.alive,
                                           probe_every=probe_every)
    result["session"] = await fuzz_session(secure_client, ns, per_depth, seed=3, probe=probe.alive,
                                           probe_every=probe_every)
    result["seconds"] = round(time.monotonic() - t0, 1)
    await probe.alive()
    result["inputs"] = result["raw"] + result["channel"] + result["session"]["inputs"]
    result["liveness_probes"], result["liveness_failures"] = probe.reads, probe.failures
    result["rss_before_mb"], result["rss_after_mb"] = round(rss0, 1), round(procs.rss_mb(), 1)
    await probe.close()
    return result


def hostile_site(site, hostile_port: int):
    """`site` with the devices of its first aisle's endpoint moved to `hostile_port`; (site, endpoint)."""
    first = site.aisles[0].pdbs[0].device

    def move(ep):
        return dataclasses.replace(ep, port=hostile_port) if (ep.host, ep.port) == (first.host, first.port) else ep

    aisles = []
    for aisle in site.aisles:
        pdbs = tuple(dataclasses.replace(p, device=move(p.device)) for p in aisle.pdbs)
        units = tuple(dataclasses.replace(u, device=move(u.device),
                                          storage=dataclasses.replace(u.storage, device=move(u.storage.device))
                                          if u.storage else None) for u in aisle.units)
        aisles.append(dataclasses.replace(aisle, pdbs=pdbs, units=units))
    return dataclasses.replace(site, aisles=tuple(aisles)), (first.host, first.port)


async def modbus_fuzz(procs: Processes, site, device, frames_target: int, hostile_s: float = 15.0,
                      max_cycles: int = 40) -> dict:
    """Cycles of a hostile period (the aisle must go Bad, the gateway stay up) and a good one (time
    until the aisle's values are Good again: recovery_s)."""
    url = f"opc.tcp://127.0.0.1:{procs.port}/cmcs"
    probe = Probe(url, site)
    await probe.alive()
    ns = await probe.client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
    watched = ua.NodeId(f"{site.aisles[0].pdbs[0].name}.Current", ns)
    other = ua.NodeId(f"{site.aisles[-1].pdbs[0].name}.Current", ns)
    poll_s = site.gateway.scan_groups_s.get(site.aisles[0].pdbs[0].device.scan_group, 1.0)
    cycles, recoveries, not_bad, others_bad = 0, [], 0, 0
    t0 = time.monotonic()
    while device.frames < frames_target and cycles < max_cycles and procs.gateway_alive():
        cycles += 1
        device.hostile = True
        await asyncio.sleep(max(hostile_s, site.gateway.stale_time_s + 3 * poll_s))
        status = (await probe._read(watched)).StatusCode
        not_bad += not status.is_bad()
        others_bad += not (await probe._read(other)).StatusCode.is_good()  # the other aisles keep serving
        await probe.alive()
        device.hostile = False
        behaved_at = time.monotonic()
        while time.monotonic() - behaved_at < 60.0:
            if (await probe._read(watched)).StatusCode.is_good():
                break
            await asyncio.sleep(0.1)
        recoveries.append(round(time.monotonic() - behaved_at, 2))
    await probe.close()
    return {"frames": device.frames, "requests": device.requests, "connections": device.connections,
            "cycles": cycles, "seconds": round(time.monotonic() - t0, 1), "poll_period_s": poll_s,
            "recovery_s": recoveries, "recovery_s_max": max(recoveries) if recoveries else None,
            "recovered_within_two_polls": sum(r <= 2 * poll_s for r in recoveries),
            "hostile_periods_not_marked_bad": not_bad, "other_aisle_not_good": others_bad,
            "liveness_failures": probe.failures, "gateway_alive": procs.gateway_alive()}


def interlocks(examples: int) -> dict:
    """The interlock property with `examples` random plant states and targets (hypothesis)."""
    from hypothesis import HealthCheck, given, settings

    from bench.interlock_property import Bench, Tally, plant_state, targets
    from siteconfig.demo import demo_site

    site = demo_site()
    bench = Bench(site)
    tally = Tally()
    loop = asyncio.new_event_loop()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(state=plant_state(site), target=targets())
    def check(state, target):
        loop.run_until_complete(bench.switch(state, target, tally))

    check()
    loop.close()
    return {"examples": tally.unsafe + tally.safe, "unsafe": tally.unsafe, "refused_exactly": tally.refused_exactly,
            "mismatches": tally.mismatches[:5], "unsafe_commands_refused_pct": round(tally.refused_pct, 3)}


# ---- (e) load: many SCADA clients at once ------------------------------------------------------------
LOAD_TARGETS = {"rss_growth_pct": 10.0, "latency_p99_s": 1.5}


def _merge(hists: list[dict[str, int]]) -> list[int]:
    from bench.load_clients import BINS

    merged = [0] * BINS
    for hist in hists:
        for i, n in hist.items():
            merged[int(i)] += n
    return merged


def _p(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None


def _own_cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def load(procs: Processes, site, identity, clients: int, items: int, load_s: float, warmup_s: float,
               workers: int = 2, browse_every_s: float = 10.0, history_every_s: float = 10.0,
               sample_s: float = 5.0) -> dict:
    """`clients` secure OPC UA clients in `workers` processes (bench/load_clients.py), each subscribed to
    `items` variables, browsing and reading history, for `load_s`; the gateway's RSS every `sample_s`
    (growth: from the end of the warm-up, the first `warmup_s` of the run, to the end), its CPU and the
    clients' own, and the latencies, round trips and errors the clients saw."""
    from bench.load_clients import BIN_S, _percentile
    from bench.stress import tree_cpu_s
    from bench.workers import BENCH_PASSWORD, BENCH_USER

    cert, key, uri = identity
    sim_clock = procs.ready["sim"]
    base = {"url": f"opc.tcp://127.0.0.1:{procs.port}/cmcs", "ns_uri": f"urn:cmcs-gateway:site:{site.name}",
            "site_file": str(procs.gateway_site_file), "cert": str(cert), "key": str(key), "uri": uri,
            "user": BENCH_USER, "password": BENCH_PASSWORD, "wall0": sim_clock["wall0"], "speed": sim_clock["speed"],
            "total_clients": clients, "items": items, "browse_every_s": browse_every_s,
            "history_every_s": history_every_s}
    workers = max(1, min(workers, clients))
    log_path = Path(procs.data_dir).parent / "load_clients.log"
    cwd = procs.env.get("PYTHONPATH", "").split(os.pathsep)[0] or None
    procs_: list[asyncio.subprocess.Process] = []
    result: dict = {"site": site.name, "units": len(site.units), "clients": clients, "items_per_client": items,
                    "workers": workers, "load_s": load_s, "warmup_s": warmup_s, "browse_every_s": browse_every_s,
                    "history_every_s": history_every_s, "security": "Basic256Sha256 SignAndEncrypt, user name",
                    "latency": "plant step (simulator clock) to the notification's arrival at the client (the whole "
                                  "response received, before asyncua decodes it); source_* from SourceTimestamp; "
                                  "decoded_* to the end of the client's decode",
                    "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    t_connect = time.monotonic()
    try:
        with open(log_path, "ab") as log_file:
            for w in range(workers):
                first, last = w * clients // workers, (w + 1) * clients // workers
                cfg = {**base, "first": first, "count": last - first}
                procs_.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.load_clients", json.dumps(cfg), cwd=cwd, env=procs.env,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file))
        ready = []
        for proc in procs_:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=600)
            if not line:
                raise RuntimeError(f"a load client process did not start (see {log_path})")
            ready.append(json.loads(line))
        result["connected"] = sum(r["clients"] for r in ready)
        result["connect_s"] = round(time.monotonic() - t_connect, 1)
        gw_ps, sim_ps = psutil.Process(procs.gateway.pid), psutil.Process(procs.sim.pid)
        client_ps = [psutil.Process(p.pid) for p in procs_]
        me = psutil.Process()
        cpu0 = (tree_cpu_s(gw_ps), tree_cpu_s(sim_ps), sum(tree_cpu_s(p) for p in client_ps), _own_cpu_s(me))
        t0 = time.monotonic()
        for proc in procs_:
            proc.stdin.write((json.dumps({"run_s": load_s}) + "\n").encode())
            await proc.stdin.drain()
        history_db = Path(procs.data_dir) / "history.sqlite3"

        def db_mb() -> float:  # the historian's file and its WAL: what its page cache (64 MB at most) fills from
            return round(sum(p.stat().st_size for p in (history_db, history_db.with_name(history_db.name + "-wal"))
                             if p.exists()) / 1e6, 1)

        samples = [(0.0, round(procs.rss_mb(), 1), db_mb())]
        while time.monotonic() - t0 < load_s and procs.gateway_alive():
            await asyncio.sleep(min(sample_s, max(0.0, load_s - (time.monotonic() - t0))))
            if procs.gateway_alive():
                samples.append((round(time.monotonic() - t0, 1), round(procs.rss_mb(), 1), db_mb()))
        elapsed = time.monotonic() - t0
        cpu1 = (tree_cpu_s(gw_ps), tree_cpu_s(sim_ps), sum(tree_cpu_s(p) for p in client_ps), _own_cpu_s(me))
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        outs = []
        for proc in procs_:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=300)
            outs.append(json.loads(line) if line.strip() else {"errors": {"client_process": 1}})
    finally:
        for proc in procs_:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except asyncio.TimeoutError:
                    proc.kill()
    warm = next((rss for t, rss, _ in samples if t >= warmup_s), samples[-1][1])
    end = samples[-1][1]
    # the trend at the end: MB per minute over the last two minutes (flat memory: about 0)
    tail = [(t, rss) for t, rss, _ in samples if t >= samples[-1][0] - 120.0]
    tail_slope = (60.0 * (tail[-1][1] - tail[0][1]) / (tail[-1][0] - tail[0][0])) if len(tail) > 1 and tail[-1][0] > tail[0][0] else None
    plant, source = _merge([o.get("plant", {}) for o in outs]), _merge([o.get("source", {}) for o in outs])
    decoded = _merge([o.get("plant_decoded", {}) for o in outs])
    browse = [x for o in outs for x in o.get("browse_s", [])]
    history = [x for o in outs for x in o.get("history_s", [])]
    errors: dict[str, int] = {}
    for o in outs:
        for kind, n in o.get("errors", {}).items():
            errors[kind] = errors.get(kind, 0) + n
    notifications = sum(o.get("notifications", 0) for o in outs)
    result.update({
        "seconds": round(elapsed, 1), "gateway_alive": procs.gateway_alive(),
        "rss_start_mb": samples[0][1], "rss_after_warmup_mb": warm, "rss_end_mb": end,
        "rss_max_mb": max(rss for _, rss, _ in samples),
        "rss_last_2min_mb_per_min": round(tail_slope, 2) if tail_slope is not None else None,
        "history_db_mb_end": samples[-1][2],
        "rss_growth_pct": round(100.0 * (end - warm) / warm, 1),
        "notifications": notifications, "notifications_per_s": round(notifications / elapsed, 1),
        "notifications_min_per_client": min((o.get("notifications_min_per_client", 0) for o in outs), default=0),
        "not_good_values": sum(o.get("not_good", 0) for o in outs),
        "unstamped_publishes": sum(o.get("unstamped", 0) for o in outs),
        "latency_p50_s": _percentile(plant, 0.5), "latency_p99_s": _percentile(plant, 0.99),
        "latency_max_bin_s": _percentile(plant, 1.0),
        "source_latency_p50_s": _percentile(source, 0.5), "source_latency_p99_s": _percentile(source, 0.99),
        "decoded_latency_p50_s": _percentile(decoded, 0.5), "decoded_latency_p99_s": _percentile(decoded, 0.99),
        "latency_bin_s": BIN_S,
        "browse_requests": len(browse), "browse_p50_s": _p(browse, 0.5), "browse_p99_s": _p(browse, 0.99),
        "history_reads": len(history), "history_p50_s": _p(history, 0.5), "history_p99_s": _p(history, 0.99),
        "history_values": sum(o.get("history_values", 0) for o in outs),
        "errors": sum(errors.values()), "errors_by_kind": errors,
        "first_errors": [e for o in outs for e in o.get("first_errors", [])][:10],
        "cpu_percent": {"gateway": round(100.0 * (cpu1[0] - cpu0[0]) / elapsed, 1),
                        "simulator": round(100.0 * (cpu1[1] - cpu0[1]) / elapsed, 1),
                        "clients": round(100.0 * (cpu1[2] - cpu0[2]) / elapsed, 1),
                        "clients_per_process": [round(100.0 * o.get("cpu_s", 0) / elapsed, 1) for o in outs],
                        "bench": round(100.0 * (cpu1[3] - cpu0[3]) / elapsed, 1),
                        "machine_cores": os.cpu_count()},
        "rss_samples": samples,  # (s since the start, gateway RSS MB, history file MB)
        "targets": LOAD_TARGETS,
    })
    result["targets_met"] = {"rss_growth_pct": result["rss_growth_pct"] < LOAD_TARGETS["rss_growth_pct"],
                             "latency_p99_s": result["latency_p99_s"] is not None
                             and result["latency_p99_s"] < LOAD_TARGETS["latency_p99_s"]}
    return result


SEED_SPAN_S = 1800.0  # the history a seeded site already has: 30 min ...
SEED_STEP_S = 10.0  # ... a row every 10 s per variable (180 rows, a few index pages each)


async def seed_history(procs: Processes, timeout_s: float = 120.0) -> dict:
    """Give the gateway the history of a site that has been running, then restart it on it.

    A gateway started on an empty data dir grows by its historian's page cache (SQLite, bounded at
    64 MB, gateway/historian.py) while its history file grows past that size: 3-4 min at 1,000
    units, measured (3 Dec 2026: +61 MB from 60 s to 270 s, then +3 MB in 330 s). A site with
    history fills that cache within seconds of any start. So the load runs on a gateway whose
    history already covers every variable: it runs until no further variable gets its first row, is
    stopped, each variable's first row is copied back at SEED_STEP_S over the SEED_SPAN_S before it
    (same type, value and status), and the gateway starts again on that data dir."""
    import sqlite3

    db = Path(procs.data_dir) / "history.sqlite3"
    t0 = time.monotonic()

    def counts() -> tuple[int, int]:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            nodes = conn.execute("SELECT count(*) FROM node").fetchone()[0]
            fed = conn.execute("SELECT count(DISTINCT node) FROM sample").fetchone()[0]
            return nodes, fed
        except sqlite3.Error:
            return 0, 0
        finally:
            conn.close()

    nodes = fed = 0
    while time.monotonic() - t0 < timeout_s:  # until no new variable gets its first row (some never change)
        await asyncio.sleep(3.0)
        before = fed
        nodes, fed = await asyncio.to_thread(counts)
        if fed and fed == before:
            break
    await procs.stop(gateway_only=True)

    def copy_back() -> int:
        conn = sqlite3.connect(db, isolation_level=None, timeout=30)
        try:
            conn.execute("PRAGMA cache_size=-64000")
            conn.execute("BEGIN")
            before = conn.total_changes
            conn.execute(
                "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?), "
                "first AS (SELECT node, MIN(ts) AS ts FROM sample GROUP BY node) "
                "INSERT INTO sample SELECT s.node, s.ts - k.i * ?, s.server_lag, s.status, s.vtype, s.value "
                "FROM first JOIN sample s ON s.node = first.node AND s.ts = first.ts, k ORDER BY s.node, k.i DESC",
                (int(SEED_SPAN_S / SEED_STEP_S), int(SEED_STEP_S * 1e6)))
            n = conn.total_changes - before
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return n
        finally:
            conn.close()

    t_seed = time.monotonic()
    rows = await asyncio.to_thread(copy_back)
    seeded_s = time.monotonic() - t_seed
    await procs.start(with_sim=False)
    return {"history_nodes": nodes, "history_nodes_fed": fed, "seeded_rows": rows, "seed_s": round(seeded_s, 1),
            "history_db_mb_seeded": round(db.stat().st_size / 1e6, 1), "seed_total_s": round(time.monotonic() - t0, 1),
            "seed_span_s": SEED_SPAN_S, "seed_step_s": SEED_STEP_S}


async def load_phase(quick: bool, env: dict | None = None) -> dict:
    """The load run on its own 1,000-unit site (siteconfig.demo.generate_site(20, 50)): 50 clients x 500
    variables for 10 minutes (quick: 10 x 500 for 60 s)."""
    from gateway.security import ensure_cmcs_client
    from siteconfig.demo import free_port, generate_site

    with tempfile.TemporaryDirectory() as tmp:
        site = bench_site(generate_site(20, 50), Path(tmp) / "site.yaml")
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        identity = ensure_cmcs_client(data_dir)  # a trusted client certificate for the secure channels
        procs = Processes(Path(tmp) / "site.yaml", free_port(), str(data_dir), env)
        result: dict = {}
        await procs.start()
        try:
            seeded = await seed_history(procs)
            if quick:
                result = await load(procs, site, identity, clients=10, items=500, load_s=60.0, warmup_s=20.0)
            else:
                result = await load(procs, site, identity, clients=50, items=500, load_s=600.0, warmup_s=60.0)
            result["history_seed"] = seeded
        finally:
            await procs.stop()
            result_log = _log_summary(Path(tmp) / "gateway.log")
            if os.path.isdir(os.environ.get("CMCS_BENCH_KEEP_LOGS", "")):
                import shutil
                for name in ("gateway.log", "load_clients.log"):
                    if (Path(tmp) / name).exists():
                        shutil.copy(Path(tmp) / name, Path(os.environ["CMCS_BENCH_KEEP_LOGS"]) / name)
        result["gateway_log_errors"] = result_log
    return result


async def _phases(quick: bool) -> dict:
    from gateway.security import ensure_cmcs_client
    from siteconfig.demo import demo_site, free_port

    from bench.fuzz_modbus import HostileDevice

    details: dict = {"crashes": 0}
    phases = _phases_selected()
    if {"orphans", "opcua", "modbus"} & set(phases):
        with tempfile.TemporaryDirectory() as tmp:
            site = bench_site(demo_site(), Path(tmp) / "site.yaml")
            hostile_port = free_port()
            gateway_site, upstream = hostile_site(site, hostile_port)
            from siteconfig.demo import site_to_yaml

            (Path(tmp) / "gateway-site.yaml").write_text(site_to_yaml(gateway_site))
            device = HostileDevice(hostile_port, upstream)
            await device.start()  # behaves (a proxy to the simulator) until told otherwise
            data_dir = Path(tmp) / "data"
            data_dir.mkdir()
            identity = ensure_cmcs_client(data_dir)  # the fuzzer's trusted certificate (Engineer)
            procs = Processes(Path(tmp) / "site.yaml", free_port(), str(data_dir),
                              gateway_site_file=Path(tmp) / "gateway-site.yaml")
            await procs.start()
            try:
                # (a) orphans: a first round brings the process to its working size; then the 1,000
                sessions = 100 if quick else 1000
                if "orphans" in phases:
                    details["orphans_warmup"] = await orphans(procs, site, max(20, sessions // 10), 700, settle_s=90.0)
                    details["orphans"] = await orphans(procs, site, sessions, 700, settle_s=90.0)
                    details["crashes"] += not procs.gateway_alive()
                # (b) the OPC UA fuzzer
                if "opcua" in phases and procs.gateway_alive():
                    details["opcua"] = await opcua_fuzz(procs, site, identity, 3000 if quick else 35_000)
                    details["crashes"] += not procs.gateway_alive()
                # (c) the hostile Modbus device in place of the first aisle's endpoint
                if "modbus" in phases and procs.gateway_alive():
                    details["modbus"] = await modbus_fuzz(procs, site, device, 5000 if quick else 100_000)
                    details["crashes"] += not procs.gateway_alive()
            finally:
                await procs.stop()
                await device.stop()
                details["gateway_log_errors"] = _log_summary(Path(tmp) / "gateway.log")
    # (e) load: its own gateway on the 1,000-unit site
    if "load" in phases:
        details["load"] = await load_phase(quick)
        details["crashes"] += not details["load"].get("gateway_alive", False)
    return details


def _log_summary(path: Path) -> dict:
    """ERROR lines of the gateway's log by logger and message start (what broke, and how often)."""
    counts: dict[str, int] = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("ERROR:"):
                key = line[:110]
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:15])


def _load_text(load_: dict) -> str:
    """The load run in words, for robustness.md."""
    if not load_:
        return ""
    cpu = load_.get("cpu_percent", {})
    return (f"load_rss_growth_pct, load_latency_p99_s: {load_.get('connected')} of {load_.get('clients')} OPC UA clients "
            f"({load_.get('security')}), each subscribed to {load_.get('items_per_client')} variables of the "
            f"{load_.get('units')}-unit site (500 ms publishing), browsing one aisle's subtree every "
            f"{load_.get('browse_every_s'):g} s and reading 3 variables' history over the last 5 min every "
            f"{load_.get('history_every_s'):g} s, for {load_.get('seconds')} s. RSS growth from the end of the first "
            f"{load_.get('warmup_s'):g} s ({load_.get('rss_after_warmup_mb')} MB) to the end "
            f"({load_.get('rss_end_mb')} MB): {load_.get('rss_growth_pct')} % (target < 10 %). Latency from the plant "
            f"step that produced a value to its arrival at the client: p50 {load_.get('latency_p50_s')} s, p99 "
            f"{load_.get('latency_p99_s')} s (target < 1.5 s; from SourceTimestamp, the gateway's poll: p99 "
            f"{load_.get('source_latency_p99_s')} s; to the end of the client's own decode: p99 "
            f"{load_.get('decoded_latency_p99_s')} s); browse p99 {load_.get('browse_p99_s')} s, history read p99 "
            f"{load_.get('history_p99_s')} s; {load_.get('errors')} errors; {load_.get('notifications_per_s')} "
            f"notifications/s. CPU (% of one core, {cpu.get('machine_cores')} cores): gateway {cpu.get('gateway')}, "
            f"simulator {cpu.get('simulator')}, clients {cpu.get('clients')} "
            f"({cpu.get('clients_per_process')} per process); load average before/after "
            f"{load_.get('loadavg_before')} / {load_.get('loadavg_after')} (the machine is shared).\n\n")


PHASES = ("orphans", "opcua", "modbus", "load", "interlocks")


def _phases_selected() -> list[str]:
    """CMCS_BENCH_PHASES (comma-separated, default all of PHASES)."""
    return [p.strip() for p in os.environ.get("CMCS_BENCH_PHASES", ",".join(PHASES)).split(",") if p.strip()]


def run(out: Path, json_path: Path | None, quick: bool = False) -> dict:
    """The whole benchmark; `quick`: small counts (a smoke run)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    details = asyncio.run(_phases(quick))
    if "interlocks" in _phases_selected():
        details["interlocks"] = interlocks(500 if quick else 5000)
    opcua = details.get("opcua", {})
    load_ = details.get("load", {})
    summary = {
        "opcua_inputs": opcua.get("inputs", 0),
        "modbus_frames": details.get("modbus", {}).get("frames", 0),
        "crashes": details["crashes"],
        "liveness_failures": opcua.get("liveness_failures", 0) + details.get("orphans", {}).get("liveness_failures", 0)
        + details.get("modbus", {}).get("liveness_failures", 0),
        "rss_growth_pct": round(100.0 * (details["orphans"]["rss_after_mb"] - details["orphans_warmup"]["rss_after_mb"])
                                / details["orphans_warmup"]["rss_after_mb"], 1) if "orphans" in details else None,
        "recovery_s_max": details.get("modbus", {}).get("recovery_s_max"),
        "unsafe_commands_refused_pct": details.get("interlocks", {}).get("unsafe_commands_refused_pct"),
        "load_rss_growth_pct": load_.get("rss_growth_pct"),
        "load_latency_p99_s": load_.get("latency_p99_s"),
    }
    details["seconds"] = round(time.monotonic() - t0, 1)
    result = {**summary, "details": details}
    (out / "robustness.md").write_text(
        "# cmcs bench robustness\n\nrss_growth_pct: the gateway's RSS once the 1,000 sessions' orphaned subscriptions "
        "are gone, against its RSS after a first round of the same (its working size); the cold figures are in "
        "details.orphans.\n\n" + _load_text(load_) + "```json\n" + json.dumps(result, indent=1) + "\n```\n")
    write_json(json_path, result)
    print(json.dumps(summary))
    return result
